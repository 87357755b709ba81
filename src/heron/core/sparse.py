"""Sparse attention patterns, computed over the allowed blocks only.

A pattern (`AttentionPattern` in config.py) is defined once, as an
elementwise rule on query and key positions (`allowed`). That rule is the
reference the tests hold every fast path to, and the masks the engines use
are its restrictions to the blocks they visit.

The engines, picked by kind, each built on one fused SDPA kernel call per part:

- windowed (sliding): each block of BLOCK queries attends to one contiguous
  span of keys, read through an overlapping strided view of the keys; every
  block shares one (BLOCK, span) mask, which the kernel broadcasts.
- dilated: tokens of equal position mod `dilation` form a subsequence on which
  the dilated window is a plain sliding window; regroup, run windowed, undo.
- strided and fixed: unions of two disjoint key sets, each a plain causal or
  windowed attention after regrouping; merged through their log-sum-exps
  (core/flash.py), so no key outside the pattern is ever scored.
- bigbird: three disjoint parts merged the same way: the local blocks (a
  block-aligned window), the global blocks beyond the window, and each query
  block's random blocks, gathered; every mask is broadcast over the queries
  of a block.

Why our own blocked SDPA rather than FlexAttention on CPUs: there FlexAttention
runs only under `torch.compile` (eager flex falls back to dense scores); it
compiled for 4-26 s and built its block mask in 2-3 s per shape, and then
took 1.2-1.5x the windowed engine's time at 8k tokens (1.18x on the Zen 4
host, 2026-12-03; 0.9-1.7x at 4k over runs); benchmarks/bench_sparse.py
measures both side by side. Every new
sequence length would recompile, and the windowed engine needs no warm-up, so
it is the one kept. The windowed engine is about 10x faster than dense causal
SDPA at 16k tokens because SDPA's fused CPU kernel takes a broadcast mask at
almost no cost, while a mask that differs per query costs it 4-6x: every
engine here is arranged so that its masks broadcast.

On CUDA devices the balance is the other way, so there every pattern runs
through compiled FlexAttention (`flex_sparse_attention`), its block mask built
from the same rule. On an H200 (bf16, 8 heads of 64, window 512, forward) the
blocked engines took 2.1 ms at 16k tokens, 2.9x dense causal SDPA's flash
kernel, since off the CPU `attention_with_lse` materialises each block's
scores; FlexAttention took 0.22 ms, a tenth (benchmarks/bench_gpu.py).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from heron.core.config import AttentionPattern
from heron.core.flash import attention_with_lse

BLOCK = 64  # query block size of the windowed engine (bigbird uses its own `block`)


# --- the rule: which (query i, key j) pairs may attend -----------------------------------------


def allowed(
    pattern: AttentionPattern, i: torch.Tensor, j: torch.Tensor, random_blocks: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool tensor, broadcast of long positions i (queries) and j (keys): may i attend to j?

    random_blocks: bigbird's table of random blocks (`_bigbird_random`) covering
    every position given, on their device; drawn here when not given.
    """
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
        if random_blocks is None:  # at least one block: padding alone has index -1, read as block 0 below
            last = int(torch.maximum(qb.max(), kb.max()).clamp(min=0))
            random_blocks = _bigbird_random(p, last + 1).to(i.device)
        random = random_blocks[qb.clamp(min=0), kb.clamp(min=0)]
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
    if q.is_cuda and pattern.kind != "dense":
        return flex_sparse_attention(q, k, v, pattern)
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
    return _bigbird(q, k, v, pattern)


def flex_sparse_attention(
    q: torch.Tensor,  # (B, H, T, hd)
    k: torch.Tensor,  # (B, Hkv, T, hd)
    v: torch.Tensor,  # (B, Hkv, T, hd)
    pattern: AttentionPattern,
    kernel: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """The pattern through FlexAttention, the engine on GPUs: a block mask
    built from `allowed` lets the kernel skip every block with no allowed
    pair, and apply the rule itself inside the partly allowed ones.

    kernel: `flex_attention` as called; by default compiled, without which it
    scores every pair (the tests pass the eager one to check the mask on CPU).
    """
    block_mask = _block_mask(pattern, q.shape[2], q.device)
    kernel = kernel or _compiled_flex()
    return kernel(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=32)
def _block_mask(pattern: AttentionPattern, n: int, device: torch.device):  # noqa: ANN202 - flex's BlockMask
    """FlexAttention's block mask of the pattern at length n, built once per (pattern, length, device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    table = _bigbird_random(pattern, -(-n // pattern.block)).to(device) if pattern.kind == "bigbird" else None

    def rule(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - flex's mask_mod signature
        return allowed(pattern, q_idx, kv_idx, table)

    return create_block_mask(rule, None, None, n, n, device=device)


def _windowed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int = BLOCK, lead: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with 0 <= i - j < window over overlapping key spans: each
    block of `block` queries sees the `lead` keys before it and its own block
    (lead defaults to the window rounded up to blocks). (out (B, H, T, hd), lse (B, H, T))."""
    B, H, T, hd = q.shape
    if lead is None:
        lead = -(-(window - 1) // block) * block  # keys before a query block's first query that it may need
    if T <= lead + block:  # short: one dense call under the band mask
        return attention_with_lse(q, k, v, _band(T, window, q.device))
    # Queries [lead, T) in blocks; block b's keys are [b * block, b * block + lead + block).
    n_blocks = -(-(T - lead) // block)
    pad = lead + n_blocks * block - T
    span = lead + block
    qt = F.pad(q[:, :, lead:], (0, 0, 0, pad)).reshape(B * H, n_blocks, block, hd)
    kt, vt = (_spans(F.pad(x, (0, 0, 0, pad)), n_blocks, span, block) for x in (k, v))  # (B*H, n_blocks, span, hd)
    r = torch.arange(block, device=q.device)[:, None]  # query offset in its block
    c = torch.arange(span, device=q.device)[None, :]  # key offset in the span
    shared = (r + lead - c >= 0) & (r + lead - c < window)  # (block, span): i - j = r + lead - c
    tail, tail_lse = attention_with_lse(qt, kt, vt, shared)  # (B*H, n_blocks, block, hd), (B*H, n_blocks, block)
    tail = tail.reshape(B, H, n_blocks * block, hd)[:, :, : T - lead]
    tail_lse = tail_lse.reshape(B, H, n_blocks * block)[:, :, : T - lead]
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


def _spans(x: torch.Tensor, n_blocks: int, span: int, block: int) -> torch.Tensor:
    """(B, H, L, hd) -> (B*H, n_blocks, span, hd): block b is x[:, :, b*block : b*block + span]."""
    return _Spans.apply(x, n_blocks, span, block)


class _Spans(torch.autograd.Function):
    """Overlapping key spans. Autograd's generic backward for an overlapping
    `as_strided` view scatters through the whole storage and took half of a
    sliding-window training step; spans are whole blocks, so the gradient of
    a block is the sum of its span_blocks copies: one add per offset."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n_blocks: int, span: int, block: int) -> torch.Tensor:  # noqa: ANN001
        B, H, L, hd = x.shape
        ctx.shape, ctx.block = x.shape, block
        return x.contiguous().as_strided((B * H, n_blocks, span, hd), (L * hd, block * hd, hd, 1))  # no copy

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # noqa: ANN001
        B, H, L, hd = ctx.shape
        block = ctx.block
        n_blocks, span = grad.shape[1], grad.shape[2]
        per_span = span // block
        grad = grad.reshape(B * H, n_blocks, per_span, block, hd)
        blocks = grad.new_zeros(B * H, L // block, block, hd)
        for t in range(per_span):  # a loop over block offsets, at most window / block + 1
            blocks[:, t : t + n_blocks] += grad[:, :, t]
        return blocks.reshape(B, H, L, hd), None, None, None


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
    """One softmax over the union of disjoint key sets, from each set's (out, lse).

    The CPU kernel's lse is fp32 whatever its inputs, which makes the weighted
    sum fp32; it goes back to the parts' dtype, as the windowed engines return."""
    total = torch.stack([lse for _, lse in parts]).logsumexp(dim=0)  # (B, H, T)
    return sum((lse - total).exp().unsqueeze(-1) * out for out, lse in parts).to(parts[0][0].dtype)


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


def _bigbird(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern) -> torch.Tensor:
    """Three disjoint parts, merged by log-sum-exp: the local blocks (a
    block-aligned window over spans), the global blocks a query block's window
    does not reach, and its random blocks, gathered."""
    B, H, T, hd = q.shape
    block, local = pattern.block, pattern.local_blocks
    n_blocks = -(-T // block)
    lead = local * block
    parts = [_windowed(q, k, v, lead + block, block=block, lead=lead)]  # j in blocks qb - local .. qb, j <= i
    pad = n_blocks * block - T
    qb, kb, vb = (F.pad(x, (0, 0, 0, pad)).reshape(B * H, n_blocks, block, hd) for x in (q, k, v))
    first = local + 1  # the first query block whose window misses block 0
    n_global = min(pattern.global_blocks, n_blocks)
    if n_global and first < n_blocks:
        keys, values = (x[:, :n_global].reshape(B * H, 1, n_global * block, hd) for x in (kb, vb))
        reach = torch.arange(first, n_blocks, device=q.device)[None, :, None, None] - local  # global blocks < reach
        visible = torch.arange(n_global * block, device=q.device) // block < reach  # (1, n_q, 1, n_global*block)
        part = attention_with_lse(qb[:, first:], keys.expand(-1, n_blocks - first, -1, -1),
                                  values.expand(-1, n_blocks - first, -1, -1), visible)
        parts.append(_blocks_to_sequence(_later_rows(part, first, dim=1), B, H, T))
    chosen = _bigbird_random(pattern, n_blocks).to(q.device)  # (n_blocks, n_blocks)
    counts = chosen.sum(-1)  # (n_blocks,)
    if int(counts.max()) > 0:
        start = int((counts == 0).sum())  # blocks without random picks: a prefix (candidates grow with qb)
        width = int(counts.max())
        picks = torch.sort((~chosen[start:]).to(torch.uint8), dim=-1, stable=True).indices[:, :width]  # (n_q, width)
        valid = torch.arange(width, device=q.device) < counts[start:, None]  # (n_q, width)
        keys, values = (x[:, picks].reshape(B * H, n_blocks - start, width * block, hd) for x in (kb, vb))
        visible = valid.repeat_interleave(block, dim=1)[None, :, None, :]  # (1, n_q, 1, width*block)
        part = attention_with_lse(qb[:, start:], keys, values, visible)
        parts.append(_blocks_to_sequence(_later_rows(part, start, dim=1), B, H, T))
    return _merge(*parts)


def _blocks_to_sequence(part: tuple[torch.Tensor, torch.Tensor], B: int, H: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*H, n_blocks, block, ...) out and lse -> (B, H, T, ...)."""
    out, lse = part
    return out.reshape(B, H, -1, out.shape[-1])[:, :, :T], lse.reshape(B, H, -1)[:, :, :T]


__all__ = ["BLOCK", "allowed", "dense_mask", "flex_sparse_attention", "sparse_attention", "token_index"]
