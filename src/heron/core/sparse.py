"""Sparse attention patterns, computed over the allowed blocks only.

A pattern (`AttentionPattern` in config.py) is defined once, as an
elementwise rule on query and key positions (`allowed`). That rule is the
reference the tests hold every fast path to, and it builds the masks of the
blocks that are visited. Which blocks BigBird visits comes from a
block-level rule (`_block_rules`), exact because its blocks are the engine's.

The engines, picked by kind, each built on one fused SDPA kernel call per part:

- windowed (sliding): each block of BLOCK queries attends to one contiguous
  span of keys, read through an overlapping strided view of the keys; every
  block shares one (BLOCK, span) mask, which the kernel broadcasts.
- dilated: tokens of equal position mod `dilation` form a subsequence on which
  the dilated window is a plain sliding window; regroup, run windowed, undo.
- strided and fixed: unions of two disjoint key sets, each a plain causal or
  windowed attention after regrouping; merged through their log-sum-exps
  (core/flash.py), so no key outside the pattern is ever scored.
- gathered (bigbird): each query block gathers its visited key blocks (a
  (n_blocks, max_visited) layout) and attends under a per-block mask.

Why our own blocked SDPA rather than FlexAttention: on this CPU FlexAttention
runs only under `torch.compile` (eager flex falls back to dense scores); it
compiled for 4-10 s and built its block mask in about 3 s per shape, and then
took 1.3-1.4x the windowed engine's time at 8k tokens (0.9-1.7x at 4k over
runs); benchmarks/bench_sparse.py measures both side by side. Every new
sequence length would recompile, and the windowed engine needs no warm-up, so
it is the one kept. The windowed engine is about 10x faster than dense causal
SDPA at 16k tokens because SDPA's fused CPU kernel takes a broadcast mask at
almost no cost; a per-block mask costs it 4-6x, which only the gathered
engine pays.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from heron.core.config import AttentionPattern
from heron.core.flash import attention_with_lse

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
    """Does any (i, j) with i in query block qb and j in key block kb attend?"""
    p = pattern
    if p.kind == "bigbird":  # the engine's blocks are the pattern's blocks
        return allowed(p, qb * block, kb * block)  # blocks are the pattern's: exact
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
        return _windowed(q, k, v, pattern.window)[0]
    if pattern.kind == "dilated":
        return _dilated(q, k, v, pattern)
    if pattern.kind == "strided":
        return _strided(q, k, v, pattern.stride)
    if pattern.kind == "fixed":
        return _fixed(q, k, v, pattern)
    return _gathered(q, k, v, pattern)


def _windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window attention (0 <= i - j < window) over overlapping key spans:
    (out (B, H, T, hd), lse (B, H, T))."""
    B, H, T, hd = q.shape
    lead = -(-(window - 1) // BLOCK) * BLOCK  # keys before a query block's first query that it may need
    if T <= lead + BLOCK:  # short: one dense call under the band mask
        return attention_with_lse(q, k, v, _band(T, window, q.device))
    # Queries [lead, T) in blocks; block b's keys are [b * BLOCK, b * BLOCK + lead + BLOCK).
    n_blocks = -(-(T - lead) // BLOCK)
    pad = lead + n_blocks * BLOCK - T
    span = lead + BLOCK
    qt = F.pad(q[:, :, lead:], (0, 0, 0, pad)).reshape(B * H, n_blocks, BLOCK, hd)
    kt, vt = (_spans(F.pad(x, (0, 0, 0, pad)), n_blocks, span) for x in (k, v))  # (B*H, n_blocks, span, hd)
    r = torch.arange(BLOCK, device=q.device)[:, None]  # query offset in its block
    c = torch.arange(span, device=q.device)[None, :]  # key offset in the span
    shared = (r + lead - c >= 0) & (r + lead - c < window)  # (BLOCK, span): i - j = r + lead - c
    tail, tail_lse = attention_with_lse(qt, kt, vt, shared)  # (B*H, n_blocks, BLOCK, hd), (B*H, n_blocks, BLOCK)
    tail = tail.reshape(B, H, n_blocks * BLOCK, hd)[:, :, : T - lead]
    tail_lse = tail_lse.reshape(B, H, n_blocks * BLOCK)[:, :, : T - lead]
    if lead == 0:  # window 1: no query looks back
        return tail, tail_lse
    # Queries [0, lead) see only keys [0, lead): a small dense call.
    head, head_lse = attention_with_lse(q[:, :, :lead], k[:, :, :lead], v[:, :, :lead], _band(lead, window, q.device))
    return torch.cat([head, tail], dim=2), torch.cat([head_lse, tail_lse], dim=2)


def _band(n: int, window: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool: 0 <= i - j < window."""
    pos = torch.arange(n, device=device)
    d = pos[:, None] - pos[None, :]
    return (d >= 0) & (d < window)


def _spans(x: torch.Tensor, n_blocks: int, span: int) -> torch.Tensor:
    """(B, H, L, hd) -> (B*H, n_blocks, span, hd): block b is x[:, :, b*BLOCK : b*BLOCK + span]."""
    return _Spans.apply(x, n_blocks, span)


class _Spans(torch.autograd.Function):
    """Overlapping key spans. Autograd's generic backward for an overlapping
    `as_strided` view scatters through the whole storage and took half of a
    sliding-window training step; spans are whole blocks, so the gradient of
    a block is the sum of its span_blocks copies: one add per offset."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n_blocks: int, span: int) -> torch.Tensor:  # noqa: ANN001
        B, H, L, hd = x.shape
        ctx.shape = x.shape
        return x.contiguous().as_strided((B * H, n_blocks, span, hd), (L * hd, BLOCK * hd, hd, 1))  # no copy

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        B, H, L, hd = ctx.shape
        n_blocks, span = grad.shape[1], grad.shape[2]
        per_span = span // BLOCK
        grad = grad.reshape(B * H, n_blocks, per_span, BLOCK, hd)
        blocks = grad.new_zeros(B * H, L // BLOCK, BLOCK, hd)
        for t in range(per_span):  # a loop over block offsets, at most window / BLOCK + 1
            blocks[:, t : t + n_blocks] += grad[:, :, t]
        return blocks.reshape(B, H, L, hd), None, None


def _dilated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern) -> torch.Tensor:
    """Positions equal mod `dilation` form subsequences on which the dilated
    window is a sliding window of `window` tokens."""
    T = q.shape[2]
    d = pattern.dilation
    out, _ = _windowed(*(_by_residue(x, d).flatten(1, 2) for x in (q, k, v)), pattern.window)  # (B, H*d, rows, hd)
    return _from_residue(out.unflatten(1, (q.shape[1], d)), T)


# Strided and fixed are unions of two disjoint key sets, each of which is a
# plain causal (or windowed) attention once the sequence is regrouped (Child
# et al. 2019, sec. 4.3, do the same with their kernels). Each part runs as
# one fused call that also returns its log-sum-exp, and the parts are merged
# into one softmax over the union: out = sum_p exp(lse_p - lse) out_p.


def _merge(*parts: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One softmax over the union of disjoint key sets, from each set's (out, lse)."""
    total = torch.stack([lse for _, lse in parts]).logsumexp(dim=0)  # (B, H, T)
    return sum((lse - total).exp().unsqueeze(-1) * out for out, lse in parts)


def _by_residue(x: torch.Tensor, period: int) -> torch.Tensor:
    """(B, H, T, hd) -> (B, H, period, ceil(T / period), hd): position t goes to
    [t % period, t // period]; padding lands after every real token."""
    B, H, T, hd = x.shape
    rows = -(-T // period)
    return F.pad(x, (0, 0, 0, rows * period - T)).reshape(B, H, rows, period, hd).transpose(2, 3)


def _from_residue(x: torch.Tensor, T: int) -> torch.Tensor:
    """Inverse of `_by_residue`; also for (B, H, period, rows) log-sum-exps."""
    B, H, period, rows = x.shape[:4]
    return x.transpose(2, 3).reshape(B, H, period * rows, *x.shape[4:])[:, :, :T]


def _later_rows(part: tuple[torch.Tensor, torch.Tensor], skipped: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put back `skipped` leading rows (along `dim` of lse) that saw no keys:
    out 0 and lse -inf, so they weigh nothing in `_merge`."""
    out, lse = part
    out = torch.cat([out.new_zeros(*out.shape[:dim], skipped, *out.shape[dim + 1 :]), out], dim=dim)
    lse = torch.cat([lse.new_full((*lse.shape[:dim], skipped, *lse.shape[dim + 1 :]), float("-inf")), lse], dim=dim)
    return out, lse


def _strided(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stride: int) -> torch.Tensor:
    """Local band i - j < stride, plus the columns i - j = m * stride (m >= 1):
    the strictly earlier members of i's residue class mod stride, which is
    causal attention from rows 1.. to rows ..-1 of that class."""
    B, H, T, hd = q.shape
    local = _windowed(q, k, v, stride)
    if T <= stride:
        return local[0]
    qr, kr, vr = (_by_residue(x, stride).flatten(1, 2) for x in (q, k, v))  # (B, H*stride, rows, hd)
    columns = _later_rows(attention_with_lse(qr[:, :, 1:], kr[:, :, :-1], vr[:, :, :-1], is_causal=True), 1, dim=2)
    out, lse = (x.unflatten(1, (H, stride)) for x in columns)
    return _merge(local, (_from_residue(out, T), _from_residue(lse, T)))


def _fixed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern) -> torch.Tensor:
    """Causal attention inside i's block, plus the last `summary` keys of every
    earlier block: block b's queries see the first b * summary of that list."""
    B, H, T, hd = q.shape
    block, summary = pattern.block, pattern.summary
    n_blocks = -(-T // block)
    qb, kb, vb = (F.pad(x, (0, 0, 0, n_blocks * block - T)).reshape(B, H * n_blocks, block, hd) for x in (q, k, v))
    out, lse = attention_with_lse(qb, kb, vb, is_causal=True)  # (B, H*n_blocks, block, ...)
    own = out.reshape(B, H, -1, hd)[:, :, :T], lse.reshape(B, H, -1)[:, :, :T]
    if n_blocks == 1:
        return own[0]
    # The summaries of blocks 0 .. n_blocks - 2: full blocks, all before T.
    offsets = torch.arange(block - summary, block, device=q.device)
    keys = (torch.arange(n_blocks - 1, device=q.device)[:, None] * block + offsets).flatten()  # (S,)
    later = qb.reshape(B * H, n_blocks, block, hd)[:, 1:]  # (B*H, n_blocks-1, block, hd): blocks that have summaries
    ks, vs = (x[:, :, keys].reshape(B * H, 1, -1, hd).expand(-1, n_blocks - 1, -1, -1) for x in (k, v))
    visible = keys // block < torch.arange(1, n_blocks, device=q.device)[None, :, None, None]  # (1, n_blocks-1, 1, S)
    out, lse = _later_rows(attention_with_lse(later, ks, vs, visible), 1, dim=1)  # (B*H, n_blocks, block, ...)
    return _merge(own, (out.reshape(B, H, -1, hd)[:, :, :T], lse.reshape(B, H, -1)[:, :, :T]))


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
