"""Perplexity of a model on a token stream."""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from heron.core.modes import evaluating
from heron.core.transformer import Transformer
from heron.data.batches import spread_evenly
from heron.generate.engine import token_ids


def window_starts(n_tokens: int, seq_len: int) -> list[int]:
    """Starts of the non-overlapping windows over a stream of n_tokens.

    Window s reads tokens[s : s + seq_len] and predicts tokens[s + 1 : s + seq_len + 1],
    so every token after the first is predicted exactly once; the last window
    may be shorter.
    """
    return list(range(0, n_tokens - 1, seq_len))


def evaluated_windows(n_tokens: int, seq_len: int, batch_size: int, max_batches: int | None) -> list[int]:
    """Starts of the windows `perplexity` evaluates: all of them, or with
    max_batches max_batches * batch_size spread evenly over the stream
    (`heron.data.batches.spread_evenly`: not the first files alone)."""
    return spread_evenly(window_starts(n_tokens, seq_len), None if max_batches is None else max_batches * batch_size)


def perplexity(
    model: Transformer,
    tokens: np.ndarray | torch.Tensor,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    progress: bool = False,
) -> float:
    """exp(mean next-token negative log-likelihood), weighted by tokens.

    The stream (1-D) is cut into non-overlapping windows of seq_len inputs,
    evaluated batch_size at a time; each window starts with no context, which
    is the usual (pessimistic) convention. `max_batches` evaluates that many
    batches of windows spread evenly over the stream (`evaluated_windows`).
    The model runs in eval mode and is handed back in the mode it was in.
    """
    stream = _as_stream(tokens, model.config.vocab_size)
    _check_sizes(seq_len, batch_size, max_batches, model.config.max_seq_len)
    starts = evaluated_windows(len(stream), seq_len, batch_size, max_batches)
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    total_nll, total_tokens = 0.0, 0
    with evaluating(model):
        for batch in tqdm(batches, desc="perplexity", disable=not progress):
            nll, count = _batch_nll(model, stream, batch, seq_len)
            total_nll, total_tokens = total_nll + nll, total_tokens + count
    return math.exp(total_nll / total_tokens)


@torch.inference_mode()
def _batch_nll(model: Transformer, stream: torch.Tensor, starts: list[int], seq_len: int) -> tuple[float, int]:
    """Summed NLL and number of predicted tokens for windows at `starts`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    # Windows of equal length share a forward; only the final one can be shorter.
    for group in _by_length(stream, starts, seq_len):
        length = min(seq_len, len(stream) - 1 - group[0])
        windows = torch.stack([stream[s : s + length + 1] for s in group]).to(device)  # (B, L + 1)
        total += model(windows[:, :-1], targets=windows[:, 1:]).loss.item()  # logits never whole
        count += windows[:, 1:].numel()
    return total, count


def _by_length(stream: torch.Tensor, starts: list[int], seq_len: int) -> list[list[int]]:
    full = [s for s in starts if s + seq_len < len(stream)]
    short = [s for s in starts if s + seq_len >= len(stream)]
    return [g for g in (full, short) if g]


def _as_stream(tokens: np.ndarray | torch.Tensor, vocab_size: int) -> torch.Tensor:
    stream = token_ids("tokens", np.asarray(tokens) if isinstance(tokens, np.ndarray) else tokens)
    if stream.dim() != 1:
        raise ValueError(f"tokens: expected a 1-D token stream, got shape {tuple(stream.shape)}")
    if len(stream) < 2:
        raise ValueError(f"tokens: need at least 2 tokens to predict one, got {len(stream)}")
    if int(stream.min()) < 0 or int(stream.max()) >= vocab_size:
        raise ValueError(f"tokens: ids must lie in [0, {vocab_size})")
    return stream


def _check_sizes(seq_len: int, batch_size: int, max_batches: int | None, max_seq_len: int) -> None:
    if not 1 <= seq_len <= max_seq_len:
        raise ValueError(f"seq_len: must be in [1, {max_seq_len}] (the model's max_seq_len), got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches: must be >= 1 or None, got {max_batches}")


__all__ = ["evaluated_windows", "perplexity", "window_starts"]
