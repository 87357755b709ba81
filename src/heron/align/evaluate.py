"""Scoring a policy on a task: its replies to prompts, generated with Heron's own engine."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from heron.core.transformer import Transformer
from heron.generate import Generator, SamplingParams
from heron.tokenizer import Tokenizer

Messages = list[dict[str, str]]


def replies(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[Messages], *, max_new_tokens: int = 32,
            temperature: float = 1.0, seed: int | None = 0) -> list[str]:
    """One reply per chat prompt, ending at the tokenizer's end-of-turn; sampled unless temperature is 0."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            stop_token_ids=tokenizer.chat_stop_ids)
    was_training = model.training
    model.eval()
    try:
        return Generator(model, tokenizer).generate([tokenizer.chat_prompt_ids(p) for p in prompts], params)
    finally:
        model.train(was_training)


def judge_scores(judge: Callable[[Messages, str], float], prompts: Sequence[Messages],
                 texts: Sequence[str]) -> list[float]:
    return [judge(p, t) for p, t in zip(prompts, texts)]


__all__ = ["judge_scores", "replies"]
