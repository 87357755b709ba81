"""Matrix-product kernels for quantised linears, chosen from a table.

Each kernel turns a layer's packed tensors into its own layout once
(`prepare`, cached by the layer and never saved) and binds its op to that
layout once (`product`), a function the layer multiplies inputs by. All
compute x @ Ŵᵀ for the dequantised weight Ŵ, in fp32
(relative errors against a float64 product, measured at 96x128 to 2816x512):

  aten     torch's weight-only CPU kernels `_weight_int8pack_mm` and
           `_weight_int4pack_mm_for_cpu` (~4e-7). Slow here on AVX2 and on
           AVX-512 alike: on AVX2 7-10x slower than the fp32 product at decode
           shapes; on an AVX-512 EPYC (torch 2.13, one thread, 2026-12-02) 9-17x
           slower at one row (1536x512: int8 1.07 ms, int4 1.66, against 0.12
           for fp32 and 0.07 and 0.09 for `fused`) and 40-60x at 1,024 rows
           (1.2-1.4 s against 23-29 ms), which made GPTQ's calibration pass
           through quantised blocks take two minutes a `small` block. Never a
           default before `fused` and `fp16`. int4 wants N % 16 == 0 and groups
           of 32, 64, 128 or 256, and reads w = (q - 8) * s + z', so
           z' = (8 - z) * s is stored for our z.
  fp16     fbgemm's fp16-weight GEMM (`quantized.linear_dynamic_fp16`, the op
           behind quantize_dynamic's float16 mode; fp32 activations and
           accumulation). For int8 the layout holds the integer codes, exact
           in fp16, and the per-row scale multiplies the product: the
           weight-only product up to summation order (~4e-7). For int4 it holds
           fp16(Ŵ), a rounding of at most 2^-11 per weight (~1.8e-4). The
           default on x86 where `fused` is missing or does not fit: it reads 2
           bytes per weight, not 4, and beat fp32 from 1 to 256 rows at 2816x512.
  fused    Heron's own product (csrc/fused.c, built at install): reads the
           codes as stored, one byte (int8) or half a byte (int4, groups of
           a multiple of 32) a weight, widens them to fp32 in registers and
           multiplies in fp32 (~2e-7), scaling each output row or group.
           AVX2 and FMA CPUs; on AVX-512 ones its few-row tiles widen 16 codes
           an instruction. The default: decoding streams
           weights, and no weight-only product torch ships reads fewer bytes
           of each here. int4 codes are repacked once into blocks of 32 inputs
           (low nibbles 0-15, high 16-31) that widen without shuffles. The one
           kernel that offers its product to the core's whole-layer decoding
           kernel (`Kernel.offer`), so a quantised plain layer decodes in one
           C call (core/step_kernels.py).
  dynamic  fbgemm's int8 GEMM, what quantize_dynamic runs: activations are
           quantised too (per tensor, 7 bits), ~1.5e-2 per layer, so the model
           is no longer weight-only. int8 only, by explicit choice.
  dequant  Ŵ rebuilt in fp32 and F.linear (~2e-7): any device, autograd, the reference.

Decode of the `small` preset, batch 1, one thread, AMD EPYC (AVX2), tokens/s
(one process, 5 alternating rounds, 2026-11-30): fp32 102, quantize_dynamic
140, int8 fused 169, int8 fp16 119, int8 dynamic 160, int4 fused 177, int4
fp16 135.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from heron.compress.schemes import Int4Grouped, Int8PerChannel, QParams, Scheme
from heron.core.gemm import linear

ATEN_INT4_GROUPS = (32, 64, 128, 256)


Product = Callable[[torch.Tensor], torch.Tensor]  # x fp32 -> x @ Ŵᵀ


@dataclass(frozen=True)
class Kernel:
    """`product(layout)` binds the kernel's op and layout once into a function
    of x: (M, K) -> (M, N), or with `any_rank` (..., K) -> (..., N) for at
    least two dims. Binding once matters on decoding rows, where looking the
    op up in `torch.ops` and flattening the input took ~15 µs of a ~50 µs
    call at the `tiny` preset's shapes."""

    name: str
    supports: Callable[[Scheme, int, int], bool]  # (scheme, out_features, in_features)
    prepare: Callable[[Scheme, torch.Tensor, QParams], Any]  # (scheme, codes (N, K), params) -> layout
    product: Callable[[Any], Product]
    any_rank: bool = False
    # (layout, input scale (K,) fp32 or None) -> the product offered to the core's whole-layer
    # decoding kernel (core/step_kernels.py); None: this kernel offers none
    offer: Callable[[Any, torch.Tensor | None], object] | None = None


# ----- aten: torch's weight-only int8 / int4 CPU kernels ---------------------------


def _aten_supports(scheme: Scheme, out_features: int, in_features: int) -> bool:
    if isinstance(scheme, Int8PerChannel):
        return True
    return isinstance(scheme, Int4Grouped) and scheme.group_size in ATEN_INT4_GROUPS and out_features % 16 == 0


def _aten_prepare(scheme: Scheme, codes: torch.Tensor, params: QParams) -> Any:
    if isinstance(scheme, Int8PerChannel):
        return ("int8", codes.to(torch.int8).contiguous(), params.scale[:, 0].float().contiguous())
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)  # (N, K/2)
    offset = (8 - params.zero.float()) * params.scale  # (N, G): kernel computes (q - 8) * s + offset
    scales_and_zeros = torch.stack((params.scale, offset), dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
    return ("int4", weight, scales_and_zeros, scheme.group_size)


def _aten_product(layout: Any) -> Product:
    # Both ops refuse a strided x (a transposed view, a slice of rows) that F.linear takes: made contiguous.
    if layout[0] == "int8":
        int8_mm, (_, codes, scale) = torch.ops.aten._weight_int8pack_mm.default, layout
        return lambda x: int8_mm(x.contiguous(), codes, scale)
    int4_mm, (_, weight, scales_and_zeros, group) = torch.ops.aten._weight_int4pack_mm_for_cpu.default, layout
    return lambda x: int4_mm(x.contiguous(), weight, group, scales_and_zeros)


# ----- fp16: fbgemm's fp16-weight GEMM ------------------------------------------------


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def _fp16_prepare(scheme: Scheme, codes: torch.Tensor, params: QParams) -> Any:
    if isinstance(scheme, Int8PerChannel):  # codes are integers in [-127, 127]: exact in fp16
        return torch.ops.quantized.linear_prepack_fp16(codes.float(), None), params.scale[:, 0].float().contiguous()
    return torch.ops.quantized.linear_prepack_fp16(scheme.dequantize(codes, params), None), None


def _fp16_product(layout: Any) -> Product:
    fp16_mm, (packed, row_scale) = torch.ops.quantized.linear_dynamic_fp16.default, layout
    if row_scale is None:
        return lambda x: fp16_mm(x, packed)
    return lambda x: fp16_mm(x, packed) * row_scale


# ----- fused: Heron's int8 / int4 dequantise-and-multiply (csrc/fused.c) ---------


@functools.cache
def _fused_module() -> Any:
    """The compiled kernel, or None where this CPU lacks AVX2 and FMA or it was
    not built (which warns, once: setup.py builds it as an optional extension)."""
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        return None
    try:
        from heron.compress import _fused
    except ImportError:
        warnings.warn("Heron's fused int8/int4 kernel (heron.compress._fused) is not built, so quantised layers "
                      "run on fbgemm's fp16 product, which decodes slower; install Heron again with a C compiler "
                      "(`pip install -e .` in the repository) to build it", RuntimeWarning, stacklevel=2)
        return None
    return _fused


def _fused_supports(scheme: Scheme, out_features: int, in_features: int) -> bool:
    takes = isinstance(scheme, Int8PerChannel) or (isinstance(scheme, Int4Grouped) and scheme.group_size % 32 == 0)
    return takes and _fused_module() is not None


def _fused_prepare(scheme: Scheme, codes: torch.Tensor, params: QParams) -> Any:
    if isinstance(scheme, Int8PerChannel):
        return 8, codes.to(torch.int8).contiguous(), params.scale[:, 0].float().contiguous(), None, 0
    n, k = codes.shape
    blocks = codes.to(torch.uint8).reshape(n, k // 32, 2, 16)  # per 32 inputs: 0-15 low nibbles, 16-31 high
    packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    zero = params.zero.to(torch.int32).contiguous()
    return 4, packed, params.scale.float().contiguous(), zero, scheme.group_size


# From this many rows of x the fused product dequantises Ŵ (in blocks of at most DEQUANTIZED_BLOCK
# floats, 16 MB) and multiplies through Heron's fp32 GEMM (core/gemm.py) instead of its own tiles.
# Why: over many rows the product is arithmetic, not reading codes, and the GEMM libraries' blocked
# kernels beat the C tiles by more than dequantising costs: at 64 rows 1.0-1.35x as fast, at 128
# 1.2-1.6x, at 512 1.1-1.5x; at 17-32 rows the tiles won 2-7x (a `small` and a `base` layer's
# shapes, int8 and int4, Zen 4, 2026-12-03).
DEQUANTIZED_ROWS = 64
DEQUANTIZED_BLOCK = 1 << 22


def _fused_product(layout: Any) -> Product:
    module, (bits, codes, scale, zero, group) = _fused_module(), layout
    n, k = codes.shape[0], codes.shape[1] * (2 if bits == 4 else 1)  # int4: two codes a byte
    weights = (bits, codes.data_ptr(), scale.data_ptr(), 0 if zero is None else zero.data_ptr(), n, k, group)
    block = max(1, min(n, DEQUANTIZED_BLOCK // max(k, 1)))  # output rows dequantised at a time
    threads = torch.get_num_threads

    def dequantized(n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:  # Ŵ[n0:n1] into out
        module.dequantize(*weights, n0, n1, out.data_ptr(), threads())
        return out

    def product(x: torch.Tensor) -> torch.Tensor:  # holds the layout's tensors alive while the C code reads them
        x = x.contiguous()
        rows = x.numel() // k if k else 0
        if rows < DEQUANTIZED_ROWS:
            y = x.new_empty((*x.shape[:-1], n))
            module.mm(x.data_ptr(), rows, y.data_ptr(), threads(), *weights)
            return y
        flat = x.view(rows, k)
        if block == n:
            y = linear(flat, dequantized(0, n, torch.empty(n, k)))
        else:
            y, w = flat.new_empty(rows, n), torch.empty(block, k)
            for n0 in range(0, n, block):
                n1 = min(n, n0 + block)
                y[:, n0:n1] = linear(flat, dequantized(n0, n1, w[: n1 - n0]))
        return y.view(*x.shape[:-1], n)

    return product


def _fused_offer(layout: Any, input_scale: torch.Tensor | None) -> object:
    """The fused product, times `input_scale` first, as a capsule (core/csrc/product.h) that
    holds the layout and the scale while the core's whole-layer kernel reads them."""
    bits, codes, scale, zero, group = layout
    n, k = codes.shape[0], codes.shape[1] * (2 if bits == 4 else 1)
    return _fused_module().product((layout, input_scale), bits, codes.data_ptr(), scale.data_ptr(),
                                   0 if zero is None else zero.data_ptr(),
                                   0 if input_scale is None else input_scale.data_ptr(), n, k, group)


# ----- dynamic: fbgemm int8 x int8 (activations quantised per tensor) --------------


def _dynamic_prepare(scheme: Scheme, codes: torch.Tensor, params: QParams) -> Any:
    scale = params.scale[:, 0].double()
    with warnings.catch_warnings():  # torch 2.13 marks quantized-tensor constructors deprecated
        warnings.simplefilter("ignore", UserWarning)
        weight = torch._make_per_channel_quantized_tensor(
            codes.to(torch.int8), scale, torch.zeros_like(scale, dtype=torch.long), 0
        )
    return torch.ops.quantized.linear_prepack(weight, None)


def _dynamic_product(layout: Any) -> Product:
    int8_mm = torch.ops.quantized.linear_dynamic.default
    return lambda x: int8_mm(x, layout, True)  # reduce_range, as quantize_dynamic on x86


# ----- dequant: the reference -----------------------------------------------------------


def _dequant_prepare(scheme: Scheme, codes: torch.Tensor, params: QParams) -> Any:
    return scheme.dequantize(codes, params)  # (N, K) fp32


KERNELS: dict[str, Kernel] = {
    "aten": Kernel("aten", _aten_supports, _aten_prepare, _aten_product),
    "fp16": Kernel("fp16", lambda s, n, k: _fbgemm_available(), _fp16_prepare, _fp16_product, any_rank=True),
    "fused": Kernel("fused", _fused_supports, _fused_prepare, _fused_product, any_rank=True, offer=_fused_offer),
    "dynamic": Kernel("dynamic", lambda s, n, k: _fbgemm_available() and isinstance(s, Int8PerChannel),
                      _dynamic_prepare, _dynamic_product, any_rank=True),
    "dequant": Kernel("dequant", lambda s, n, k: True, _dequant_prepare, lambda w: lambda x: F.linear(x, w),
                      any_rank=True),
}


def default_kernels() -> tuple[str, ...]:
    """Kernels to try in order (see the module docstring for why): `aten` only where neither
    `fused` nor `fp16` runs, since it was the slowest on AVX2 and AVX-512 CPUs alike."""
    return ("fused", "fp16", "aten", "dequant")


def choose_kernel(scheme: Scheme, out_features: int, in_features: int, preferred: str | None = None) -> Kernel:
    """`preferred` if it supports this layer, else the first default kernel that does."""
    if preferred is not None and preferred not in KERNELS:
        raise ValueError(f"kernel: unknown {preferred!r}; known: {', '.join(KERNELS)}")
    order = ((preferred,) if preferred else ()) + default_kernels()
    return next(KERNELS[k] for k in order if KERNELS[k].supports(scheme, out_features, in_features))


__all__ = ["KERNELS", "Kernel", "choose_kernel", "default_kernels"]
