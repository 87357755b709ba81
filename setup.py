"""Builds Heron's one compiled module; everything else is in pyproject.toml.

`heron.compress._fused` is the fused dequantise-and-multiply kernel for int8
and int4 weights (src/heron/compress/csrc/fused.c, plain C and OpenMP, no torch
headers). It is optional: where it does not build (no C compiler, no OpenMP),
installation goes on and quantised linears use the other kernels
(compress/kernels.py).
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "heron.compress._fused",
            sources=["src/heron/compress/csrc/fused.c"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
