"""Weight formats: each a small registered class of pure functions.

A scheme maps a weight W (N out, K in) to integer codes and per-group
parameters, and back. Parameters are always (N, G) tensors, G = K / group
columns, so one set of functions serves whole matrices, single columns (GPTQ
quantises column by column) and gathered rows (embedding lookups):
the group width is the code width over the parameter width.

    scheme = get_scheme("int4", group_size=128)
    params = scheme.fit(w)                  # (N, G) each
    codes = scheme.quantize(w, params)      # (N, K) integers
    w_hat = scheme.dequantize(codes, params)
    tensors = scheme.pack(codes, params)    # what model.safetensors stores

`pack`'s tensors are the on-disk truth; kernels build their own layouts from
them at load time (compress/kernels.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

FP16_TINY, FP16_MAX = 2.0**-24, 65504.0  # smallest positive (subnormal) and largest finite fp16


@dataclass(frozen=True)
class QParams:
    """Quantisation parameters, one column per group."""

    scale: torch.Tensor  # (N, G) float32
    zero: torch.Tensor | None = None  # (N, G) integer zero points (asymmetric schemes), else None

    def columns(self, start: int, stop: int) -> QParams:
        """The parameters of groups start..stop-1."""
        zero = None if self.zero is None else self.zero[:, start:stop]
        return QParams(self.scale[:, start:stop], zero)


class Scheme(Protocol):
    """What every weight format provides. `group_size(K)` is the number of
    input columns that share one set of parameters."""

    name: ClassVar[str]
    bits: ClassVar[int]
    code_dtype: ClassVar[torch.dtype]  # what `quantize` returns

    def group_size_for(self, in_features: int) -> int: ...
    def check(self, out_features: int, in_features: int, where: str = "weight") -> None: ...
    def fit(self, w: torch.Tensor) -> QParams: ...
    def quantize(self, w: torch.Tensor, params: QParams) -> torch.Tensor: ...
    def dequantize(self, codes: torch.Tensor, params: QParams) -> torch.Tensor: ...
    def pack(self, codes: torch.Tensor, params: QParams) -> dict[str, torch.Tensor]: ...
    def unpack(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, QParams]: ...
    def packed_specs(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]: ...
    def describe(self) -> dict[str, object]: ...


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= x (x >= 0), as float32, within [2^-24, 65504].
    Why up, not to nearest: a scale below the exact one puts a group's extreme
    weights past the last code, and fp16's subnormals (below 2^-14) are so
    coarse that nearest can lose a third of a tiny group's largest weight."""
    rounded = x.half()
    rounded = torch.where(rounded.float() < x, torch.nextafter(rounded, torch.full_like(rounded, torch.inf)), rounded)
    return rounded.float().clamp(FP16_TINY, FP16_MAX)


def _expand(params: torch.Tensor, width: int) -> torch.Tensor:
    """(N, G) -> (N, width): each group's value repeated over its columns."""
    return params.repeat_interleave(width // params.shape[1], dim=1)


@dataclass(frozen=True)
class Int8PerChannel:
    """Symmetric int8, one fp32 scale per output row (as LLM.int8's weight
    quantiser, Dettmers et al. 2022, without the outlier split).

    code = clamp(round(w / s), -127, 127), s = max|w_row| / 127; w ≈ s * code.
    -128 is never used, so the grid is symmetric about zero and zero is exact.
    """

    name: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8
    code_dtype: ClassVar[torch.dtype] = torch.int8

    def group_size_for(self, in_features: int) -> int:
        return in_features

    def check(self, out_features: int, in_features: int, where: str = "weight") -> None:
        if out_features < 1 or in_features < 1:
            raise ValueError(f"{where}: empty weight ({out_features}, {in_features})")

    def fit(self, w: torch.Tensor) -> QParams:
        absmax = w.abs().amax(dim=1, keepdim=True).float()  # (N, 1)
        return QParams(torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)))

    def quantize(self, w: torch.Tensor, params: QParams) -> torch.Tensor:
        scale = _expand(params.scale, w.shape[1])  # (N, K)
        return torch.round(w.float() / scale).clamp_(-127, 127).to(torch.int8)

    def dequantize(self, codes: torch.Tensor, params: QParams) -> torch.Tensor:
        return codes.float() * _expand(params.scale, codes.shape[1])  # (N, K)

    def pack(self, codes: torch.Tensor, params: QParams) -> dict[str, torch.Tensor]:
        return {"qweight": codes.to(torch.int8).contiguous(), "scale": params.scale[:, 0].float().contiguous()}

    def unpack(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, QParams]:
        return tensors["qweight"], QParams(tensors["scale"].float().unsqueeze(1))

    def packed_specs(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"qweight": ((out_features, in_features), torch.int8), "scale": ((out_features,), torch.float32)}

    def describe(self) -> dict[str, object]:
        return {"scheme": self.name}


@dataclass(frozen=True)
class Int4Grouped:
    """Asymmetric int4 over groups of `group_size` input columns, as GPTQ
    (Frantar et al. 2022) and AWQ (Lin et al. 2023) quantise.

    Per group: lo = min(w, 0), hi = max(w, 0), s = (hi - lo) / 15 rounded up to
    fp16, z = clamp(round(-lo / s), 0, 15); code = clamp(round(w / s) + z, 0, 15),
    w ≈ s * (code - z). Why asymmetric: a group's weights are rarely centred,
    and a zero point spends all 16 levels on the range actually used (the
    GPTQ reference quantiser; the range always includes 0, so zero is exact).
    Why fp16 scales: 16 bits per 128 weights instead of 32 keeps the whole
    checkpoint under 0.16x fp32 with int8 embeddings; codes are computed
    against the rounded scale, so the packed tensors are exact. Why rounded up
    (`_fp16_at_least`): a scale rounded down leaves the group's extremes off
    the grid, and for a tiny group (a subnormal fp16 scale, spacing 2^-24) by
    several steps: up, every weight is within half a step of its value.

    With `symmetric`, every zero point is 8 and the scale is signed, as in
    llama.cpp's Q4_0: s = m / -8 for m the group's weight of largest |w|, so
    m lands on the grid's far end (code 0) and the eight levels on m's side
    of zero cover it (|s| rounded up, as above); codes and scales then go into
    a GGUF Q4_0 file unchanged (compress/gguf_export.py). The asymmetric grid
    goes to Q4_1.

    Packed: qweight (N, K/2) uint8, column 2j in the low nibble and 2j+1 in
    the high one; scale (N, G) fp16; zero (N, G) uint8.
    """

    group_size: int = 128
    symmetric: bool = False
    name: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4
    code_dtype: ClassVar[torch.dtype] = torch.uint8

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size: expected an even integer >= 2, got {self.group_size!r}")

    def group_size_for(self, in_features: int) -> int:
        return self.group_size

    def check(self, out_features: int, in_features: int, where: str = "weight") -> None:
        if in_features % self.group_size:
            divisors = [g for g in range(16, 257, 2) if in_features % g == 0]
            hint = f"; even divisors of {in_features} from 16 to 256: {divisors}" if divisors else ""
            raise ValueError(
                f"group_size: {self.group_size} does not divide the {in_features} input features of {where}{hint}"
            )

    def fit(self, w: torch.Tensor) -> QParams:
        N, K = w.shape
        groups = w.float().reshape(N, K // self.group_size, self.group_size)  # (N, G, g)
        if self.symmetric:
            return self._fit_symmetric(groups)
        lo = groups.amin(dim=2).clamp(max=0)  # (N, G)
        hi = groups.amax(dim=2).clamp(min=0)
        scale = _fp16_at_least((hi - lo) / 15)  # exactly representable in fp16
        scale = torch.where(hi > lo, scale, torch.ones_like(scale))  # an all-zero group: any scale, codes = z
        zero = torch.round(-lo / scale).clamp(0, 15)
        return QParams(scale, zero.to(torch.uint8))

    @staticmethod
    def _fit_symmetric(groups: torch.Tensor) -> QParams:
        """Q4_0's grid for (N, G, g) groups: zero 8, scale m / -8 with |s| rounded up to fp16."""
        extreme = groups.gather(2, groups.abs().argmax(dim=2, keepdim=True)).squeeze(2)  # (N, G) signed
        magnitude = _fp16_at_least(extreme.abs() / 8)
        signed = torch.where(extreme > 0, -magnitude, magnitude)
        scale = torch.where(extreme != 0, signed, torch.ones_like(magnitude))  # all-zero group: codes 8
        return QParams(scale, torch.full_like(scale, 8, dtype=torch.uint8))

    def quantize(self, w: torch.Tensor, params: QParams) -> torch.Tensor:
        K = w.shape[1]
        scale, zero = _expand(params.scale, K), _expand(params.zero, K).float()  # (N, K)
        return (torch.round(w.float() / scale) + zero).clamp_(0, 15).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor, params: QParams) -> torch.Tensor:
        K = codes.shape[1]
        return (codes.float() - _expand(params.zero, K).float()) * _expand(params.scale, K)  # (N, K)

    def pack(self, codes: torch.Tensor, params: QParams) -> dict[str, torch.Tensor]:
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # (N, K/2)
        return {
            "qweight": packed.to(torch.uint8).contiguous(),
            "scale": params.scale.half().contiguous(),
            "zero": params.zero.to(torch.uint8).contiguous(),
        }

    def unpack(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, QParams]:
        packed = tensors["qweight"]  # (N, K/2)
        N, half = packed.shape  # N may be 0 (an embedding looking up no ids): reshape's -1 cannot say K then
        codes = torch.stack((packed & 0x0F, packed >> 4), dim=2).reshape(N, 2 * half)  # (N, K)
        return codes, QParams(tensors["scale"].float(), tensors["zero"])

    def packed_specs(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        G = in_features // self.group_size
        return {
            "qweight": ((out_features, in_features // 2), torch.uint8),
            "scale": ((out_features, G), torch.float16),
            "zero": ((out_features, G), torch.uint8),
        }

    def describe(self) -> dict[str, object]:
        return {"scheme": self.name, "group_size": self.group_size, **({"symmetric": True} if self.symmetric else {})}


SCHEMES: dict[str, type] = {"int8": Int8PerChannel, "int4": Int4Grouped}


def get_scheme(name: str, group_size: int | None = None, symmetric: bool = False) -> Scheme:
    """The scheme registered as `name`; `group_size` and `symmetric` apply to grouped schemes."""
    if name not in SCHEMES:
        raise ValueError(f"scheme: unknown {name!r}; known: {', '.join(SCHEMES)}")
    cls = SCHEMES[name]
    if cls is not Int4Grouped:
        return cls()
    return cls(**({} if group_size is None else {"group_size": group_size}), symmetric=symmetric)


def scheme_from_description(info: dict[str, object]) -> Scheme:
    """Inverse of `Scheme.describe()` (read back from quantization.json)."""
    return get_scheme(str(info["scheme"]), info.get("group_size"), bool(info.get("symmetric", False)))  # type: ignore[arg-type]


def quantize_rtn(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, QParams]:
    """Round-to-nearest: fit parameters on w, then round every weight."""
    params = scheme.fit(w)
    return scheme.quantize(w, params), params


__all__ = [
    "Int4Grouped", "Int8PerChannel", "QParams", "SCHEMES", "Scheme", "get_scheme", "quantize_rtn",
    "scheme_from_description",
]
