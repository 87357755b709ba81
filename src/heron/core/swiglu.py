"""SwiGLU's activation, silu(gate) * up, and its gradient through Heron's
kernel (csrc/activation.c: why) where it was built and the input is fp32 on
the CPU; through torch's operations otherwise.

Two entry points for the two ways the products come: `swiglu(gate, up)` for
two tensors (the dense MLP's two products over many rows) and
`swiglu_halves(h)` for one whose last dimension holds the gate, then the up
half (a fused product: a MoE's experts, decoding). The second's gradient is
written into one tensor of h's shape, where torch's `chunk` would join the
halves' gradients with a `cat`. Only the inputs are kept for the backward,
not silu(gate) as well.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F


@functools.cache
def activation_kernels() -> ModuleType | None:
    """Heron's activation kernels (csrc/activation.c) where they were built, else None."""
    try:
        from heron.core import _activation
    except ImportError:
        return None
    return _activation


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate and up of one shape (..., ff)."""
    if gate.shape != up.shape or not (_takes(gate) and _takes(up)) or not (gate.is_contiguous() and up.is_contiguous()):
        return F.silu(gate) * up
    if _needs_gradient(gate, up):
        return _SwiGLU.apply(gate, up)
    return _forward(*_operands(gate, up))


def swiglu_halves(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h (..., 2 ff) holding gate, then up: (..., ff)."""
    if not (_takes(h) and h.shape[-1] % 2 == 0 and h.is_contiguous()):
        gate, up = h.chunk(2, dim=-1)  # (..., ff) each
        return F.silu(gate) * up
    if _needs_gradient(h):
        return _SwiGLU.apply(h, None)
    return _forward(*_operands(h, None))


def _takes(t: torch.Tensor) -> bool:
    """Whether the kernel computes this input: fp32 on the CPU, some of it, outside torch.compile."""
    return (t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() > 0 and t.shape[-1] > 0
            and activation_kernels() is not None and not torch.compiler.is_compiling())


def _needs_gradient(*inputs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def _operands(first: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(gate, up, stride): the two tensors, or with up None the halves of `first`, and how many
    floats apart their rows lie."""
    if up is None:
        return (*first.chunk(2, dim=-1), first.shape[-1])
    return first, up, first.shape[-1]


def _forward(gate: torch.Tensor, up: torch.Tensor, stride: int) -> torch.Tensor:
    """silu(gate) * up (..., ff), contiguous, for gate and up whose rows lie `stride` floats apart."""
    ff = gate.shape[-1]
    out = gate.new_empty(gate.shape)
    activation_kernels().swiglu(gate.data_ptr(), up.data_ptr(), stride, gate.numel() // ff, ff, out.data_ptr(),
                                torch.get_num_threads())
    return out


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up with its gradient, of two contiguous tensors (gate, up), or of one (h, None)
    holding both halves, whose gradient is then one tensor of h's shape (no `cat`)."""

    @staticmethod
    def forward(first: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
        return _forward(*_operands(first, up))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd's signature)
        ctx.save_for_backward(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205 (autograd's signature)
        first, second = ctx.saved_tensors
        gate, up, stride = _operands(first, second)
        if second is None:
            grad_first = torch.empty_like(first)  # (..., 2 ff)
            (grad_gate, grad_up), grads = grad_first.chunk(2, dim=-1), (grad_first, None)
        else:
            grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
            grads = (grad_gate, grad_up)
        grad = grad.contiguous()
        activation_kernels().swiglu_backward(gate.data_ptr(), up.data_ptr(), stride, grad.data_ptr(),
                                             grad.numel() // gate.shape[-1], gate.shape[-1], grad_gate.data_ptr(),
                                             grad_up.data_ptr(), stride, torch.get_num_threads())
        return grads


__all__ = ["activation_kernels", "swiglu", "swiglu_halves"]
