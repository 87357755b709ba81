"""Rollouts: sampled replies to chat prompts, with their ids, from Heron's own KV-cached engine.

PPO and GRPO share this: each prompt is rendered by the chat template,
continued `n` times by sampling, and every (prompt, reply) becomes a row of
`Replies` whose mask covers the sampled tokens, the end-of-turn token
included when the reply ended with one, so the policy learns when to stop.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from heron.align.data import PAD_ID, Messages, Replies
from heron.align.loop import check_learning_rate
from heron.align.objectives import rewards
from heron.core.modes import evaluating
from heron.core.transformer import Transformer
from heron.generate import Generator, SamplingParams
from heron.tokenizer import Tokenizer


@dataclass(frozen=True)
class Rollout:
    prompts: list[Messages]  # one per row (each prompt repeated n times, consecutively)
    texts: list[str]  # the replies, decoded
    replies: Replies
    tokens: int  # tokens generated
    seconds: float  # wall time of the generation

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@torch.no_grad()
def rollout(policy: Transformer, tokenizer: Tokenizer, prompts: Sequence[Messages], n: int, *,
            max_new_tokens: int, temperature: float = 1.0, seed: int = 0) -> Rollout:
    """`n` sampled replies to each prompt, generated as one batch, in eval mode; the policy is
    handed back in its mode even when generation raises."""
    heads = [tokenizer.chat_prompt_ids(p) for p in prompts for _ in range(n)]
    longest, room = max(map(len, heads)), policy.config.max_seq_len
    if longest + max_new_tokens > room:  # the scoring forward reads each whole row
        raise ValueError(f"max_new_tokens: the longest prompt ({longest} tokens) plus {max_new_tokens} new tokens "
                         f"exceeds the model's max_seq_len {room}; shorten the prompts or lower max_new_tokens")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            stop_token_ids=tokenizer.chat_stop_ids)
    start = time.perf_counter()
    with evaluating(policy):
        completions = Generator(policy, tokenizer).complete(heads, params)
    seconds = time.perf_counter() - start
    tails = [c.ids + ([c.stop_token] if c.stop_token is not None else []) for c in completions]
    width = max(len(h) + len(t) for h, t in zip(heads, tails))
    ids = torch.full((len(heads), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(heads), width)
    for i, (head, tail) in enumerate(zip(heads, tails)):
        ids[i, : len(head) + len(tail)] = torch.tensor(head + tail)
        mask[i, len(head): len(head) + len(tail)] = 1.0
    last = torch.tensor([len(h) + len(t) - 1 for h, t in zip(heads, tails)])
    return Rollout([p for p in prompts for _ in range(n)], [c.text or "" for c in completions],
                   Replies(ids, mask, last), sum(len(c.ids) + (c.stop_token is not None) for c in completions),
                   seconds)


Reward = Callable[[Messages, str], float]  # a judge of one reply's text: bool and int scores count as numbers


@dataclass(frozen=True)
class RewardModel:
    """A reward model (a policy's body under a scalar head, sharing its tokenizer) that scores a
    rollout's own rows: the tokens the policy sampled, and a reply cut off at max_new_tokens as it
    is, without the end token re-encoding its text would add (and at the length the rollout checked)."""

    model: nn.Module


def score_rollout(reward: Reward | RewardModel, run: Rollout) -> torch.Tensor:
    """(B,) float32 scores of the rollout's rows. A score that is not a finite number (a judge that
    failed and said NaN) is a ValueError naming its reply: one would make every weight NaN."""
    if isinstance(reward, RewardModel):
        with evaluating(reward.model), torch.no_grad():  # the caller's model, handed back in its mode
            scores = rewards(reward.model, run.replies).float()
    else:
        scores = torch.tensor([float(reward(p, t)) for p, t in zip(run.prompts, run.texts)], dtype=torch.float32)
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"reward: {float(scores[i])} for reply {i} ({run.texts[i][:80]!r}); a reward must be a "
                         "finite number")
    return scores


def prompt_batches(prompts: Sequence[Messages], per_step: int, steps: int, seed: int,
                   field: str = "prompts_per_step") -> Iterator[list[Messages]]:
    """`steps` batches of `per_step` distinct prompts each, drawn afresh every step (seeded);
    too few prompts is an error naming `field`."""
    if per_step > len(prompts):
        raise ValueError(f"{field}: {per_step} exceeds the {len(prompts)} prompts given (a step draws "
                         "that many distinct prompts); give more prompts or lower it")
    rng, pool = random.Random(seed), list(prompts)
    for _ in range(steps):
        yield rng.sample(pool, per_step)


def check_settings(settings: object, *, counts: Sequence[str], positive: Sequence[str] = (),
                   non_negative: Sequence[str] = (), fractions: Sequence[str] = (),
                   learning_rates: Sequence[str] = ()) -> None:
    """The checks PPO's and GRPO's settings share: ValueError naming the first field that is not
    finite, or out of its range (counts >= 1, positive > 0, non_negative >= 0, fractions in [0, 1],
    learning_rates within what AdamW's fp32 update holds: `check_learning_rate`)."""
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{field.name}: must be a finite number, got {value}")
    rules = [(counts, lambda v: v >= 1, ">= 1"), (positive, lambda v: v > 0, "> 0"),
             (non_negative, lambda v: v >= 0, ">= 0"), (fractions, lambda v: 0 <= v <= 1, "in [0, 1]")]
    for names, holds, wanted in rules:
        for name in names:
            value = getattr(settings, name)
            if value is not None and not holds(value):
                raise ValueError(f"{name}: must be {wanted}, got {value}")
    for name in learning_rates:
        if getattr(settings, name) is not None:
            check_learning_rate(name, getattr(settings, name))


__all__ = ["Rollout", "check_settings", "prompt_batches", "rollout"]
