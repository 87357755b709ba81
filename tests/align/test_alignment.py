"""Alignment on the synthetic say-the-word task, from one SFT model trained here.

Known answers: the judge prefers exactly three repetitions, which the SFT
model (trained on 1 to 5 uniformly) says only by chance. A reward model must
rank held-out pairs as the judge does (>= 90%); DPO (with the NLL anchor)
must make the policy beat the SFT model on the judge's score on at least 75%
of held-out prompts. Also: gradient accumulation changes nothing, and cached
reference log-probabilities equal recomputed ones.
"""
import copy
import statistics

import pytest
import torch

from heron.align.data import encode_pairs, encode_replies
from heron.align.evaluate import judge_scores, replies
from heron.align.grpo import GRPOSettings, grpo
from heron.align.heads import with_scalar_head
from heron.align.ppo import PPOSettings, ppo
from heron.align.loop import FitSettings, fit
from heron.align.objectives import (
    cached_reference_logprobs,
    kto_objective,
    preference_objective,
    reference_logprobs,
    reward_objective,
    rewards,
    sft_objective,
)
from heron.align.synthetic import RepeatTask, win_rate
from heron.core import ModelConfig, Transformer
from heron.tokenizer import train_tokenizer

pytestmark = pytest.mark.slow
TASK = RepeatTask()
MAX_LEN = 64
GRPO_STEPS, GRPO_LR = 200, 1e-3


@pytest.fixture(scope="module")
def sft():
    """(model, tokenizer): a 2-layer model fine-tuned on 512 chats of the task."""
    torch.manual_seed(0)
    chats = TASK.sft_chats(512, seed=0)
    tokenizer = train_tokenizer([m["content"] for c in chats for m in c] * 4, vocab_size=300, progress=False)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=MAX_LEN)
    model = Transformer(config)
    data = encode_replies(tokenizer, [c[:-1] for c in chats], [c[-1]["content"] for c in chats], MAX_LEN)
    fit(model.parameters(), sft_objective(model, data), len(data),
        FitSettings(steps=300, batch_size=16, lr=3e-3, progress=False))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def pairs(sft):
    _, tokenizer = sft
    return encode_pairs(tokenizer, TASK.preference_pairs(512, seed=2), MAX_LEN)


def held_out_scores(model: Transformer, policy: Transformer, tokenizer) -> tuple[list[float], list[float]]:
    """The judge's scores of one sampled reply per held-out prompt (200): the SFT model's, the policy's."""
    prompts = TASK.prompts(200, seed=1)
    return tuple(judge_scores(TASK.judge, prompts, replies(m, tokenizer, prompts, seed=0)) for m in (model, policy))


def test_sft_model_says_the_word_but_not_the_preferred_count(sft):
    model, tokenizer = sft
    prompts = TASK.prompts(100, seed=1)
    texts = replies(model, tokenizer, prompts, seed=0)
    counts = [len(t.split()) for t, p in zip(texts, prompts) if TASK.judge(p, t) > 0]
    assert len(counts) >= 80  # the right word, repeated
    assert counts.count(TASK.target) / len(counts) < 0.5  # three only by chance


def test_reward_model_ranks_held_out_pairs_like_the_judge(sft, pairs):
    model, tokenizer = sft
    reward_model = with_scalar_head(model)
    chosen, rejected = pairs
    fit(reward_model.parameters(), reward_objective(reward_model, chosen, rejected), len(chosen),
        FitSettings(steps=100, batch_size=16, lr=1e-3, progress=False))
    held_chosen, held_rejected = encode_pairs(tokenizer, TASK.preference_pairs(200, seed=3), MAX_LEN)
    with torch.no_grad():
        accuracy = (rewards(reward_model, held_chosen) > rewards(reward_model, held_rejected)).float().mean().item()
    assert accuracy >= 0.9


def test_dpo_beats_the_sft_model_on_the_judge(sft, pairs, tmp_path):
    model, tokenizer = sft
    chosen, rejected = pairs
    reference = cached_reference_logprobs(model, chosen, rejected, tmp_path)
    policy = copy.deepcopy(model).train()
    # 400 steps: the GEMM libraries' rounding (core/gemm.py) trains another SFT model on each CPU kind, and
    # 300 steps won 0.74-0.795 across MKL, oneDNN with MKL's weight gradients and oneDNN alone; 400: 0.78-0.82.
    history = fit(policy.parameters(),
                  preference_objective(policy, chosen, rejected, "dpo", beta=0.1, reference=reference, sft_weight=1.0),
                  len(chosen), FitSettings(steps=400, batch_size=16, lr=3e-4, progress=False))
    assert history[-1]["accuracy"] > 0.9 and history[-1]["margin"] > 0
    baseline, aligned = held_out_scores(model, policy, tokenizer)
    assert statistics.mean(aligned) > statistics.mean(baseline)
    assert win_rate(aligned, baseline) >= 0.75


def test_grpo_beats_the_sft_model_on_the_judge(sft):
    model, tokenizer = sft
    policy = copy.deepcopy(model).train()
    history = grpo(policy, model, tokenizer, TASK.prompts(256, seed=4), TASK.judge,
                   GRPOSettings(steps=GRPO_STEPS, lr=GRPO_LR, progress=False))
    first, last = (statistics.mean(r["reward"] for r in rows) for rows in (history[:10], history[-10:]))
    assert last > first
    assert all(r["kl"] >= 0 and r["rollout_tokens_per_s"] > 0 and r["entropy"] > 0 for r in history)
    assert history[-1]["entropy"] < history[0]["entropy"]  # the policy narrows onto the preferred count
    baseline, aligned = held_out_scores(model, policy, tokenizer)
    assert win_rate(aligned, baseline) >= 0.75


def test_kto_learns_from_unpaired_feedback(sft, pairs):
    """The pairs taken apart: chosen replies marked desirable, rejected ones not, no pairing.
    Win rate against the SFT model, 0.65 asserted (the task's target is DPO's): 300 steps gave
    0.75 on AVX2 hosts but 0.56 on an AVX-512 one, whose rounding trained another SFT model;
    600 steps gave it 0.83 (2026-12-02)."""
    model, tokenizer = sft
    chosen, rejected = pairs
    replies_ = chosen.concat(rejected)
    desirable = torch.arange(len(replies_)) < len(chosen)
    policy = copy.deepcopy(model).train()
    fit(policy.parameters(), kto_objective(policy, replies_, desirable, reference_logprobs(model, replies_), beta=0.1),
        len(replies_), FitSettings(steps=600, batch_size=32, lr=1e-3, progress=False))
    baseline, aligned = held_out_scores(model, policy, tokenizer)
    assert statistics.mean(aligned) > statistics.mean(baseline)
    assert win_rate(aligned, baseline) >= 0.65


def test_ppo_beats_the_sft_model_on_the_judge(sft):
    model, tokenizer = sft
    policy = copy.deepcopy(model).train()
    value_model = with_scalar_head(model)
    history = ppo(policy, value_model, model, tokenizer, TASK.prompts(256, seed=4), TASK.judge,
                  PPOSettings(steps=100, lr=3e-4, progress=False))
    first, last = (statistics.mean(r["reward"] for r in rows) for rows in (history[:10], history[-10:]))
    assert last > first and history[-1]["kl"] > 0
    baseline, aligned = held_out_scores(model, policy, tokenizer)
    assert win_rate(aligned, baseline) >= 0.75


def test_cached_reference_logprobs_equal_recomputed_ones(sft, pairs, tmp_path):
    model, _ = sft
    chosen, rejected = pairs
    first = cached_reference_logprobs(model, chosen, rejected, tmp_path)
    assert len(list(tmp_path.glob("reference-*.safetensors"))) == 1
    again = cached_reference_logprobs(model, chosen, rejected, tmp_path)  # read from the file
    fresh = (reference_logprobs(model, chosen), reference_logprobs(model, rejected))
    for a, b, c in zip(first, again, fresh):
        assert torch.equal(a, b) and torch.equal(a, c)
    rows = torch.arange(8)
    cached = preference_objective(model, chosen, rejected, reference=again)(rows)[0]
    recomputed = preference_objective(model, chosen, rejected, reference=fresh)(rows)[0]
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("kind", ["dpo", "rm"])
def test_gradient_accumulation_1x8_equals_8x1(sft, pairs, kind):
    base, _ = sft
    chosen, rejected = pairs
    reference = (reference_logprobs(base, chosen), reference_logprobs(base, rejected))
    start = base if kind == "dpo" else with_scalar_head(base)
    updated = []
    for accum in (1, 8):
        model = copy.deepcopy(start).train()
        objective = (reward_objective(model, chosen, rejected) if kind == "rm"
                     else preference_objective(model, chosen, rejected, reference=reference))
        fit(model.parameters(), objective, len(chosen),  # SGD with lr 1 and no clipping: p - grad
            FitSettings(steps=1, batch_size=8, grad_accum=accum, clip_norm=float("inf"), progress=False),
            optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
        updated.append(model.state_dict())
    for name in updated[0]:
        torch.testing.assert_close(updated[0][name], updated[1][name], rtol=0, atol=1e-6, msg=name)


def test_ppo_shuffles_its_minibatches_afresh_every_epoch(sft, monkeypatch):
    base, tokenizer = sft
    orders = []
    randperm = torch.randperm

    def recorded(*args, **kwargs):
        orders.append(randperm(*args, **kwargs).tolist())
        return torch.tensor(orders[-1])

    monkeypatch.setattr(torch, "randperm", recorded)
    policy = copy.deepcopy(base)
    ppo(policy, with_scalar_head(policy, seed=0), copy.deepcopy(base).eval(), tokenizer, TASK.prompts(16, seed=3),
        TASK.judge, PPOSettings(steps=1, prompts_per_step=8, minibatch=4, epochs=3, progress=False))
    assert len(orders) == 3 and len({tuple(order) for order in orders}) == 3


def test_a_rollout_longer_than_the_model_can_score_is_refused_up_front(sft):
    base, tokenizer = sft
    prompt = [{"role": "user", "content": "Say stone a few times. " * 40}]
    room = base.config.max_seq_len
    with pytest.raises(ValueError, match=f"max_new_tokens: the longest prompt .* max_seq_len {room}"):
        grpo(copy.deepcopy(base), base, tokenizer, [prompt, prompt], TASK.judge,
             GRPOSettings(steps=1, prompts_per_step=2, group_size=2, progress=False))
