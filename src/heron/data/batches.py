"""Packed next-token batches from one long token stream.

Training windows are drawn at random offsets (as in nanoGPT's `get_batch`),
but the offsets of step s come from a generator seeded with (seed, s) alone:
any step's batch can be recomputed without replaying earlier ones, so a
resumed run sees exactly the batches an unbroken run would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch


class TokenStream(Protocol):
    """What batching needs from tokens: a length and contiguous slices (np.ndarray, np.memmap, ShardedTokens)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice) -> np.ndarray: ...


def spread_evenly(starts: Sequence[int], count: int | None) -> list[int]:
    """`count` of `starts` evenly spaced over them, the first included, in
    order (all of them when count is None or not smaller).

    Why evaluation samples windows so rather than taking the first ones: a
    validation split is whole files one after another, so its first windows
    are its first few files (the standard library's begin with codec tables),
    on which no loss or perplexity should rest alone.
    """
    if count is not None and count < 1:
        raise ValueError(f"count must be positive, got {count}")
    n = len(starts)
    count = n if count is None else min(count, n)
    return [int(starts[i * n // count]) for i in range(count)]


def _check_length(tokens: TokenStream, seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"need at least seq_len + 1 = {seq_len + 1} tokens for one (x, y) window, got {len(tokens)}"
        )


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """Rank r's contiguous share of a global batch; the shares of ranks 0..world_size-1 tile it in order."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def epoch_rows(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Rows (batch_size,) of example indices 0..n-1 for global batch `step`: the examples
    are visited once per epoch, in an order fixed by (seed, epoch), so a batch depends on
    (seed, step) alone and a resumed run sees what the unbroken run would."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    stream = np.arange(step * batch_size, (step + 1) * batch_size)  # positions in the epoch stream
    rows = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(stream // n):
        order = np.random.default_rng([seed, int(epoch)]).permutation(n)
        here = stream // n == epoch
        rows[here] = order[stream[here] % n]
    return rows


def windows_to_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) token windows -> inputs x and targets y, each (B, T) int64; y[:, t] = x[:, t+1]."""
    w = torch.from_numpy(windows.astype(np.int64))  # (B, T+1)
    return w[:, :-1], w[:, 1:]


class PackedBatches:
    """Random-access training batches: `batch(step)` depends only on (seed, step).

    batch_size is the *global* batch. With data parallelism each rank calls
    `batch(step, rank, world_size)` and gets a contiguous block of rows of the
    same global batch. Gradient accumulation composes the same way: micro-batch
    m of rank r is `batch(step, rank=r * accum + m, world_size=world_size * accum)`.
    """

    def __init__(self, tokens: TokenStream, batch_size: int, seq_len: int, seed: int = 0) -> None:
        _check_length(tokens, seq_len)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def offsets(self, step: int) -> np.ndarray:
        """Start offsets of the global batch of `step`, shape (batch_size,)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        rng = np.random.default_rng([self.seed, step])
        # A window holds seq_len + 1 tokens, so the last valid start is len - seq_len - 1.
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (batch_size // world_size, seq_len), int64."""
        rows = self.offsets(step)[rank_slice(self.batch_size, rank, world_size)]
        windows = np.stack([self.tokens[o : o + self.seq_len + 1] for o in rows])  # (B_rank, T+1)
        return windows_to_xy(windows)


def eval_batches(
    tokens: TokenStream,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Whole non-overlapping windows in order, so no target token is scored twice;
    with max_batches, max_batches * batch_size of them spread evenly over the
    stream (`spread_evenly`).

    Window i covers tokens[i*T : i*T + T + 1]; the last batch may be smaller.
    Only whole windows are scored, as in training, so every window has shape
    (T,): the tail after the last whole window, (len(tokens) - 1) % T targets,
    is not scored (14 of 3,086 targets for 3,087 tokens at T=16).
    With world_size > 1, rank r takes windows r, r + world_size, ... of those.
    """
    _check_length(tokens, seq_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rank_slice(world_size, rank, world_size)  # validates rank / world_size
    everywhere = range(0, len(tokens) - seq_len, seq_len)
    starts = spread_evenly(everywhere, None if max_batches is None else max_batches * batch_size)[rank::world_size]
    for first in range(0, len(starts), batch_size):
        windows = np.stack([tokens[s : s + seq_len + 1] for s in starts[first : first + batch_size]])
        yield windows_to_xy(windows)
