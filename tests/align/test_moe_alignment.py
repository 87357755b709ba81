"""Alignment of a Mixture-of-Experts model keeps its balancing losses.

Known answers: every alignment objective of a MoE policy is the objective of
a dense one plus the forward's auxiliary loss (Switch load balancing + router
z-loss), exactly, and reports the routing statistics beside its metrics; a
dense model's objectives carry no aux term and no `moe_*` metrics. PPO and
GRPO add it to the policy update: with every reward equal, it alone moves
the policy.
"""
import dataclasses

import pytest
import torch

from heron.align.data import Replies, encode_pairs, encode_replies
from heron.align.grpo import GRPOSettings, grpo
from heron.align.logprobs import logprobs_and_aux, sequence_logprobs
from heron.align.objectives import (
    kto_objective,
    preference_objective,
    reply_logprobs,
    reward_objective,
    sft_objective,
)
from heron.align.synthetic import RepeatTask
from heron.core import ModelConfig, Transformer
from heron.core.config import MoEConfig
from heron.tokenizer import train_tokenizer

TASK = RepeatTask()
MAX_LEN = 48
ROUTING = {"moe_balance_loss", "moe_z_loss", "moe_max_load_over_fair", "moe_dropped_fraction", "moe_router_entropy"}


@pytest.fixture(scope="module")
def tokenizer():
    chats = TASK.sft_chats(64, seed=0)
    return train_tokenizer([m["content"] for c in chats for m in c] * 2, vocab_size=300, progress=False)


def model(tokenizer, moe: bool, head: str = "lm") -> Transformer:
    torch.manual_seed(0)
    extra = {"feed_forward": ("moe",), "moe": MoEConfig(n_experts=4, top_k=2, aux_loss_coef=0.1)} if moe else {}
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=MAX_LEN,
                         head=head, tie_embeddings=head == "lm", **extra)
    return Transformer(config).train()


@pytest.fixture(scope="module")
def data(tokenizer):
    chats = TASK.sft_chats(8, seed=1)
    replies = encode_replies(tokenizer, [c[:-1] for c in chats], [c[-1]["content"] for c in chats], MAX_LEN)
    return replies, encode_pairs(tokenizer, TASK.preference_pairs(8, seed=2), MAX_LEN)


def aux_of(net: Transformer, replies: Replies, counted: bool = True) -> torch.Tensor:
    """The aux loss of a forward over the replies, their padding counted or (as alignment
    does) not."""
    return net(replies.ids, token_mask=replies.tokens() if counted else None).aux_loss.float()


def test_logprobs_and_aux_are_the_forward_s_log_probs_and_aux_loss(tokenizer, data):
    replies, _ = data
    for moe in (True, False):
        net = model(tokenizer, moe)
        logprobs, aux = logprobs_and_aux(net, replies.ids, replies.mask, token_mask=replies.tokens())
        # This model does not centre its routing, so counting the padding or not moves no log-prob.
        assert torch.equal(logprobs, sequence_logprobs(net, replies.ids, replies.mask))
        assert torch.equal(aux, aux_of(net, replies))
        assert (float(aux.detach()) > 0) == moe  # a dense model's aux loss is zero


@pytest.mark.parametrize("moe", [True, False])
def test_sft_adds_the_aux_loss_and_reports_routing(tokenizer, data, moe):
    replies, _ = data
    net = model(tokenizer, moe)
    rows = torch.arange(6)
    losses, metrics = sft_objective(net, replies)(rows)
    _, mean, _ = reply_logprobs(net, replies.take(rows))
    torch.testing.assert_close(losses, aux_of(net, replies.take(rows)) - mean, rtol=0, atol=0)
    assert set(metrics) == (ROUTING if moe else set())
    if moe:
        assert metrics["moe_max_load_over_fair"].shape == (6,) and float(metrics["moe_max_load_over_fair"][0]) >= 1


def test_the_aux_loss_leaves_the_padding_out(tokenizer, data):
    """Right padding holds no reply token and, token_mask from `Replies.tokens`, weighs
    nothing in the balancing losses: whatever it holds, the SFT losses are the same."""
    replies, _ = data
    net = model(tokenizer, moe=True)
    real = replies.tokens()
    assert not real.all() and torch.equal(real.sum(1), replies.last + 1)
    refilled = Replies(torch.where(real, replies.ids, (replies.ids + 7) % tokenizer.vocab_size), replies.mask,
                       replies.last)
    rows = torch.arange(len(replies))
    losses = [sft_objective(net, r)(rows)[0] for r in (replies, refilled)]
    torch.testing.assert_close(losses[0], losses[1])
    assert not torch.equal(aux_of(net, replies, counted=False), aux_of(net, refilled, counted=False))


@pytest.mark.parametrize("kind", ["dpo", "simpo", "kto", "reward"])
def test_preference_objectives_add_the_aux_loss_of_their_forwards(tokenizer, data, kind):
    """The same objective on the same weights with the balancing coefficients at zero, plus
    the aux loss of the forward(s) the objective ran (the reward model runs one a side)."""
    _, (chosen, rejected) = data
    rows = torch.arange(4)
    net = model(tokenizer, moe=True, head="scalar" if kind == "reward" else "lm")
    build = {
        "dpo": lambda m: preference_objective(m, chosen, rejected, "dpo", beta=0.1, sft_weight=0.5,
                                              reference=(torch.zeros(len(chosen)), torch.zeros(len(rejected)))),
        "simpo": lambda m: preference_objective(m, chosen, rejected, "simpo", beta=2.0),
        "kto": lambda m: kto_objective(m, chosen, torch.tensor([True, False] * 4), torch.zeros(len(chosen))),
        "reward": lambda m: reward_objective(m, chosen, rejected),
    }[kind]
    forwards = {"kto": [chosen.take(rows)], "reward": [chosen.take(rows), rejected.take(rows)]}.get(
        kind, [chosen.take(rows).concat(rejected.take(rows))])
    aux = sum(aux_of(net, replies) for replies in forwards) / len(forwards)
    losses, metrics = build(net)(rows)
    plain, plain_metrics = build(_without_aux(net))(rows)
    assert float(aux.detach()) > 0
    torch.testing.assert_close(losses, plain + aux)
    assert ROUTING <= set(metrics) and set(metrics) - ROUTING == set(plain_metrics) - ROUTING


def test_grpo_updates_a_moe_policy_through_its_aux_loss(tokenizer):
    """Every reward equal: zero advantages, and at the first update the policy is its own
    old policy, so the surrogate's gradient is zero; the KL term's is zero too with beta 0.
    What moves the policy is the balancing loss alone: every router moves, and the last
    layer's experts and the final norm, which no router reads, stay where they were."""
    policy = model(tokenizer, moe=True)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    prompts = [c[:-1] for c in TASK.sft_chats(2, seed=3)]
    grpo(policy, model(tokenizer, moe=True).eval(), tokenizer, prompts, lambda _p, _t: 1.0,
         GRPOSettings(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, beta=0.0, lr=1e-2,
                      progress=False))
    moved = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert {"blocks.0.mlp.router.weight", "blocks.1.mlp.router.weight"} <= moved
    assert not moved & {"blocks.1.mlp.up", "blocks.1.mlp.down", "norm.weight"}


def _without_aux(net: Transformer) -> Transformer:
    """`net` with its balancing coefficients at zero: the same forward, aux loss 0."""
    config = net.config.replace(moe=dataclasses.replace(net.config.moe, aux_loss_coef=0.0, z_loss_coef=0.0))
    plain = Transformer(config).train()
    plain.load_state_dict(net.state_dict())
    return plain
