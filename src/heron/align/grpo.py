"""GRPO (Shao et al. 2024, DeepSeekMath): policy optimisation from groups of sampled replies.

Each step samples `group_size` replies to each of `prompts_per_step` prompts,
scores them with any Python callable, normalises the scores within each
group (no value model), and takes `inner_steps` gradient steps on the
clipped surrogate with a k3 KL penalty to the reference (`losses.grpo_loss`).
Given a `Resumable`, it saves its state as it goes and starts where a killed
run stopped. A Mixture-of-Experts policy is scored and trained under inference
routing (`core.modes.inference_routing`), as it sampled and as the reference is
scored: at the first step its old log-probabilities are the reference's exactly.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from heron.align.data import Messages
from heron.align.logprobs import logprobs_and_aux, sequence_logprobs
from heron.align.loop import ADAMW_BETAS
from heron.align.losses import grpo_advantages, grpo_loss, masked_mean
from heron.align.objectives import routing_statistics
from heron.align.resume import Resumable, record_step
from heron.align.rollout import Reward, RewardModel, check_settings, prompt_batches, rollout, score_rollout
from heron.core.modes import inference_routing
from heron.core.transformer import Transformer
from heron.tokenizer import Tokenizer
from heron.train.loop import check_finite_update


@dataclass(frozen=True)
class GRPOSettings:
    steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    lr: float = 1e-4
    beta: float = 0.04  # weight of the KL to the reference
    clip: float = 0.2
    inner_steps: int = 1  # gradient steps per rollout (1: the ratio is 1 and clipping is idle)
    clip_norm: float = 1.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_settings(self, counts=("steps", "prompts_per_step", "group_size", "max_new_tokens", "inner_steps"),
                       positive=("temperature", "lr", "clip", "clip_norm"), non_negative=("beta",),
                       learning_rates=("lr",))
        if self.group_size < 2:  # advantages are normalised within a group (grpo_advantages)
            raise ValueError(f"group_size: a group needs at least 2 replies to compare, got {self.group_size}")


def grpo(policy: Transformer, reference: Transformer, tokenizer: Tokenizer, prompts: Sequence[Messages],
         reward: Reward | RewardModel, settings: GRPOSettings,
         on_step: Callable[[dict[str, Any]], None] | None = None,
         resume: Resumable | None = None) -> list[dict[str, float]]:
    """Train `policy` in place; returns one metrics row for each step this call ran (`resume`:
    saves the state as it goes and restores a saved one): reward, KL to the reference,
    entropy (nats per token, the mean surprisal of the sampled tokens: a Monte Carlo
    estimate of the policy's entropy), rollout tokens/s, a MoE policy's routing statistics
    (`moe_*`, the mean over the inner steps), ..."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=settings.lr, betas=ADAMW_BETAS, weight_decay=0.0)
    batches = prompt_batches(prompts, settings.prompts_per_step, settings.steps, settings.seed,
                             "grpo.prompts_per_step")
    parts = {"policy": policy, "optimizer": optimizer}
    start = resume.restore(parts) if resume is not None else 0
    temperature = settings.temperature  # replies are scored under the distribution they were sampled from
    history = []
    for step, batch in enumerate(tqdm(itertools.islice(batches, start, None), initial=start, total=settings.steps,
                                      disable=not settings.progress, desc="grpo", unit="step"), start=start):
        run = rollout(policy, tokenizer, batch, settings.group_size, max_new_tokens=settings.max_new_tokens,
                      temperature=temperature, seed=settings.seed * 100_003 + step)
        scores = score_rollout(reward, run)
        advantages = grpo_advantages(scores.view(settings.prompts_per_step, settings.group_size)).flatten()
        ids, mask = run.replies.ids, run.replies.mask[:, 1:]
        real = run.replies.tokens()  # (B, T): a MoE's routing statistics leave the padding out
        with torch.no_grad(), inference_routing(policy, reference):  # as sampled (module note)
            old = sequence_logprobs(policy, ids, run.replies.mask, token_mask=real, temperature=temperature)
            ref = sequence_logprobs(reference, ids, run.replies.mask, token_mask=real, temperature=temperature)
        routing: dict[str, float] = {}
        for _ in range(settings.inner_steps):
            with inference_routing(policy):  # as `old` was scored
                logprobs, aux = logprobs_and_aux(policy, ids, run.replies.mask, token_mask=real,
                                                 temperature=temperature)
            for name, value in routing_statistics(policy).items():
                routing[name] = routing.get(name, 0.0) + float(value) / settings.inner_steps
            loss, stats = grpo_loss(logprobs, old, ref, advantages, mask, clip=settings.clip, beta=settings.beta)
            total = loss + aux  # aux: a MoE policy's balancing losses, zero for a dense one
            total.backward()
            norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), settings.clip_norm)
            check_finite_update(step + 1, float(total.detach()), float(norm))  # before AdamW spreads a NaN
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": float(loss.detach()), "reward": float(scores.mean()), "kl": float(stats["kl"]),
               "entropy": float(masked_mean(-old, mask)),
               "reply_tokens": float(mask.sum(1).mean()), "rollout_tokens_per_s": run.tokens_per_s, **routing}
        record_step(step + 1, row, history, on_step, resume, parts)
    return history


__all__ = ["GRPOSettings", "grpo"]
