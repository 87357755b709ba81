"""Next-token cross-entropy straight from the last hidden states, without the logits.

The plain way, `F.cross_entropy(lm_head(h), y)`, keeps a (tokens, vocab)
tensor of logits alive from the forward to the backward and makes three
more of the same size on the way: the log-softmax, the zeros that the loss's
gradient scatters into, the log-softmax's gradient. On the `small` preset's
training batch (2048 tokens, vocab 8192) that is four 64 MiB buffers, each
freshly allocated and page-faulted every step; at batch 16 x 1024 with a
32k vocabulary, four of 2 GiB.

`linear_cross_entropy` instead walks the tokens in chunks: logits of one
chunk, their softmax in place, and the two gradient products (the hidden
states' and the head weight's, accumulated) before the next chunk reuses the
buffer. The gradients are made during the forward, so the backward only
scales them by the incoming gradient (the same move as Liger Kernel's fused
linear cross-entropy, Hsu et al. 2024). It does the plain way's three
matrix products and nothing more; on the CPU the rest of the head's time,
the passes over and allocations of the large buffers, mostly goes.

With `reduction="none"` it gives each position's cross-entropy, -log p(target):
the per-token log-probabilities that alignment's losses weigh one by one
(align/logprobs.py). Their incoming gradient is per token and unknown in the
forward, so the forward keeps only the losses (the softmax's normaliser is
the loss plus the target's logit) and the backward makes each chunk's logits
again: one product more than the plain way, and still no (tokens, vocab)
tensor.

The chunking, the kept rows and the gradient products are public building
blocks: distillation's loss walks the same chunks with the teacher's logits
beside the student's (compress/distill_loss.py).

Whether a head may be fused is decided in one place, `fusable_weight`: only
where the product with its weight is what the head's forward computes. Every
loss over a head goes through it; `head_cross_entropy` is the cross-entropy
that takes the fused path or the logits' by it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from heron.core.gemm import ROW_QUANTUM, linear_into
from heron.core.linear import Linear

IGNORE_INDEX = -100  # targets to skip, as F.cross_entropy's default
REDUCTIONS = ("sum", "none")  # as F.cross_entropy's, less the mean
CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32); at least MIN_CHUNK_ROWS rows
# Each chunk adds its (vocab, d) share into the weight's gradient, a pass over that
# whole tensor: fewer than this many rows and those passes cost more than the chunks save.
MIN_CHUNK_ROWS = 256


def linear_cross_entropy(
    hidden: torch.Tensor,  # (..., d): the final norm's output
    weight: torch.Tensor,  # (V, d): the output head's weight, no bias
    targets: torch.Tensor,  # (...) long, IGNORE_INDEX where no loss is taken
    reduction: str = "sum",
) -> torch.Tensor:
    """-log softmax(hidden @ weight.T)[target], fp32, differentiable in hidden and weight:
    summed over the targets that are not IGNORE_INDEX into a 0-dim tensor, or with
    reduction "none" at every position (...), 0 where the target is IGNORE_INDEX.
    `F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction=...)` to
    fp32 rounding.

    Under autocast the products run in the autocast dtype, as F.linear's would,
    and the softmax in fp32."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} do not match the hidden "
                         f"states' {tuple(hidden.shape[:-1])}")
    if weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"linear_cross_entropy: head weight {tuple(weight.shape)} does not take width "
                         f"{hidden.shape[-1]}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction {reduction!r} is not one of {REDUCTIONS}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    with torch.autocast(device, enabled=False):
        differentiable = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        if reduction == "none" and differentiable:
            return _TokenCrossEntropy.apply(hidden, weight, targets, dtype)
        if differentiable:
            return _LinearCrossEntropy.apply(hidden, weight, targets, dtype)
        h, y, kept = kept_rows(hidden, targets)
        if reduction == "none":
            return _every_position(_row_losses(h.to(dtype), weight.to(dtype), y), kept, targets)
        return _chunked(h.to(dtype), weight.to(dtype), y, (False, False))[0]


def fusable_weight(head: nn.Module) -> torch.Tensor | None:
    """The output head's (V, d) weight where `hidden @ weight.T` is what head(hidden) computes,
    to fp32 rounding, so a fused loss may use it in place of the logits; else None.

    Exact: a bias-free `nn.Linear` or heron `Linear` (tied or not: a tied head's weight
    is the embedding's parameter, whose gradient the fused loss then gives) without hooks
    of its own. Not: a head with a bias; any other module or subclass, whose forward may
    add to the product (an adapter); a quantised layer (compress/qlinear.py), whose
    `.weight` is its dequantised copy but whose forward may run a kernel that rounds
    otherwise; a head with forward hooks, which the fused loss would skip."""
    if type(head) not in (nn.Linear, Linear) or head.bias is not None:
        return None
    return None if head._forward_hooks or head._forward_pre_hooks else head.weight


def head_cross_entropy(
    hidden: torch.Tensor,  # (..., d): the final norm's output
    head: nn.Module,  # the output head: (..., d) -> (..., V)
    targets: torch.Tensor,  # (...) long, IGNORE_INDEX where no loss is taken
    reduction: str = "sum",
    temperature: float = 1.0,
) -> torch.Tensor:
    """-log softmax(head(hidden) / temperature)[target], fp32, summed into a 0-dim tensor or
    with reduction "none" at every position (...), 0 where the target is IGNORE_INDEX:
    fused where `fusable_weight` allows (a linear head: head(h) / T = head(h / T)), else
    through the head's logits, the module called as itself."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: {reduction!r} is not one of {REDUCTIONS}")
    weight = fusable_weight(head)
    if weight is not None:
        return linear_cross_entropy(hidden if temperature == 1.0 else hidden / temperature, weight, targets, reduction)
    logits = head(hidden).float()  # (..., V)
    logits = logits if temperature == 1.0 else logits / temperature
    loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def next_token_targets(ids: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) targets that make a model's loss next-token prediction of ids (B, T):
    position t's target is ids[:, t + 1]; IGNORE_INDEX at the last position, and
    where counted (B, T) bool is False for the token to be predicted."""
    following = ids[:, 1:] if counted is None else ids[:, 1:].masked_fill(~counted[:, 1:], IGNORE_INDEX)
    return torch.cat([following, following.new_full((ids.shape[0], 1), IGNORE_INDEX)], dim=1)


class _LinearCrossEntropy(torch.autograd.Function):
    """The summed loss: its gradients made in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # noqa: ANN205
                dtype: torch.dtype):
        h, y, kept = kept_rows(hidden, targets)
        want = ctx.needs_input_grad[:2]  # a frozen head (or frozen trunk) skips its product
        loss, grad_h, grad_w = _chunked(h.to(dtype), weight.to(dtype), y, want)
        ctx.grads = (hidden_grad(grad_h, kept, hidden.shape, hidden.dtype),
                     None if grad_w is None else grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor):  # noqa: ANN205
        return *(None if g is None else g * grad_loss for g in ctx.grads), None, None


class _TokenCrossEntropy(torch.autograd.Function):
    """Every position's loss: the forward keeps the kept rows' losses, the backward
    makes the logits again chunk by chunk (module note)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # noqa: ANN205
                dtype: torch.dtype):
        h, y, kept = kept_rows(hidden, targets)
        h, w = h.to(dtype), weight.to(dtype)
        losses = _row_losses(h, w, y)  # (n,)
        ctx.save_for_backward(h, w, y, losses, kept)
        ctx.hidden_shape, ctx.dtypes = hidden.shape, (hidden.dtype, weight.dtype)  # the gradients'
        return _every_position(losses, kept, targets)

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor):  # noqa: ANN205
        h, w, y, losses, kept = ctx.saved_tensors
        g = grad_losses.reshape(-1).float()  # (N,)
        g = g if kept is None else g.index_select(0, kept)  # (n,)
        grad_h, grad_w = _row_loss_grads(h, w, y, losses, g, ctx.needs_input_grad[:2])
        hidden_dtype, weight_dtype = ctx.dtypes
        return (hidden_grad(grad_h, kept, ctx.hidden_shape, hidden_dtype),
                None if grad_w is None else grad_w.to(weight_dtype), None, None)


def kept_rows(
    hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(rows of hidden (n, d), their targets (n,), their indices or None for all rows):
    the rows whose target is not IGNORE_INDEX (e.g. a prompt in SFT: it costs nothing)."""
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, d), (N,)
    counted = y != IGNORE_INDEX  # (N,)
    if bool(counted.all()):
        return h, y, None
    kept = counted.nonzero().squeeze(1)  # (n,)
    return h.index_select(0, kept), y.index_select(0, kept), kept


def _every_position(losses: torch.Tensor, kept: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    """The kept rows' losses (n,) at their positions, targets' shape, 0 where a target is ignored."""
    if kept is not None:
        losses = losses.new_zeros(targets.numel()).index_copy_(0, kept, losses)
    return losses.view(targets.shape)


def hidden_grad(grad_h: torch.Tensor | None, kept: torch.Tensor | None, shape: torch.Size,
                dtype: torch.dtype) -> torch.Tensor | None:
    """The kept rows' gradient (n, d) as the hidden states' (shape, dtype), zero on the ignored rows."""
    if grad_h is None:
        return None
    if kept is not None:
        grad_h = grad_h.new_zeros(shape.numel() // shape[-1], grad_h.shape[1]).index_copy_(0, kept, grad_h)
    return grad_h.view(shape).to(dtype)


def chunking(h: torch.Tensor, weight: torch.Tensor, share: int = 1) -> tuple[int, torch.Tensor]:
    """(rows a chunk takes, the buffer (rows, V) that each chunk's logits are made in, reused),
    for chunks of about CHUNK_ELEMENTS / share logits (a loss that holds `share` such
    tensors a chunk keeps its memory alike)."""
    rows = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // share // weight.shape[0])
    if rows > ROW_QUANTUM:  # whole quanta, so that oneDNN takes every row where it runs the head (core/gemm.py)
        rows -= rows % ROW_QUANTUM
    rows = max(1, min(h.shape[0], rows))
    return rows, torch.empty(rows, weight.shape[0], dtype=h.dtype, device=h.device)


def chunk_logits(h_c: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """A chunk's logits (c, V) in fp32, made in `buffer`; a copy only below fp32."""
    return linear_into(h_c, weight, buffer[: len(h_c)]).float()


def _shifted_exp(logits: torch.Tensor, y_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a chunk's logits (c, V) and targets y_c (c, 1): (the logits turned in place
    into exp(logits - each row's maximum), their row sums (c, 1), each row's loss (c, 1):
    log-sum-exp minus the target's logit)."""
    peak = logits.amax(dim=1, keepdim=True)  # (c, 1)
    target_logit = logits.gather(1, y_c)  # (c, 1)
    exps = logits.sub_(peak).exp_()
    total = exps.sum(dim=1, keepdim=True)
    return exps, total, total.log() + peak - target_logit


def add_grads(d_logits: torch.Tensor, h_c: torch.Tensor, weight: torch.Tensor,
              grad_h_c: torch.Tensor | None, grad_w: torch.Tensor | None) -> None:
    """From a chunk's d loss / d logits (c, V) fp32: its rows' hidden gradient into grad_h_c
    (c, d) and its share of the weight's into grad_w (V, d), fp32; either may be None."""
    d_logits = d_logits.to(h_c.dtype)
    if grad_h_c is not None:
        linear_into(d_logits, weight.t(), grad_h_c)
    if grad_w is not None and h_c.dtype == torch.float32:
        grad_w.addmm_(d_logits.t(), h_c)
    elif grad_w is not None:  # accumulate in fp32 what the low-precision product rounds
        grad_w += d_logits.t() @ h_c


def gradient_buffers(h: torch.Tensor, weight: torch.Tensor, want: tuple[bool, bool]
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d loss / d h to fill, d loss / d weight to accumulate into, fp32), each None unless wanted."""
    grad_h = torch.empty_like(h) if want[0] else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want[1] else None
    return grad_h, grad_w


def _chunked(
    h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, want: tuple[bool, bool]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(summed loss in fp32, d loss / d h (n, d), d loss / d weight (V, d)) for rows h (n, d)
    whose targets y (n,) are all kept; each gradient None unless `want` asks for it."""
    rows, buffer = chunking(h, weight)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h, grad_w = gradient_buffers(h, weight, want)
    for start in range(0, h.shape[0], rows):
        h_c, y_c = h[start:start + rows], y[start:start + rows, None]  # (c, d), (c, 1)
        probs, total, losses = _shifted_exp(chunk_logits(h_c, weight, buffer), y_c)  # probs unnormalised
        loss += losses.sum()
        if any(want):  # d loss / d logits = softmax - one_hot(target)
            d_logits = probs.div_(total).scatter_add_(1, y_c, probs.new_full(y_c.shape, -1.0))
            add_grads(d_logits, h_c, weight, None if grad_h is None else grad_h[start:start + rows], grad_w)
    return loss, grad_h, grad_w


def _row_losses(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each row's loss (n,), fp32, for rows h (n, d) whose targets y (n,) are all kept."""
    rows, buffer = chunking(h, weight)
    losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], rows):
        logits = chunk_logits(h[start:start + rows], weight, buffer)  # (c, V)
        losses[start:start + rows] = _shifted_exp(logits, y[start:start + rows, None])[2].squeeze(1)
    return losses


def _row_loss_grads(
    h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, losses: torch.Tensor, g: torch.Tensor,
    want: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of sum_i g[i] * losses[i] for `_row_losses`' rows: each chunk's
    logits made again and turned in place into g * (softmax - one_hot(target)), the
    softmax's normaliser read back from the loss (log-sum-exp = loss + target logit)."""
    grad_h, grad_w = gradient_buffers(h, weight, want)
    if not any(want):
        return grad_h, grad_w
    rows, buffer = chunking(h, weight)
    for start in range(0, h.shape[0], rows):
        h_c, y_c, g_c = h[start:start + rows], y[start:start + rows, None], g[start:start + rows, None]
        logits = chunk_logits(h_c, weight, buffer)  # (c, V)
        lse = logits.gather(1, y_c) + losses[start:start + rows, None]  # (c, 1)
        probs = logits.sub_(lse).exp_()
        d_logits = probs.scatter_add_(1, y_c, probs.new_full(y_c.shape, -1.0)).mul_(g_c)
        add_grads(d_logits, h_c, weight, None if grad_h is None else grad_h[start:start + rows], grad_w)
    return grad_h, grad_w


__all__ = ["IGNORE_INDEX", "REDUCTIONS", "add_grads", "chunk_logits", "chunking", "fusable_weight", "gradient_buffers",
           "head_cross_entropy", "hidden_grad", "kept_rows", "linear_cross_entropy", "next_token_targets"]
