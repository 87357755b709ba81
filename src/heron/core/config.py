"""ModelConfig: the one description of a Heron model.

A frozen dataclass that round-trips through JSON. Validation happens at
construction, so a bad config fails before any weights are allocated, with a
message that names the field.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned", "none")
MLPS = ("swiglu", "gelu", "gelu_tanh")
ROPE_SCALINGS = ("linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling for RoPE context extension.

    kind="linear" divides every position by `factor` (Chen et al. 2023,
    "position interpolation"); kind="llama3" rescales only the low-frequency
    bands, as in Meta's Llama 3.1 reference `apply_scaling`.
    """

    kind: str = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        _check_choice("rope_scaling.kind", self.kind, ROPE_SCALINGS)
        _check_positive("rope_scaling.factor", self.factor)
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("rope_scaling.high_freq_factor must exceed rope_scaling.low_freq_factor")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and parts of a decoder-only Transformer."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: multi-head; 1: multi-query; else grouped-query
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int | None = None  # None: 4 * d_model (gelu) or LLaMA's 8/3 rule (swiglu)
    max_seq_len: int = 1024
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    positions: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    mlp: str = "swiglu"
    tie_embeddings: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _check_positive(name, getattr(self, name))
        _check_choice("norm", self.norm, NORMS)
        _check_choice("positions", self.positions, POSITIONS)
        _check_choice("mlp", self.mlp, MLPS)
        if self.n_kv_heads is not None:
            _check_positive("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"n_kv_heads: {self.n_heads} query heads cannot be shared evenly "
                    f"by {self.n_kv_heads} key/value heads"
                )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"n_heads: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.head_dim is not None:
            _check_positive("head_dim", self.head_dim)
        if self.positions == "rope" and self.resolved_head_dim % 2:
            raise ValueError(f"head_dim: RoPE needs an even head size, got {self.resolved_head_dim}")
        if self.d_ff is not None:
            _check_positive("d_ff", self.d_ff)
        _check_positive("norm_eps", self.norm_eps)
        if self.rope_scaling is not None and self.positions != "rope":
            raise ValueError(f"rope_scaling: set, but positions={self.positions!r} is not 'rope'")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def resolved_d_ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp != "swiglu":
            return 4 * self.d_model
        # LLaMA: 2/3 of 4*d, rounded up to a multiple of 64 for matmul-friendly shapes.
        hidden = int(8 * self.d_model / 3)
        return 64 * ((hidden + 63) // 64)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed, validated like a new config."""
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict; unknown keys are errors that name the key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown ModelConfig field (known: {', '.join(sorted(known))})")
        values = dict(data)
        scaling = values.get("rope_scaling")
        if isinstance(scaling, dict):
            scaling_known = {f.name for f in dataclasses.fields(RopeScaling)}
            bad = sorted(set(scaling) - scaling_known)
            if bad:
                raise ValueError(f"rope_scaling.{bad[0]}: unknown field")
            values["rope_scaling"] = RopeScaling(**scaling)
        _check_types(cls, values)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "int | None": (int, type(None)),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
}


def _check_types(cls: type, values: dict[str, Any]) -> None:
    """JSON and YAML hand us loosely typed values; reject the wrong kind early."""
    for f in dataclasses.fields(cls):
        if f.name not in values or f.type not in _FIELD_TYPES:
            continue
        value = values[f.name]
        allowed = _FIELD_TYPES[f.type]
        is_bool_for_number = isinstance(value, bool) and bool not in allowed
        if not isinstance(value, allowed) or is_bool_for_number:
            raise ValueError(f"{f.name}: expected {f.type}, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name}: must be positive, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}")


__all__ = ["ModelConfig", "RopeScaling"]
