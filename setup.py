"""Builds Heron's four compiled modules; everything else is in pyproject.toml.

All are plain C and OpenMP, no torch headers, and optional: where one does not
build (no C compiler, no OpenMP), installation goes on and Heron uses torch's
kernels instead.

- `heron.compress._fused`: the fused dequantise-and-multiply kernel for int8
  and int4 weights (src/heron/compress/csrc/fused.c; else compress/kernels.py's
  other kernels).
- `heron.core._stream`: decoding's one- and two-row fp32 product over
  input-major weights (src/heron/core/csrc/stream.c; else core/linear.py's
  blocked bmm).
- `heron.core._step`: the small operations of a decoding step (attention for one
  new token over the KV cache, RMSNorm, the embedding lookup), one call each,
  and a plain layer in one call, its quantised products through `_fused`'s
  (src/heron/core/csrc/step.c, product.h; else core/token_step.py's torch ops).
- `heron.core._activation`: SwiGLU's activation and its gradient in one pass
  each, for training and prefill (src/heron/core/csrc/activation.c; else
  torch's silu and products).
"""
from setuptools import Extension, setup


def openmp_c(name: str, source: str, depends: tuple[str, ...] = ()) -> Extension:
    return Extension(name, sources=[source], depends=list(depends), extra_compile_args=["-O3", "-fopenmp"],
                     extra_link_args=["-fopenmp"], optional=True)


setup(
    ext_modules=[
        openmp_c("heron.compress._fused", "src/heron/compress/csrc/fused.c",
                 ("src/heron/core/csrc/fastcall_args.h", "src/heron/core/csrc/product.h")),
        openmp_c("heron.core._stream", "src/heron/core/csrc/stream.c",
                 ("src/heron/core/csrc/stream_mm.h", "src/heron/core/csrc/fastcall_args.h")),
        openmp_c("heron.core._step", "src/heron/core/csrc/step.c",
                 ("src/heron/core/csrc/stream_mm.h", "src/heron/core/csrc/vector_math.h",
                  "src/heron/core/csrc/product.h", "src/heron/core/csrc/fastcall_args.h")),
        openmp_c("heron.core._activation", "src/heron/core/csrc/activation.c",
                 ("src/heron/core/csrc/vector_math.h", "src/heron/core/csrc/fastcall_args.h")),
    ]
)
