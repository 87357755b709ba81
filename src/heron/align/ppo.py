"""PPO for language models, as InstructGPT did it (Ouyang et al. 2022; Ziegler et al. 2019).

Each step samples one reply per prompt (`rollout`), scores it with a reward
model or any Python callable, and turns the score into per-token rewards with
a KL penalty to the reference (`kl_penalised_rewards`); a value model (a
Transformer with a scalar head) gives the baseline for GAE. Then `epochs`
passes over the batch in minibatches optimise the clipped policy loss plus
`value_coef` times the clipped value loss. The KL coefficient is fixed or
adapted towards a target (`AdaptiveKLController`). Given a `Resumable`, it
saves its state as it goes and starts where a killed run stopped.

A Mixture-of-Experts policy (and value model) is scored and trained under
inference routing (`core.modes.inference_routing`), as it sampled and as the
reference is scored: at the first minibatch the ratio is exactly 1, and at the
first step the KL to the reference exactly 0.
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
from heron.align.losses import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_estimate,
    kl_penalised_rewards,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
)
from heron.align.objectives import routing_statistics
from heron.align.resume import Resumable, record_step
from heron.align.rollout import Reward, RewardModel, check_settings, prompt_batches, rollout, score_rollout
from heron.core.modes import inference_routing
from heron.core.transformer import Transformer
from heron.tokenizer import Tokenizer
from heron.train.loop import check_finite_update


@dataclass(frozen=True)
class PPOSettings:
    steps: int = 100
    prompts_per_step: int = 64  # on the synthetic task 32 plateaued near a 0.8 reward; 64 reached 0.95
    minibatch: int = 16
    epochs: int = 2  # passes over each rollout batch
    max_new_tokens: int = 16
    temperature: float = 1.0
    lr: float = 1e-4
    value_lr: float | None = None  # None: lr
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.5
    kl_coef: float = 0.05
    kl_target: float | None = None  # set: adapt kl_coef towards this KL (nats per reply)
    kl_horizon: int = 10_000
    gamma: float = 1.0
    lam: float = 0.95
    clip_norm: float = 1.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_settings(self, counts=("steps", "prompts_per_step", "minibatch", "epochs", "max_new_tokens",
                                     "kl_horizon"),
                       positive=("temperature", "lr", "value_lr", "clip", "value_clip", "clip_norm", "kl_target"),
                       non_negative=("value_coef", "kl_coef"), fractions=("gamma", "lam"),
                       learning_rates=("lr", "value_lr"))
        if self.prompts_per_step % self.minibatch:
            raise ValueError(f"minibatch: {self.minibatch} does not divide prompts_per_step {self.prompts_per_step}")


def values_and_aux(value_model: Transformer, ids: torch.Tensor,
                   token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T - 1): the value of each state, aligned with the log-prob of the token that
    follows it; and the forward's auxiliary loss (a MoE's balancing losses over the tokens
    of token_mask (B, T) bool, padding left out; zero for a dense model)."""
    out = value_model(ids, token_mask=token_mask)
    return out.logits[:, :-1, 0], out.aux_loss.float()


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x normalised to mean 0, std 1 over the masked positions (zero elsewhere)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def ppo(policy: Transformer, value_model: Transformer, reference: Transformer, tokenizer: Tokenizer,
        prompts: Sequence[Messages], reward: Reward | RewardModel, settings: PPOSettings,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        resume: Resumable | None = None) -> list[dict[str, float]]:
    """Train `policy` and `value_model` in place; returns one metrics row for each step this call
    ran (`resume`: saves the state as it goes and restores a saved one): reward, KL
    (nats per reply), the KL coefficient, entropy (nats per token, the mean surprisal of the
    sampled tokens), the losses, clip fraction, rollout tokens/s, a MoE policy's routing
    statistics (`moe_*`, the mean over its updates) and a MoE value model's (`value_moe_*`)."""
    params = [{"params": list(policy.parameters()), "lr": settings.lr},
              {"params": list(value_model.parameters()), "lr": settings.value_lr or settings.lr}]
    optimizer = torch.optim.AdamW(params, betas=ADAMW_BETAS, weight_decay=0.0)
    controller = (AdaptiveKLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
                  if settings.kl_target is not None else FixedKLController(settings.kl_coef))
    batches = prompt_batches(prompts, settings.prompts_per_step, settings.steps, settings.seed, "ppo.prompts_per_step")
    parts = {"policy": policy, "value_model": value_model, "optimizer": optimizer, "kl_controller": controller}
    start = resume.restore(parts) if resume is not None else 0
    temperature = settings.temperature  # replies are scored under the distribution they were sampled from
    history = []
    for step, batch in enumerate(tqdm(itertools.islice(batches, start, None), initial=start, total=settings.steps,
                                      disable=not settings.progress, desc="ppo", unit="step"), start=start):
        run = rollout(policy, tokenizer, batch, 1, max_new_tokens=settings.max_new_tokens,
                      temperature=temperature, seed=settings.seed * 100_003 + step)
        scores = score_rollout(reward, run)
        ids, mask = run.replies.ids, run.replies.mask[:, 1:]
        with torch.no_grad(), inference_routing(policy, value_model, reference):  # as sampled (module note)
            real = run.replies.tokens()  # (B, T): a MoE's routing statistics leave the padding out
            old = sequence_logprobs(policy, ids, run.replies.mask, token_mask=real, temperature=temperature)
            ref = sequence_logprobs(reference, ids, run.replies.mask, token_mask=real, temperature=temperature)
            old_values = values_and_aux(value_model, ids, real)[0] * mask
            rewards = kl_penalised_rewards(scores, old, ref, mask, controller.coef)
            advantages, returns = gae(rewards, old_values, mask, settings.gamma, settings.lam)
            advantages = whiten(advantages, mask)
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0}
        updates = 0
        # A new order every epoch and for every seed (a rerun repeats it); seed 0 keeps the orders it always had.
        shuffle = torch.Generator().manual_seed(settings.seed * 100_003 + step)
        for _ in range(settings.epochs):
            for rows in torch.randperm(len(ids), generator=shuffle).split(settings.minibatch):
                part, real_part = run.replies.mask[rows], real[rows]  # (b, T) each
                with inference_routing(policy, value_model):  # as `old` and `old_values` were scored
                    logprobs, aux = logprobs_and_aux(policy, ids[rows], part, token_mask=real_part,
                                                     temperature=temperature)
                    routing = routing_statistics(policy)
                    values, value_aux = values_and_aux(value_model, ids[rows], real_part)
                    # the value model routes its own tokens, under its own balancing losses
                    routing |= {f"value_{name}": v for name, v in routing_statistics(value_model).items()}
                policy_loss, stats = ppo_policy_loss(logprobs, old[rows], advantages[rows], mask[rows], settings.clip)
                value_loss = ppo_value_loss(values, old_values[rows], returns[rows], mask[rows], settings.value_clip)
                # the aux losses: MoE models' balancing losses, zero for dense ones
                loss = policy_loss + aux + settings.value_coef * value_loss + value_aux
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], settings.clip_norm)
                # One norm over the policy's and the value model's gradients: a NaN in either stops the
                # run before AdamW writes it into both (the update is one step of one optimiser).
                check_finite_update(step + 1, float(loss.detach()), float(norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sums["policy_loss"] += float(policy_loss.detach())
                sums["value_loss"] += float(value_loss.detach())
                sums["clip_fraction"] += float(stats["clip_fraction"])
                for name, value in routing.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                updates += 1
        kl = float((kl_estimate(old, ref, "k1") * mask).sum(1).mean())  # nats per reply
        controller.update(kl, len(ids))
        row = {"step": step + 1, "reward": float(scores.mean()), "kl": kl, "kl_coef": controller.coef,
               "entropy": float(masked_mean(-old, mask)),
               **{k: v / updates for k, v in sums.items()}, "reply_tokens": float(mask.sum(1).mean()),
               "rollout_tokens_per_s": run.tokens_per_s}
        record_step(step + 1, row, history, on_step, resume, parts)
    return history


__all__ = ["PPOSettings", "ppo", "values_and_aux", "whiten"]
