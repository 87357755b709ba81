"""Scoring a policy on a task: its replies to prompts, generated with Heron's own engine."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from heron.align.logprobs import sequence_logprobs
from heron.align.rollout import rollout
from heron.core.modes import evaluating
from heron.core.transformer import Transformer
from heron.tokenizer import Tokenizer

Messages = list[dict[str, str]]


def replies(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[Messages], *, max_new_tokens: int = 32,
            temperature: float = 1.0, seed: int = 0) -> list[str]:
    """One reply per chat prompt, ending at the tokenizer's end-of-turn; sampled unless temperature is 0."""
    return rollout(model, tokenizer, prompts, 1, max_new_tokens=max_new_tokens, temperature=temperature,
                   seed=seed).texts


def judge_scores(judge: Callable[[Messages, str], float], prompts: Sequence[Messages],
                 texts: Sequence[str]) -> list[float]:
    return [judge(p, t) for p, t in zip(prompts, texts)]




@torch.no_grad()
def score_and_kl(policy: Transformer, reference: Transformer, tokenizer: Tokenizer, prompts: Sequence[Messages],
                 judge: Callable[[Messages, str], float], *, max_new_tokens: int = 32, seed: int = 0) -> tuple[float, float]:
    """(mean judge score, KL(policy || reference) in nats per reply) on replies sampled from the
    policy; the KL is the k1 estimate, the mean over replies of sum_t log pi - log ref. Both
    models score in eval mode, as the policy sampled: a MoE's routing then depends on no other
    row, and its running router centre stays where it was."""
    run = rollout(policy, tokenizer, prompts, 1, max_new_tokens=max_new_tokens, seed=seed)
    real = run.replies.tokens()  # (B, T): a MoE's routing statistics leave the padding out
    with evaluating(policy), evaluating(reference):
        ours = sequence_logprobs(policy, run.replies.ids, run.replies.mask, token_mask=real)
        theirs = sequence_logprobs(reference, run.replies.ids, run.replies.mask, token_mask=real)
    score = sum(judge(p, t) for p, t in zip(run.prompts, run.texts)) / len(run.texts)
    return score, float((ours - theirs).sum(1).mean())


__all__ = ["judge_scores", "replies", "score_and_kl"]
