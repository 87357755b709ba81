"""Builds Heron's one compiled module; everything else is in pyproject.toml.

`heron.compress._int8mm` is the fused int8 dequantise-and-multiply kernel
(src/heron/compress/csrc/int8mm.c, plain C and OpenMP, no torch headers). It is
optional: where it does not build (no C compiler, no OpenMP), installation goes
on and quantised linears use the other kernels (compress/kernels.py).
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "heron.compress._int8mm",
            sources=["src/heron/compress/csrc/int8mm.c"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
