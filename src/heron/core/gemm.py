"""The library that runs the fp32 CPU matrix products of Heron's linear layers.

torch sends `F.linear` and `mm` on the CPU to MKL. MKL is Intel's, and on
AMD's AVX-512 CPUs it is the slower of the two GEMMs torch ships: oneDNN's
(`mkldnn::_linear_pointwise`, also in every x86 torch build) ran the forward
products of Heron's layers (8,192 rows, widths of the `small` and LLaMA
shapes; 2 threads) at 145-203 GFLOP/s against MKL's 112-150 on a Zen 4 EPYC
(2026-12-02), at 214-431 against 99-184 on a Zen 5 (2026-12-02, 2,048 and
8,192 rows), and the input gradient (gy @ W) at 168-193 against 131-168 on
the Zen 4. The weight gradient (gy.T @ x), whose operands oneDNN takes
transposed, differs between the two: on the Zen 4 oneDNN's ran 0.6-1.0x
MKL's, so it stays with MKL there; on the Zen 5 it ran at 285-376 GFLOP/s
against MKL's 177-188 at the `small` and `base` training shapes (15
interleaved rounds), so from Zen 5 on (AMD's CPU family 26) it goes to oneDNN
too. On an AVX2 EPYC oneDNN was the slower (81-156 GFLOP/s against MKL's
127-175), and on Intel CPUs, MKL's own, it was never measured, so MKL stays
there.

The choice is made once per process from the CPU, never by timing, so that
two runs on one machine compute the same numbers (a resumed training run
must continue bit for bit). `HERON_GEMM=onednn` (every product, weight
gradients included) or `HERON_GEMM=mkl` overrides it. The two libraries
round differently (~1e-6 relative).

oneDNN builds a primitive for each problem shape it meets (~0.5-0.8 ms) and
keeps the last 1,024, each holding memory (~0.7 MB for a 192 -> 256 product;
Zen 5, 2026-12-02). Row counts that change from call to call, a MoE's rows
per expert every step and prefills of every length, had it build one almost
every call: 400 prefills of 200 lengths grew a `small` model's process from
0.36 to 2.6 GB, and tiny-moe's experts trained no faster than through
torch's `grouped_mm` while holding twice its memory. So oneDNN is given a
product's rows in whole multiples of ROW_QUANTUM and MKL the rest (fewer than
ROW_QUANTUM rows): the shapes oneDNN sees are few and repeat.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

BACKENDS = ("mkl", "onednn")
GEMM_ENV = "HERON_GEMM"  # one of BACKENDS: overrides the choice made from the CPU


ZEN5_FAMILY = 26  # AMD's CPU family of Zen 5, the first whose weight gradients oneDNN runs faster
ROW_QUANTUM = 64  # oneDNN takes rows in whole multiples of this, MKL the rest (module docstring)


@functools.cache
def gemm_backend() -> str:
    """The GEMM library of forward and input-gradient products, one of BACKENDS:
    $HERON_GEMM when set, else oneDNN on AMD CPUs that torch runs with AVX-512
    kernels, MKL elsewhere."""
    chosen = _chosen_in_environment()
    if chosen:
        return chosen
    return "onednn" if _amd_avx512() and torch.backends.mkldnn.is_available() else "mkl"


@functools.cache
def weight_gradient_backend() -> str:
    """The GEMM library of weight gradients (gy.T @ x), one of BACKENDS: $HERON_GEMM
    when set, else oneDNN on AMD CPUs with AVX-512 kernels from Zen 5 on, MKL
    elsewhere (Zen 4 included: module docstring)."""
    chosen = _chosen_in_environment()
    if chosen:
        return chosen
    from_zen5 = _amd_avx512() and cpu_family() >= ZEN5_FAMILY
    return "onednn" if from_zen5 and torch.backends.mkldnn.is_available() else "mkl"


def cpu_gemm_libraries() -> dict[str, str]:
    """The libraries of fp32 CPU products, as a checkpoint's lineage records them: a run
    resumed where they differ rounds otherwise, so it cannot repeat the unbroken run bit for bit."""
    return {"products": gemm_backend(), "weight_gradients": weight_gradient_backend()}


def _chosen_in_environment() -> str:
    """$HERON_GEMM checked, lower-cased; "" when unset."""
    chosen = os.environ.get(GEMM_ENV, "").strip().lower()
    if chosen and chosen not in BACKENDS:
        raise ValueError(f"{GEMM_ENV}={chosen!r}: expected one of {', '.join(BACKENDS)}")
    if chosen == "onednn" and not torch.backends.mkldnn.is_available():
        raise ValueError(f"{GEMM_ENV}=onednn, but this torch build has no oneDNN")
    return chosen


def _amd_avx512() -> bool:
    return cpu_vendor() == "AuthenticAMD" and torch.backends.cpu.get_cpu_capability() == "AVX512"


def cpu_vendor() -> str:
    """The CPU's vendor id as Linux reports it ("AuthenticAMD", "GenuineIntel"), "" where unknown."""
    return _cpuinfo_field("vendor_id")


def cpu_family() -> int:
    """The CPU's family number as Linux reports it (AMD: 25 for Zen 3 and 4, 26 for Zen 5), 0 where unknown."""
    family = _cpuinfo_field("cpu family")
    return int(family) if family.isdigit() else 0


def _cpuinfo_field(name: str) -> str:
    """The first processor's `name` field in /proc/cpuinfo, "" where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN where `gemm_backend` chose it
    (fp32 CPU tensors outside autocast; anything else goes to F.linear)."""
    if not _through_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDnnLinear.apply(x, weight, bias)
    return _rows_product(x, weight, bias)


def linear_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x (n, K) @ weight (N, K).T written into `out` (n, N) and returned, outside
    autograd: MKL writes it there; oneDNN's product, which has no `out`, is copied
    in (n x N more written, against the n x N x K multiply-adds saved)."""
    if not _through_onednn(x, weight):
        return torch.mm(x, weight.t(), out=out)
    bulk = _onednn_rows(len(x))
    if bulk:
        out[:bulk].copy_(_onednn_product(x[:bulk], weight, None))
    if bulk < len(x):
        torch.mm(x[bulk:], weight.t(), out=out[bulk:])
    return out


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


def _onednn_rows(n: int) -> int:
    """How many of n rows oneDNN takes: whole multiples of ROW_QUANTUM (module docstring)."""
    return n - n % ROW_QUANTUM


def _row_pieces(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> list[torch.Tensor]:
    """x (n, K) @ weight (N, K).T (+ bias) in one or two blocks of rows: oneDNN's
    (`_onednn_rows`), then MKL's for the rest, or for all of them when there are
    fewer than ROW_QUANTUM."""
    bulk = _onednn_rows(len(x))
    pieces = [_onednn_product(x[:bulk], weight, bias)] if bulk else []
    if bulk < len(x) or not pieces:
        pieces.append(F.linear(x[bulk:], weight, bias))
    return pieces


def _rows_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., K), oneDNN's rows and MKL's joined (`_row_pieces`)."""
    pieces = _row_pieces(x.reshape(-1, x.shape[-1]), weight, bias)
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(*x.shape[:-1], weight.shape[0])


def _weight_gradient(grad_rows: torch.Tensor, x_rows: torch.Tensor) -> torch.Tensor:
    """grad_rows (n, N).T @ x_rows (n, K): a weight's gradient (N, K), row-major, through
    the library `weight_gradient_backend` chose. oneDNN sums over `_onednn_rows` of the n
    rows and MKL adds the rest; it takes x_rows.T as its weight, which must be plain
    (`is_plain`): a view with gaps between rows goes to MKL, as do fewer than ROW_QUANTUM rows."""
    bulk = _onednn_rows(len(x_rows))
    if weight_gradient_backend() != "onednn" or not bulk or not is_plain(x_rows[:bulk].t()):
        return grad_rows.t().mm(x_rows)
    grad = _onednn_product(grad_rows[:bulk].t(), x_rows[:bulk].t(), None)
    return grad if bulk == len(x_rows) else grad.addmm_(grad_rows[bulk:].t(), x_rows[bulk:])


def grouped_through_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `grouped_product` takes rows x (A, K) and stacked weights w (E, K, M): where
    every product, weight gradients included, goes through oneDNN (a loop of its
    products ran tiny-moe's experts 1.3-1.8x as fast as torch's `grouped_mm` on a
    Zen 5, 2026-12-02; no faster on a Zen 4)."""
    return weight_gradient_backend() == "onednn" and _through_onednn(x, w[0].t()) and w.is_contiguous()


def grouped_product(x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rows x (A, K) grouped by expert in order, sizes[e] rows each, times their expert's
    w (E, K, M): (A, M), differentiable in x and w; each group's rows through oneDNN, but
    for the last fewer than ROW_QUANTUM, which MKL takes (`_row_pieces`). Only where
    `grouped_through_onednn` says so."""
    return _OneDnnGrouped.apply(x.contiguous(), w, sizes)


class _OneDnnGrouped(torch.autograd.Function):
    """`grouped_product` and its gradients, split by rows as `linear`'s are: the rows'
    g_e @ w_e.T, the weights' x_e.T @ g_e (zero for an expert without rows)."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return torch.cat([piece for rows, w_e in zip(x.split(sizes), w) for piece in _row_pieces(rows, w_e.t(), None)])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd's signature)
        x, w, ctx.sizes = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205 (autograd's signature)
        x, w = ctx.saved_tensors
        grads = grad.contiguous().split(ctx.sizes)  # (sizes[e], M) each
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.cat([piece for g, w_e in zip(grads, w) for piece in _row_pieces(g, w_e, None)])  # (A, K)
        if ctx.needs_input_grad[1]:
            grad_w = torch.stack([_weight_gradient(rows, g) for rows, g in zip(x.split(ctx.sizes), grads)])  # (E, K, M)
        return grad_x, grad_w, None


class _OneDnnLinear(torch.autograd.Function):
    """oneDNN's product with its gradients: the input's through oneDNN as well,
    the weight's through the library `weight_gradient_backend` chose (why: module
    docstring)."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _rows_product(x, weight, bias)

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
            grad_x = _rows_product(grad, weight.t(), None)  # (..., K)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_gradient(grad_rows, x.reshape(-1, K))  # (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(0)
        return grad_x, grad_w, grad_b


__all__ = ["BACKENDS", "GEMM_ENV", "ROW_QUANTUM", "ZEN5_FAMILY", "cpu_family", "cpu_gemm_libraries", "cpu_vendor",
           "gemm_backend", "grouped_product", "grouped_through_onednn", "is_plain", "linear", "linear_into",
           "weight_gradient_backend"]
