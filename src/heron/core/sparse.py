"""Sparse attention patterns, computed over the allowed blocks only.

A pattern (`AttentionPattern` in config.py) is defined once, as an
elementwise rule on query and key positions (`allowed`). That rule is the
reference the tests hold every fast path to, and it builds the masks of the
blocks that are visited. Which blocks are visited comes from a block-level
rule (`_block_rules`): a query block visits a key block when some pair in them
may attend, so the visited set is exact up to block granularity.

Three engines, picked by kind:

- windowed (sliding): each block of BLOCK queries attends to one contiguous
  span of keys, read through an overlapping strided view of the keys; every
  block shares one (BLOCK, span) mask, which SDPA broadcasts.
- dilated: tokens of equal position mod `dilation` form a subsequence on which
  the dilated window is a plain sliding window; regroup, run windowed, undo.
- gathered (strided, fixed, bigbird): each query block gathers its visited key
  blocks (a (n_blocks, max_visited) layout) and attends under a per-block mask.

Why our own blocked SDPA rather than FlexAttention: on this CPU FlexAttention
runs only under `torch.compile` (eager flex falls back to dense scores); it
compiled for about 10 s and built its block mask in about 3 s per shape, and
then took 1.3x the windowed engine's time at 8k tokens (0.9-1.7x at 4k over
runs); benchmarks/bench_sparse.py measures both side by side. Every new
sequence length would recompile, and the windowed engine needs no warm-up, so
it is the one kept. The windowed engine is about 8x faster than dense causal
SDPA at 16k tokens because SDPA's fused CPU kernel takes a broadcast mask at
almost no cost; a per-block mask costs it 4-6x, which is what the gathered
engine pays (strided and fixed are still slower than dense there: the next
thing to speed up).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from heron.core.config import AttentionPattern

BLOCK = 64  # query block size of the windowed and gathered engines (bigbird uses its own `block`)


# --- the rule: which (query i, key j) pairs may attend -----------------------------------------


def allowed(pattern: AttentionPattern, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Bool tensor, broadcast of long positions i (queries) and j (keys): may i attend to j?"""
    d = i - j
    causal = d >= 0
    p = pattern
    if p.kind == "dense":
        return causal
    if p.kind == "sliding":
        return causal & (d < p.window)
    if p.kind == "dilated":
        return causal & (d % p.dilation == 0) & (d < p.window * p.dilation)
    if p.kind == "strided":
        return causal & ((d < p.stride) | (d % p.stride == 0))
    if p.kind == "fixed":
        return causal & ((i // p.block == j // p.block) | (j % p.block >= p.block - p.summary))
    if p.kind == "bigbird":
        qb, kb = i // p.block, j // p.block
        n_blocks = int(torch.maximum(qb.max(), kb.max())) + 1
        random = _bigbird_random(p, n_blocks)[qb.clamp(min=0), kb.clamp(min=0)]
        return causal & ((qb - kb <= p.local_blocks) | (kb < p.global_blocks) | random)
    raise ValueError(f"kind: unknown attention pattern {p.kind!r}")


def token_index(key_mask: torch.Tensor | None, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, n) or (1, n) long: each token's index among its row's real tokens
    (padding takes its predecessor's), the positions patterns are rules on."""
    if key_mask is None:
        return torch.arange(n, device=device)[None]
    return key_mask.long().cumsum(-1) - 1


def dense_mask(pattern: AttentionPattern, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, n) bool: the pattern as the explicit mask a dense implementation would use."""
    pos = torch.arange(n, device=device)
    return allowed(pattern, pos[:, None], pos[None, :])


@functools.lru_cache(maxsize=64)
def _bigbird_random(pattern: AttentionPattern, n_blocks: int) -> torch.Tensor:
    """(n_blocks, n_blocks) bool: query block q's `random_blocks` random earlier
    key blocks, drawn from those its local and global blocks miss. Row q
    depends only on (seed, q), so every sequence length agrees on it."""
    table = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    g = torch.Generator()
    for q in range(n_blocks):  # a loop over blocks, once per (pattern, length)
        candidates = torch.arange(pattern.global_blocks, max(q - pattern.local_blocks, pattern.global_blocks))
        if len(candidates) == 0 or pattern.random_blocks == 0:
            continue
        g.manual_seed(pattern.seed * 1_000_003 + q)
        pick = candidates[torch.randperm(len(candidates), generator=g)[: pattern.random_blocks]]
        table[q, pick] = True
    return table


# --- which key blocks a query block visits -----------------------------------------------------


def block_layout(pattern: AttentionPattern, n_blocks: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Visited key blocks per query block: (n_blocks, max_visited) long indices
    in increasing order, and the (n_blocks, max_visited) bool marking real
    entries (the rest pad the row and are masked out)."""
    qb = torch.arange(n_blocks)[:, None]
    kb = torch.arange(n_blocks)[None, :]
    visit = _block_rules(pattern, qb, kb, block)  # (n_blocks, n_blocks)
    counts = visit.sum(-1)  # (n_blocks,)
    width = int(counts.max())
    order = torch.sort((~visit).to(torch.uint8), dim=-1, stable=True).indices[:, :width]  # visited first
    return order, torch.arange(width)[None, :] < counts[:, None]


def _block_rules(pattern: AttentionPattern, qb: torch.Tensor, kb: torch.Tensor, block: int) -> torch.Tensor:
    """Does any (i, j) with i in query block qb and j in key block kb attend?
    i - j then ranges over [lo, hi]."""
    p = pattern
    lo, hi = (qb - kb) * block - (block - 1), (qb - kb) * block + (block - 1)
    causal = hi >= 0
    if p.kind == "strided":  # the local band, or a multiple of stride in [lo, hi]
        lo0 = lo.clamp(min=0)
        return causal & ((lo0 < p.stride) | ((hi // p.stride) * p.stride >= lo0))
    if p.kind == "fixed":
        q_first, q_last = qb * block, qb * block + block - 1
        k_first, k_last = kb * block, kb * block + block - 1
        same = (q_first // p.block <= k_last // p.block) & (k_first // p.block <= q_last // p.block)
        r = k_first % p.block  # the first summary position at or after k_first
        first_summary = torch.where(r >= p.block - p.summary, k_first, k_first + (p.block - p.summary - r))
        return causal & (same | (first_summary <= k_last))
    if p.kind == "bigbird":  # the engine's blocks are the pattern's blocks
        return allowed(p, qb * block, kb * block)
    raise ValueError(f"kind: {p.kind!r} is not computed by gathering blocks")


# --- the engines -------------------------------------------------------------------------------


def sparse_attention(
    q: torch.Tensor,  # (B, H, T, hd)
    k: torch.Tensor,  # (B, Hkv, T, hd)
    v: torch.Tensor,  # (B, Hkv, T, hd)
    pattern: AttentionPattern,
    key_mask: torch.Tensor | None = None,  # (B, T) bool, False = padding
) -> torch.Tensor:
    """Causal attention under `pattern`, equal to dense attention with
    `dense_mask(pattern, T)`; (B, H, T, hd).

    With padding, each row's real tokens are moved to the front first, so the
    pattern applies to real-token positions (as RoPE does) and padding never
    needs a mask: a real query never sees the padding moved behind it.
    """
    if key_mask is not None and not bool(key_mask.all()):
        order = torch.sort((~key_mask).to(torch.uint8), dim=-1, stable=True).indices  # (B, T) real first
        gather = lambda x: x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))  # noqa: E731
        y = sparse_attention(gather(q), gather(k), gather(v), pattern)
        return torch.empty_like(y).scatter_(2, order[:, None, :, None].expand_as(y), y)
    if q.shape[1] != k.shape[1]:  # grouped-query: the engines pair query and key heads one to one
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if pattern.kind == "dense":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if pattern.kind == "sliding":
        return _windowed(q, k, v, pattern.window)
    if pattern.kind == "dilated":
        return _dilated(q, k, v, pattern)
    return _gathered(q, k, v, pattern)


def _windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window attention (i - j < window) over overlapping key spans."""
    B, H, T, hd = q.shape
    lead = -(-(window - 1) // BLOCK) * BLOCK  # keys before a query block's first query that it may need
    if T <= lead + BLOCK:  # short: one dense call under the band mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_band(T, window, q.device))
    # Queries [0, lead) see only keys [0, lead): a small dense call.
    head = F.scaled_dot_product_attention(q[:, :, :lead], k[:, :, :lead], v[:, :, :lead], attn_mask=_band(lead, window, q.device))
    # Queries [lead, T) in blocks; block b's keys are [b * BLOCK, b * BLOCK + lead + BLOCK).
    n_blocks = -(-(T - lead) // BLOCK)
    pad = lead + n_blocks * BLOCK - T
    span = lead + BLOCK
    qt = F.pad(q[:, :, lead:], (0, 0, 0, pad)).reshape(B * H, n_blocks, BLOCK, hd)
    kt, vt = (_spans(F.pad(x, (0, 0, 0, pad)), n_blocks, span) for x in (k, v))  # (B*H, n_blocks, span, hd)
    r = torch.arange(BLOCK, device=q.device)[:, None]  # query offset in its block
    c = torch.arange(span, device=q.device)[None, :]  # key offset in the span
    shared = (r + lead - c >= 0) & (r + lead - c < window)  # (BLOCK, span): i - j = r + lead - c
    tail = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=shared)  # (B*H, n_blocks, BLOCK, hd)
    tail = tail.reshape(B, H, n_blocks * BLOCK, hd)[:, :, : T - lead]
    return torch.cat([head, tail], dim=2)


def _band(n: int, window: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool: 0 <= i - j < window."""
    pos = torch.arange(n, device=device)
    d = pos[:, None] - pos[None, :]
    return (d >= 0) & (d < window)


def _spans(x: torch.Tensor, n_blocks: int, span: int) -> torch.Tensor:
    """(B, H, L, hd) -> (B*H, n_blocks, span, hd): block b is x[:, :, b*BLOCK : b*BLOCK + span],
    an overlapping view that copies nothing."""
    B, H, L, hd = x.shape
    x = x.contiguous()
    return x.as_strided((B * H, n_blocks, span, hd), (L * hd, BLOCK * hd, hd, 1))


def _dilated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern) -> torch.Tensor:
    """Positions equal mod `dilation` form subsequences on which the dilated
    window is a sliding window of `window` tokens."""
    B, H, T, hd = q.shape
    d = pattern.dilation
    length = -(-T // d)  # per subsequence; padding lands at the end of each, after every real token

    def regroup(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, hd) -> (B, H*d, length, hd)
        x = F.pad(x, (0, 0, 0, length * d - T)).view(B, H, length, d, hd)
        return x.transpose(2, 3).reshape(B, H * d, length, hd)

    y = _windowed(regroup(q), regroup(k), regroup(v), pattern.window)  # (B, H*d, length, hd)
    return y.view(B, H, d, length, hd).transpose(2, 3).reshape(B, H, length * d, hd)[:, :, :T]


def _gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern) -> torch.Tensor:
    """Each query block attends to its visited key blocks, gathered side by side."""
    B, H, T, hd = q.shape
    block = pattern.block if pattern.kind == "bigbird" else BLOCK
    n_blocks = -(-T // block)
    pad = n_blocks * block - T
    layout, real = block_layout(pattern, n_blocks, block)  # (n_blocks, width)
    layout, real = layout.to(q.device), real.to(q.device)
    width = layout.shape[1]
    qb = F.pad(q, (0, 0, 0, pad)).reshape(B * H, n_blocks, block, hd)

    def gather(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, hd) -> (B*H, n_blocks, width*block, hd)
        blocks = F.pad(x, (0, 0, 0, pad)).reshape(B * H, n_blocks, block, hd)
        return blocks[:, layout].reshape(B * H, n_blocks, width * block, hd)

    i = (torch.arange(n_blocks, device=q.device)[:, None] * block + torch.arange(block, device=q.device))[:, :, None]
    j = (layout[:, :, None] * block + torch.arange(block, device=q.device)).reshape(n_blocks, 1, width * block)
    mask = allowed(pattern, i, j) & real.repeat_interleave(block, dim=1)[:, None, :]  # (n_blocks, block, width*block)
    y = F.scaled_dot_product_attention(qb, gather(k), gather(v), attn_mask=mask)  # (B*H, n_blocks, block, hd)
    return y.reshape(B, H, n_blocks * block, hd)[:, :, :T]


__all__ = ["BLOCK", "allowed", "block_layout", "dense_mask", "sparse_attention", "token_index"]
