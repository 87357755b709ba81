"""Modules that hold quantised weights: `QuantLinear` and `QuantEmbedding`.

Their state dict is the scheme's packed tensors (the on-disk truth), plus an
optional bias and an optional per-input-channel scale (AWQ). A kernel layout
is built from the packed tensors on first use and cached outside the state
dict; loading new values or moving the module drops it (compress/kernels.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from heron.compress.kernels import KERNELS, Kernel, choose_kernel
from heron.compress.schemes import QParams, Scheme


class _Packed(nn.Module):
    """Registers a scheme's packed tensors as buffers and reads them back."""

    def __init__(self, scheme: Scheme, out_features: int, in_features: int) -> None:
        super().__init__()
        self.scheme, self.out_features, self.in_features = scheme, out_features, in_features
        self._names = tuple(scheme.packed_specs(out_features, in_features))
        for name, (shape, dtype) in scheme.packed_specs(out_features, in_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))

    def packed(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._names}

    def set_packed(self, codes: torch.Tensor, params: QParams) -> None:
        for name, value in self.scheme.pack(codes, params).items():
            getattr(self, name).copy_(value)

    def unpacked(self) -> tuple[torch.Tensor, QParams]:
        return self.scheme.unpack(self.packed())


class QuantLinear(_Packed):
    """y = (x * input_scale) @ Ŵᵀ + bias, Ŵ the scheme's dequantised weight.

    A drop-in for a `Linear` inside a model: same in/out features, same
    `bias`, and a read-only `weight` property that returns the effective
    dequantised weight (code that reads `.weight`, such as the MLP's split of
    its fused gate/up product over many rows, sees the quantised numbers).
    """

    def __init__(
        self, in_features: int, out_features: int, scheme: Scheme, *,
        bias: bool = False, input_scale: bool = False, kernel: str | None = None,
    ) -> None:
        scheme.check(out_features, in_features)
        super().__init__(scheme, out_features, in_features)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_scale", torch.ones(in_features) if input_scale else None)  # (K,) multiplies x
        self.kernel_name = kernel  # None: the default for this CPU
        self._layout: tuple[Kernel, Any] | None = None

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, params: QParams, scheme: Scheme, *,
        bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None, kernel: str | None = None,
    ) -> QuantLinear:
        """A layer holding these codes (N, K); `input_scale` (K,) multiplies inputs."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, scheme, bias=bias is not None,
                    input_scale=input_scale is not None, kernel=kernel)
        layer.set_packed(codes, params)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        if input_scale is not None:
            layer.input_scale.copy_(input_scale.detach())
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """(N, K) the effective weight: dequantised, with the input scale folded in."""
        codes, params = self.unpacked()
        w = self.scheme.dequantize(codes, params)
        return w if self.input_scale is None else w * self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad or x.device.type != "cpu" or x.dtype != torch.float32:
            if self.input_scale is not None:
                x = x * self.input_scale
            codes, params = self.unpacked()  # autograd, other devices and dtypes: the reference path
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.scheme.dequantize(codes, params).to(x.dtype), bias)
        return self._kernel_product()(x)

    def decode_product(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """`forward` for a caller that runs this layer many times outside
        autograd (a decoding step, core/token_step.py): on the CPU, kernel,
        layout, bias and input scale are looked up once, here, not on every
        call (~20 of a ~100 µs call at the `tiny` preset's MLP shape). A
        product made before the layer changes (`set_kernel`, new values, a
        move) runs the old layout, which for some kernels (`fused` on int8)
        shares the layer's tensors: make a new one after such a change."""
        if next(iter(self.packed().values())).device.type != "cpu":
            return self.forward
        kernel_product = self._kernel_product()
        return lambda x: kernel_product(x) if x.dtype == torch.float32 else self.forward(x)

    def step_product(self) -> object | None:
        """This layer's product, input scale included (not the bias), as the core's whole-layer
        decoding kernel runs it (core/step_kernels.py, `offered_product`): a capsule holding the
        kernel's layout as it is now. None where the layer is not on the CPU in fp32 or its
        kernel offers none (only `fused` does)."""
        scale = self.input_scale
        if next(iter(self.packed().values())).device.type != "cpu" or (
                scale is not None and scale.dtype != torch.float32):
            return None
        kernel, layout = self._kernel_layout()
        if kernel.offer is None:
            return None
        return kernel.offer(layout, None if scale is None else scale.contiguous())

    def _kernel_product(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """x (..., K) fp32 on the CPU -> (x * input_scale) @ Ŵᵀ + bias through this CPU's kernel."""
        (kernel, layout), K, N = self._kernel_layout(), self.in_features, self.out_features
        op, bias, scale = kernel.product(layout), self.bias, self.input_scale
        if kernel.any_rank:  # (..., K) with two dims or more as it comes
            run = lambda x: op(x) if x.dim() > 1 else op(x[None])[0]  # noqa: E731
        else:  # (M, K) only
            run = lambda x: op(x.reshape(-1, K)).reshape(*x.shape[:-1], N)  # noqa: E731
        if bias is None and scale is None:  # the usual layer: nothing around the op
            return run

        def product(x: torch.Tensor) -> torch.Tensor:
            y = run(x if scale is None else x * scale)
            return y if bias is None else y + bias

        return product

    def _kernel_layout(self) -> tuple[Kernel, Any]:
        if self._layout is None:
            kernel = choose_kernel(self.scheme, self.out_features, self.in_features, self.kernel_name)
            codes, params = self.unpacked()
            self._layout = (kernel, kernel.prepare(self.scheme, codes, params))
        return self._layout

    def set_kernel(self, name: str | None) -> None:
        """Use kernel `name` (compress/kernels.py) from the next call; None: the default."""
        self.kernel_name, self._layout = name, None

    @property
    def kernel(self) -> str:
        """The kernel the next call runs on CPU."""
        return self._kernel_layout()[0].name

    def set_packed(self, codes: torch.Tensor, params: QParams) -> None:
        super().set_packed(codes, params)
        self._layout = None

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:  # .to(), .float(), ...: rebuild later
        self._layout = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._layout = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:  # deepcopy and pickle: layouts may be opaque objects
        return {**super().__getstate__(), "_layout": None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.describe()}, bias={self.bias is not None}, "
                f"input_scale={self.input_scale is not None}")


class QuantEmbedding(_Packed):
    """An embedding table stored in a scheme's format, one row per token;
    lookups dequantise only the rows they gather."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: Scheme) -> None:
        scheme.check(num_embeddings, embedding_dim, "the embedding")
        super().__init__(scheme, num_embeddings, embedding_dim)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_codes(cls, codes: torch.Tensor, params: QParams, scheme: Scheme) -> QuantEmbedding:
        table = cls(codes.shape[0], codes.shape[1], scheme)
        table.set_packed(codes, params)
        return table

    @property
    def weight(self) -> torch.Tensor:
        """(V, d) the dequantised table."""
        codes, params = self.unpacked()
        return self.scheme.dequantize(codes, params)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = {name: t.index_select(0, flat) for name, t in self.packed().items()}  # every packed tensor is per row
        codes, params = self.scheme.unpack(rows)
        return self.scheme.dequantize(codes, params).reshape(*ids.shape, self.embedding_dim)  # (..., d)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.describe()}"


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of `model` holds quantised weights."""
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def set_kernel(model: nn.Module, name: str | None) -> int:
    """Run every QuantLinear of `model` on kernel `name` (compress/kernels.py;
    None: this CPU's default); returns how many layers were set. A layer
    whose shape or scheme the kernel does not support keeps its default."""
    if name is not None and name not in KERNELS:
        raise ValueError(f"kernel: unknown {name!r}; known: {', '.join(KERNELS)}")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.set_kernel(name)
    return len(layers)


__all__ = ["QuantEmbedding", "QuantLinear", "is_quantized", "set_kernel"]
