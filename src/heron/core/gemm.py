"""The library that runs the fp32 CPU matrix products of Heron's linear layers.

torch sends `F.linear` and `mm` on the CPU to MKL. MKL is Intel's, and on
AMD's AVX-512 CPUs (Zen 4) it is the slower of the two GEMMs torch ships:
oneDNN's (`mkldnn::_linear_pointwise`, also in every x86 torch build) ran
the forward products of Heron's layers (8,192 rows, widths of the `small`
and LLaMA shapes; 2 threads of an EPYC with AVX-512, 2026-12-02) at 145-203
GFLOP/s against MKL's 112-150, and the input gradient (gy @ W) at 168-193
against 131-168. The weight gradient (gy.T @ x) stays with MKL everywhere:
oneDNN's, given transposed inputs, ran 0.6-1.0x MKL's. On an AVX2 EPYC
oneDNN was the slower (81-156 GFLOP/s against MKL's 127-175), and on Intel
CPUs, MKL's own, it was never measured, so MKL stays there.

The choice is made once per process from the CPU, never by timing, so that
two runs on one machine compute the same numbers (a resumed training run
must continue bit for bit). `HERON_GEMM=onednn` or `HERON_GEMM=mkl`
overrides it. The two libraries round differently (~1e-6 relative).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

BACKENDS = ("mkl", "onednn")
GEMM_ENV = "HERON_GEMM"  # one of BACKENDS: overrides the choice made from the CPU


@functools.cache
def gemm_backend() -> str:
    """The GEMM library, one of BACKENDS: $HERON_GEMM when set, else oneDNN on
    AMD CPUs that torch runs with AVX-512 kernels, MKL elsewhere."""
    chosen = os.environ.get(GEMM_ENV, "").strip().lower()
    if chosen and chosen not in BACKENDS:
        raise ValueError(f"{GEMM_ENV}={chosen!r}: expected one of {', '.join(BACKENDS)}")
    if chosen == "onednn" and not torch.backends.mkldnn.is_available():
        raise ValueError(f"{GEMM_ENV}=onednn, but this torch build has no oneDNN")
    if chosen:
        return chosen
    on_amd_avx512 = cpu_vendor() == "AuthenticAMD" and torch.backends.cpu.get_cpu_capability() == "AVX512"
    return "onednn" if on_amd_avx512 and torch.backends.mkldnn.is_available() else "mkl"


def cpu_vendor() -> str:
    """The CPU's vendor id as Linux reports it ("AuthenticAMD", "GenuineIntel"), "" where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("vendor_id"):
            return line.partition(":")[2].strip()
    return ""


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN where `gemm_backend` chose it
    (fp32 CPU tensors outside autocast; anything else goes to F.linear)."""
    if not _through_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDnnLinear.apply(x, weight, bias)
    return _onednn_product(x, weight, bias)


def linear_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x (n, K) @ weight (N, K).T written into `out` (n, N) and returned, outside
    autograd: MKL writes it there; oneDNN's product, which has no `out`, is copied
    in (n x N more written, against the n x N x K multiply-adds saved)."""
    if not _through_onednn(x, weight):
        return torch.mm(x, weight.t(), out=out)
    return out.copy_(_onednn_product(x, weight, None))


def _through_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (gemm_backend() == "onednn" and x.dtype == weight.dtype == torch.float32
            and x.device.type == weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and is_plain(weight))


def is_plain(weight: torch.Tensor) -> bool:
    """Whether a 2-D weight is laid out row-major or input-major (its transpose
    row-major), the layouts oneDNN reorders at its speed. Why: given a view with
    gaps between rows (half of an input-major gate+up weight, stride (1, 2N)),
    oneDNN took 350 ms for a 32 x 512 x 1408 product MKL runs in under one."""
    return weight.is_contiguous() or weight.t().is_contiguous()


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """oneDNN's product with its gradients: the input's through oneDNN as well,
    the weight's and bias's through MKL (why: module docstring)."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _onednn_product(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd's signature)
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205 (autograd's signature)
        x, weight = ctx.saved_tensors
        N, K = weight.shape
        grad_rows = grad.reshape(-1, N)  # (n, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # the forward took the weight, so its transpose is plain too
            grad_x = _onednn_product(grad, weight.t(), None)  # (..., K)
        if ctx.needs_input_grad[1]:
            grad_w = grad_rows.t().mm(x.reshape(-1, K))  # (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(0)
        return grad_x, grad_w, grad_b


__all__ = ["BACKENDS", "GEMM_ENV", "cpu_vendor", "gemm_backend", "is_plain", "linear", "linear_into"]
