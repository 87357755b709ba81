"""A Mixture-of-Experts policy is aligned under the routing it samples with.

Known answers: at the first step the policy is its own old policy and its reference,
so PPO's first ratio is exactly 1 and its KL exactly 0, GRPO's old log-probabilities
are the reference's, and DPO's loss is log 2 with zero implied rewards; bit for bit,
on a MoE whose router centres its input on a running mean and on one with a capacity
factor, where train-mode routing depends on the rest of the batch. No scoring or
training pass moves the running centre, and PPO and GRPO log the routing statistics
as the other objectives do.
"""
import copy
import dataclasses
import math

import pytest
import torch

import heron.align.grpo as grpo_module
import heron.align.ppo as ppo_module
from heron.align.data import encode_pairs
from heron.align.evaluate import score_and_kl
from heron.align.grpo import GRPOSettings, grpo
from heron.align.heads import with_scalar_head
from heron.align.objectives import preference_objective, reference_logprobs, routing_statistics
from heron.align.ppo import PPOSettings, ppo
from heron.align.synthetic import RepeatTask
from heron.core import ModelConfig, MoE, Transformer
from heron.core.config import MoEConfig
from heron.tokenizer import train_tokenizer

TASK = RepeatTask()
MAX_LEN = 64
ROUTING = {"moe_balance_loss", "moe_z_loss", "moe_max_load_over_fair", "moe_dropped_fraction", "moe_router_entropy"}
MOES = {  # the two ways train-mode routing depends on the batch (core/moe.py)
    "centring": MoEConfig(n_experts=4, top_k=2, shared_expert=True, router_centering=True, routed_scale=2.0,
                          aux_loss_coef=0.1),
    "capacity": MoEConfig(n_experts=4, top_k=2, capacity_factor=1.0, aux_loss_coef=0.1),
}


@pytest.fixture(scope="module")
def tokenizer():
    chats = TASK.sft_chats(64, seed=0)
    return train_tokenizer([m["content"] for c in chats for m in c] * 2, vocab_size=300, progress=False)


def moe_model(tokenizer, kind: str, **moe_changes) -> Transformer:
    """A random MoE policy in train mode; a centring one's running centre moved off zero
    by a few train-mode forwards, as pre-training leaves it."""
    torch.manual_seed(0)
    moe = dataclasses.replace(MOES[kind], **moe_changes)
    net = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                  max_seq_len=MAX_LEN, feed_forward=("dense", "moe"), moe=moe)).train()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for _ in range(3):
            net(torch.randint(0, tokenizer.vocab_size, (4, 16)))
    return net


def centres(net: Transformer) -> list[torch.Tensor]:
    return [m.router_center.clone() for m in net.modules() if isinstance(m, MoE) and m.router_center is not None]


def unchanged(before: list[torch.Tensor], net: Transformer) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, centres(net), strict=True))


@pytest.mark.parametrize("kind", MOES)
def test_ppo_first_ratio_is_one_and_first_kl_zero(tokenizer, kind, monkeypatch):
    policy = moe_model(tokenizer, kind)
    reference, value_model = copy.deepcopy(policy).eval(), with_scalar_head(policy, seed=0)
    ratios = []
    loss = ppo_module.ppo_policy_loss

    def spy(logprobs, old, advantages, mask, clip):
        ratios.append(((logprobs - old).exp() * mask).detach())
        return loss(logprobs, old, advantages, mask, clip)

    monkeypatch.setattr(ppo_module, "ppo_policy_loss", spy)
    before = centres(policy)
    rows = ppo(policy, value_model, reference, tokenizer, TASK.prompts(16, 0), TASK.judge,
               PPOSettings(steps=1, prompts_per_step=8, minibatch=4, epochs=1, max_new_tokens=12, progress=False))
    first, mask = ratios[0], ratios[0] != 0
    assert torch.equal(first[mask], torch.ones_like(first[mask]))
    assert rows[0]["kl"] == 0.0
    assert unchanged(before, policy)  # scored and trained on the running centre, which stays put
    assert set(rows[0]) >= ROUTING and rows[0]["moe_balance_loss"] > 0  # balancing losses still trained
    assert rows[0]["moe_dropped_fraction"] == 0.0  # inference routing drops nothing over capacity


@pytest.mark.parametrize("kind", MOES)
def test_grpo_old_log_probs_are_the_reference_s_at_the_first_step(tokenizer, kind, monkeypatch):
    policy = moe_model(tokenizer, kind)
    reference = copy.deepcopy(policy).eval()
    seen = []
    loss = grpo_module.grpo_loss

    def spy(logprobs, old, ref, advantages, mask, **kwargs):
        seen.append((logprobs.detach(), old, ref))
        return loss(logprobs, old, ref, advantages, mask, **kwargs)

    monkeypatch.setattr(grpo_module, "grpo_loss", spy)
    before = centres(policy)
    rows = grpo(policy, reference, tokenizer, TASK.prompts(8, 0), TASK.judge,
                GRPOSettings(steps=1, prompts_per_step=2, group_size=4, max_new_tokens=12, progress=False))
    logprobs, old, ref = seen[0]
    assert torch.equal(old, ref) and torch.equal(logprobs, old)
    assert rows[0]["kl"] == 0.0 and unchanged(before, policy)
    assert set(rows[0]) >= ROUTING and rows[0]["moe_dropped_fraction"] == 0.0


@pytest.mark.parametrize("policy_kind", ["capacity", "dense"])
def test_ppo_logs_the_value_model_s_routing_statistics_apart_from_the_policy_s(tokenizer, policy_kind, monkeypatch):
    """The value model routes its own tokens under its own balancing losses: its statistics are
    `value_moe_*`, the mean over the updates of those of its training forwards (a spy reads
    them), beside the policy's `moe_*`, which a dense policy does not have."""
    seen = []
    forward = ppo_module.values_and_aux

    def spy(value_model, ids, token_mask=None):
        out = forward(value_model, ids, token_mask)
        if torch.is_grad_enabled():  # an update's forward, not the scoring of `old_values`
            seen.append({k: float(v) for k, v in routing_statistics(value_model).items()})
        return out

    monkeypatch.setattr(ppo_module, "values_and_aux", spy)
    torch.manual_seed(0)
    policy = (moe_model(tokenizer, policy_kind) if policy_kind != "dense" else
              Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                      max_seq_len=MAX_LEN)).train())
    value_model = with_scalar_head(moe_model(tokenizer, "centring"), seed=0)
    rows = ppo(policy, value_model, copy.deepcopy(policy).eval(), tokenizer, TASK.prompts(8, 0), TASK.judge,
               PPOSettings(steps=1, prompts_per_step=8, minibatch=4, epochs=1, max_new_tokens=4, progress=False))
    value_names = {f"value_{name}" for name in ROUTING}
    assert {k for k in rows[0] if "moe_" in k} == value_names | (ROUTING if policy_kind != "dense" else set())
    assert len(seen) == 2
    for name in ROUTING:
        assert rows[0][f"value_{name}"] == pytest.approx(sum(s[name] for s in seen) / len(seen), rel=1e-6)
    assert rows[0]["value_moe_balance_loss"] > 0
    if policy_kind != "dense":
        assert rows[0]["moe_balance_loss"] != rows[0]["value_moe_balance_loss"]


def test_ppo_and_grpo_rows_of_a_dense_policy_hold_no_routing_statistics(tokenizer):
    torch.manual_seed(0)
    policy = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                     max_seq_len=MAX_LEN)).train()
    reference = copy.deepcopy(policy).eval()
    ppo_rows = ppo(policy, with_scalar_head(policy, seed=0), reference, tokenizer, TASK.prompts(8, 0), TASK.judge,
                   PPOSettings(steps=1, prompts_per_step=4, minibatch=4, epochs=1, max_new_tokens=4, progress=False))
    grpo_rows = grpo(policy, reference, tokenizer, TASK.prompts(8, 0), TASK.judge,
                     GRPOSettings(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, progress=False))
    assert not any(name.startswith("moe_") for name in (*ppo_rows[0], *grpo_rows[0]))


@pytest.mark.parametrize("kind", MOES)
def test_dpo_at_the_first_step_is_log_2_with_zero_rewards(tokenizer, kind):
    """The policy is its reference, scored as `heron align dpo` scores it (reference_logprobs,
    eval mode) and then trained in train mode. Balancing losses off: the loss is DPO's alone."""
    policy = moe_model(tokenizer, kind, aux_loss_coef=0.0, z_loss_coef=0.0)
    chosen, rejected = encode_pairs(tokenizer, TASK.preference_pairs(8, seed=2), MAX_LEN)
    reference = (reference_logprobs(policy, chosen), reference_logprobs(policy, rejected))
    policy.train()
    before = centres(policy)
    losses, metrics = preference_objective(policy, chosen, rejected, "dpo", beta=0.1, reference=reference)(
        torch.arange(8))
    assert torch.equal(losses.detach(), torch.full((8,), math.log(2)))
    assert torch.equal(metrics["reward_chosen"], torch.zeros(8))
    assert torch.equal(metrics["reward_rejected"], torch.zeros(8))
    assert unchanged(before, policy)


def test_score_and_kl_of_a_policy_against_its_copy_is_zero(tokenizer):
    """A policy left in train mode (as PPO and GRPO leave it) scores in eval mode: against an
    identical reference the KL is 0, its running centre stays put, and it is handed back in
    train mode."""
    policy = moe_model(tokenizer, "centring")
    reference = copy.deepcopy(policy).eval()
    before = centres(policy)
    _, kl = score_and_kl(policy, reference, tokenizer, TASK.prompts(8, 0), TASK.judge, max_new_tokens=8)
    assert kl == 0.0 and unchanged(before, policy) and policy.training
