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
"""
from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100  # targets to skip, as F.cross_entropy's default
CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32); at least MIN_CHUNK_ROWS rows
# Each chunk adds its (vocab, d) share into the weight's gradient, a pass over that
# whole tensor: fewer than this many rows and those passes cost more than the chunks save.
MIN_CHUNK_ROWS = 256


def linear_cross_entropy(
    hidden: torch.Tensor,  # (..., d): the final norm's output
    weight: torch.Tensor,  # (V, d): the output head's weight, no bias
    targets: torch.Tensor,  # (...) long, IGNORE_INDEX where no loss is taken
) -> torch.Tensor:
    """sum over the targets that are not IGNORE_INDEX of -log softmax(hidden @ weight.T)[target],
    a 0-dim fp32 tensor: `F.cross_entropy(F.linear(hidden, weight).float(), targets,
    reduction="sum")` to fp32 rounding, differentiable in hidden and weight.

    Under autocast the products run in the autocast dtype, as F.linear's would,
    and the softmax in fp32."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} do not match the hidden "
                         f"states' {tuple(hidden.shape[:-1])}")
    if weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"linear_cross_entropy: head weight {tuple(weight.shape)} does not take width "
                         f"{hidden.shape[-1]}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, targets, dtype)
        h, y, _ = _kept_rows(hidden, targets)
        return _chunked(h.to(dtype), weight.to(dtype), y, (False, False))[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # noqa: ANN205
                dtype: torch.dtype):
        h, y, kept = _kept_rows(hidden, targets)
        want = ctx.needs_input_grad[:2]  # a frozen head (or frozen trunk) skips its product
        loss, grad_h, grad_w = _chunked(h.to(dtype), weight.to(dtype), y, want)
        if grad_h is not None:
            if kept is not None:  # the skipped rows' gradient is zero
                grad_h = grad_h.new_zeros(targets.numel(), h.shape[1]).index_copy_(0, kept, grad_h)
            grad_h = grad_h.view_as(hidden).to(hidden.dtype)
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor):  # noqa: ANN205
        return *(None if g is None else g * grad_loss for g in ctx.grads), None, None


def _kept_rows(
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


def _chunked(
    h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, want: tuple[bool, bool]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(summed loss in fp32, d loss / d h (n, d), d loss / d weight (V, d)) for rows h (n, d)
    whose targets y (n,) are all kept; each gradient None unless `want` asks for it."""
    n, V = h.shape[0], weight.shape[0]
    rows = max(1, min(n, max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // V)))
    buffer = torch.empty(rows, V, dtype=h.dtype, device=h.device)  # one chunk's logits, reused
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if want[0] else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want[1] else None
    for start in range(0, n, rows):
        h_c, y_c = h[start:start + rows], y[start:start + rows, None]  # (c, d), (c, 1)
        logits = torch.mm(h_c, weight.t(), out=buffer[: len(h_c)]).float()  # (c, V); a copy only below fp32
        peak = logits.amax(dim=1, keepdim=True)  # (c, 1)
        target_logit = logits.gather(1, y_c)
        probs = logits.sub_(peak).exp_()  # unnormalised, in place
        total = probs.sum(dim=1, keepdim=True)
        loss += (total.log() + peak - target_logit).sum()
        if not any(want):
            continue
        # d loss / d logits = softmax - one_hot(target)
        probs = probs.div_(total).scatter_add_(1, y_c, probs.new_full(y_c.shape, -1.0)).to(h.dtype)
        if grad_h is not None:
            torch.mm(probs, weight, out=grad_h[start:start + rows])
        if grad_w is not None and h.dtype == torch.float32:
            grad_w.addmm_(probs.t(), h_c)
        elif grad_w is not None:  # accumulate in fp32 what the low-precision product rounds
            grad_w += probs.t() @ h_c
    return loss, grad_h, grad_w


__all__ = ["IGNORE_INDEX", "linear_cross_entropy"]
