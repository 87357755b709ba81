"""Attention that also returns its log-sum-exp, differentiably.

Sparse patterns that are unions of disjoint key sets (core/sparse.py) compute
each set on its own and merge them into one softmax, which needs every part's
log-sum-exp and its gradient. `scaled_dot_product_attention` returns neither;
on CPU the fused kernel behind it does return the log-sum-exp, so
`attention_with_lse` calls it directly and supplies the backward.

Backward with a log-sum-exp gradient (Dao 2023, FlashAttention-2, alg. 2):
with P = softmax(S), dS = P * (dO V^T - D) where D = rowsum(dO * O); a
gradient g on lse = logsumexp(S) adds g * P, i.e. replaces D by D - g. The
kernel reads `out` only to form D, so appending one zero column to q, k and v
(scores and outputs unchanged) with out = 1 and dO = -g there shifts D by -g
and changes nothing else. The tests check the gradients against autograd
through a dense reference.
"""
from __future__ import annotations

from typing import Any

import torch

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def attention_with_lse(
    q: torch.Tensor,  # (N, H, Tq, hd)
    k: torch.Tensor,  # (N, H, S, hd)
    v: torch.Tensor,  # (N, H, S, hd)
    mask: torch.Tensor | None = None,  # bool, broadcastable to (N, H, Tq, S); True = may attend
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (N, H, Tq, hd), lse (N, H, Tq)) of softmax attention scaled by
    hd^-0.5. Every query row must be allowed at least one key."""
    scale = q.shape[-1] ** -0.5
    if min(q.shape[-2], k.shape[-2]) == 0:  # the CPU kernel divides by these lengths
        raise ValueError(f"attention_with_lse: empty query or key sequence ({q.shape[-2]} x {k.shape[-2]})")
    q, k, v = _autocast(q, k, v)
    if q.device.type != "cpu":
        return _explicit(q, k, v, mask, is_causal, scale)
    bias = None
    if mask is not None:  # the raw kernel takes an additive mask of the query's dtype
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return _FlashWithLSE.apply(q, k, v, bias, is_causal, scale)


class _FlashWithLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, bias, is_causal: bool, scale: float):  # noqa: ANN001, ANN205
        out, lse = _forward(q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out, grad_lse):  # noqa: ANN001, ANN205
        q, k, v, bias, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_lse is None:
            grads = _backward(grad_out, q, k, v, out, lse, 0.0, ctx.is_causal, attn_mask=bias, scale=ctx.scale)
            return (*grads, None, None, None)
        grads = _backward(
            _with_column(grad_out, -grad_lse), _with_column(q, 0.0), _with_column(k, 0.0), _with_column(v, 0.0),
            _with_column(out, 1.0), lse, 0.0, ctx.is_causal, attn_mask=bias, scale=ctx.scale,
        )
        return (*(g[..., :-1] for g in grads), None, None, None)


def _autocast(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inputs as autocast hands them to `scaled_dot_product_attention`,
    which it runs in lower precision: every floating dtype but fp64 cast to the
    autocast dtype. The raw kernel has no autocast rule of its own, and under
    autocast RoPE's fp32 tables leave q and k fp32 beside a bf16 v."""
    device = xs[0].device.type
    if not torch.is_autocast_enabled(device):
        return xs
    dtype = torch.get_autocast_dtype(device)
    return tuple(x if x.dtype == torch.float64 else x.to(dtype) for x in xs)


def _with_column(x: torch.Tensor, value: float | torch.Tensor) -> torch.Tensor:
    """x (..., hd) with one more column holding `value` (a scalar or (...,))."""
    column = value.unsqueeze(-1) if isinstance(value, torch.Tensor) else x.new_full((*x.shape[:-1], 1), value)
    return torch.cat([x, column.to(x.dtype)], dim=-1)


def _explicit(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same with materialised scores, for devices without the CPU kernel."""
    scores = (q @ k.transpose(-1, -2)) * scale  # (N, H, Tq, S)
    if is_causal:
        Tq, S = scores.shape[-2:]
        mask = torch.ones(Tq, S, dtype=torch.bool, device=q.device).tril(S - Tq) & (True if mask is None else mask)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(dim=-1)  # (N, H, Tq)
    return (scores - lse.unsqueeze(-1)).exp() @ v, lse


__all__ = ["attention_with_lse"]
