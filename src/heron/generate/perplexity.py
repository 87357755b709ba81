"""Perplexity of a model on a token stream."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from heron.core.modes import evaluating
from heron.core.transformer import Transformer
from heron.data.batches import spread_evenly
from heron.data.shards import ShardedTokens
from heron.generate.engine import token_ids

# What perplexity reads windows from: anything with len() and contiguous slices.
Sliceable = np.ndarray | torch.Tensor | ShardedTokens | Sequence[int]


def window_starts(n_tokens: int, seq_len: int) -> range:
    """Starts of the non-overlapping windows over a stream of n_tokens.

    Window s reads tokens[s : s + seq_len] and predicts tokens[s + 1 : s + seq_len + 1],
    so every token after the first is predicted exactly once; the last window
    may be shorter. A range, not a list: a few batches of a billion-token split
    need not list its millions of windows.
    """
    return range(0, n_tokens - 1, seq_len)


def evaluated_windows(n_tokens: int, seq_len: int, batch_size: int, max_batches: int | None) -> list[int]:
    """Starts of the windows `perplexity` evaluates: all of them, or with
    max_batches max_batches * batch_size spread evenly over the stream
    (`heron.data.batches.spread_evenly`: not the first files alone)."""
    return spread_evenly(window_starts(n_tokens, seq_len), None if max_batches is None else max_batches * batch_size)


def perplexity(
    model: Transformer,
    tokens: Sliceable,
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

    Only the evaluated windows are read (sliced, and their ids checked, one at
    a time): a validation split of shards is never loaded whole.
    """
    if not hasattr(tokens, "__getitem__"):  # a generator, a number: refused, or a 0-D tensor refused below
        tokens = token_ids("tokens", tokens)
    n_tokens = _stream_length(tokens)
    _check_sizes(seq_len, batch_size, max_batches, model.config.max_seq_len)
    starts = evaluated_windows(n_tokens, seq_len, batch_size, max_batches)
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    total_nll, total_tokens = 0.0, 0
    with evaluating(model):
        for batch in tqdm(batches, desc="perplexity", disable=not progress):
            nll, count = _batch_nll(model, tokens, n_tokens, batch, seq_len)
            total_nll, total_tokens = total_nll + nll, total_tokens + count
    return math.exp(total_nll / total_tokens)


@torch.inference_mode()
def _batch_nll(model: Transformer, tokens: Sliceable, n_tokens: int, starts: list[int],
               seq_len: int) -> tuple[float, int]:
    """Summed NLL and number of predicted tokens for windows at `starts`."""
    device = next(model.parameters()).device
    vocab_size = model.config.vocab_size
    total, count = 0.0, 0
    # Windows of equal length share a forward; only the final one can be shorter.
    for group in _by_length(n_tokens, starts, seq_len):
        length = min(seq_len, n_tokens - 1 - group[0])
        windows = torch.stack([_window(tokens, s, length + 1, vocab_size) for s in group]).to(device)  # (B, L + 1)
        total += model(windows[:, :-1], targets=windows[:, 1:]).loss.item()  # logits never whole
        count += windows[:, 1:].numel()
    return total, count


def _by_length(n_tokens: int, starts: list[int], seq_len: int) -> list[list[int]]:
    full = [s for s in starts if s + seq_len < n_tokens]
    short = [s for s in starts if s + seq_len >= n_tokens]
    return [g for g in (full, short) if g]


def _stream_length(tokens: Sliceable) -> int:
    """How many tokens the stream holds, refusing one that is not 1-D or too short to predict a token."""
    shape = tuple(tokens.shape) if hasattr(tokens, "shape") else (len(tokens),)  # ShardedTokens: 1-D, no shape
    if len(shape) != 1:
        raise ValueError(f"tokens: expected a 1-D token stream, got shape {shape}")
    if shape[0] < 2:
        raise ValueError(f"tokens: need at least 2 tokens to predict one, got {shape[0]}")
    return shape[0]


def _window(tokens: Sliceable, start: int, size: int, vocab_size: int) -> torch.Tensor:
    """tokens[start : start + size] as a (size,) long tensor, its ids checked."""
    piece = tokens[start : start + size]
    if isinstance(piece, np.ndarray):  # a native-endian copy: torch warns on a read-only memmap view
        piece = piece.astype(piece.dtype.newbyteorder("="))
    window = token_ids("tokens", piece)
    if window.dim() != 1:
        raise ValueError(f"tokens: expected a 1-D token stream, got windows of shape {tuple(window.shape)}")
    if int(window.min()) < 0 or int(window.max()) >= vocab_size:
        raise ValueError(f"tokens: ids must lie in [0, {vocab_size})")
    return window


def _check_sizes(seq_len: int, batch_size: int, max_batches: int | None, max_seq_len: int) -> None:
    """Refuse bad sizes by name. A float (512.0 from a config) would otherwise fail in `range` or a
    slice with a TypeError naming nothing, and True pass as 1; numpy ints are ints here."""
    sizes = [("seq_len", seq_len), ("batch_size", batch_size)] + [("max_batches", max_batches)] * (
        max_batches is not None)
    for name, value in sizes:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name}: expected an int, got {value!r}")
    if not 1 <= seq_len <= max_seq_len:
        raise ValueError(f"seq_len: must be in [1, {max_seq_len}] (the model's max_seq_len), got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches: must be >= 1 or None, got {max_batches}")


__all__ = ["evaluated_windows", "perplexity", "window_starts"]
