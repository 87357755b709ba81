"""ModelConfig: the one description of a Heron model.

A frozen dataclass that round-trips through JSON. Validation happens at
construction, so a bad config fails before any weights are allocated, with a
message that names the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned", "none")
MLPS = ("swiglu", "gelu", "gelu_tanh")
# The settings each RoPE scaling kind reads (RopeScaling's docstring says how).
ROPE_SCALING_FIELDS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"),
}
ROPE_SCALINGS = tuple(ROPE_SCALING_FIELDS)
# The settings each attention kind reads (AttentionPattern's docstring says how).
PATTERN_FIELDS = {
    "dense": (),
    "sliding": ("window",),
    "dilated": ("window", "dilation"),
    "strided": ("stride",),
    "fixed": ("block", "summary"),
    "bigbird": ("block", "local_blocks", "global_blocks", "random_blocks", "seed"),
}
ATTENTION_KINDS = tuple(PATTERN_FIELDS)
FEED_FORWARDS = ("dense", "moe", "none")  # "none": an attention-only block (core/transformer.py Block)
HEADS = ("lm", "scalar")


@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling for RoPE context extension.

    kind="linear" divides every position by `factor` (Chen et al. 2023,
    "position interpolation"); kind="llama3" rescales only the low-frequency
    bands, as in Meta's Llama 3.1 reference `apply_scaling`. linear reads only
    `factor`; another field set on it is an error, as on AttentionPattern.
    """

    kind: str = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, ROPE_SCALINGS)
        _check_used(self, ROPE_SCALING_FIELDS, "scaling")
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"):
            _check_positive(name, getattr(self, name))  # ratios and a length; llama3 divides by them (core/rope.py)
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"high_freq_factor: must exceed low_freq_factor ({self.low_freq_factor:g}), "
                             f"got {self.high_freq_factor:g}")


@dataclass(frozen=True)
class AttentionPattern:
    """Which earlier tokens a query may attend to; every pattern is causal.

    With i the query's position and j a key's (j <= i):
    - dense: every j.
    - sliding: i - j < window (Longformer's local attention; Mistral, GPT-Neo).
    - dilated: i - j = m * dilation for m < window (Longformer's dilated window).
    - strided: i - j < stride, or (i - j) % stride == 0 (Child et al. 2019;
      stride near sqrt(n) costs O(n sqrt(n))).
    - fixed: j in i's block of `block` tokens, or j among the last `summary`
      tokens of its block (Child et al. 2019).
    - bigbird: in blocks of `block` tokens, i's block and the `local_blocks`
      blocks before it, the first `global_blocks` blocks, and `random_blocks`
      earlier blocks drawn per query block with `seed` (Zaheer et al. 2020).
    """

    kind: str = "dense"
    window: int = 256
    dilation: int = 2
    stride: int = 128
    block: int = 64
    summary: int = 8
    local_blocks: int = 1
    global_blocks: int = 1
    random_blocks: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, ATTENTION_KINDS)
        _check_used(self, PATTERN_FIELDS, "pattern")
        for name in ("window", "dilation", "stride", "block", "summary"):
            _check_positive(name, getattr(self, name))
        for name in ("local_blocks", "global_blocks", "random_blocks", "seed"):
            _check_non_negative(name, getattr(self, name))
        if self.kind == "fixed" and self.summary > self.block:
            raise ValueError(f"summary: {self.summary} exceeds block {self.block}")

    @property
    def span(self) -> int | None:
        """The largest i - j + 1 the pattern allows, or None when unbounded:
        a bounded span lets the KV cache keep only that many recent keys."""
        if self.kind == "sliding":
            return self.window
        if self.kind == "dilated":
            return (self.window - 1) * self.dilation + 1
        return None


@dataclass(frozen=True)
class MoEConfig:
    """A Mixture-of-Experts feed-forward: `n_experts` SwiGLU/GELU experts of
    width `d_ff`, each token routed to `top_k` of them (Shazeer et al. 2017;
    Fedus et al. 2022, Switch; Zoph et al. 2022, ST-MoE).

    capacity_factor None is dropless; otherwise an expert takes at most
    ceil(capacity_factor * tokens * top_k / n_experts) tokens (exactly, on the
    factor's decimal value: core/moe.py `expert_capacity`) and drops the
    rest (they pass through on the residual stream). Tokens here are those
    the routing statistics count: padding buys no capacity (core/moe.py).

    router_centering routes each token on its difference from the mean MoE
    input (the batch's in training, a running mean in evaluation) rather
    than on the input itself; core/moe.py says why.

    routed_scale multiplies the chosen experts' weights (DeepSeek-V2/V3's
    `routed_scaling_factor`); with top_k renormalised weights, routed_scale
    = top_k makes the experts' weights sum to top_k, as a dense MLP of
    their summed width would weigh its halves (core/moe.py `route`).
    """

    n_experts: int = 8
    top_k: int = 2
    d_ff: int | None = None  # None: the dense d_ff divided by top_k, so active parameters match
    shared_expert: bool = False
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01  # alpha of the Switch load-balancing loss
    z_loss_coef: float = 0.001  # ST-MoE router z-loss
    router_centering: bool = False
    routed_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("n_experts", self.n_experts)
        _check_positive("top_k", self.top_k)
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k: {self.top_k} exceeds n_experts {self.n_experts}")
        if self.d_ff is not None:
            _check_positive("d_ff", self.d_ff)
        if self.capacity_factor is not None:
            _check_positive("capacity_factor", self.capacity_factor)
        _check_positive("routed_scale", self.routed_scale)
        for name in ("aux_loss_coef", "z_loss_coef"):
            _check_non_negative(name, getattr(self, name))


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
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    # RoPE on part of each head (GPT-NeoX's rotary_pct): None rotates all of it. The rotated dims
    # are the first rotary_dim / 2 and as many from head_dim / 2 on, so rotate-half's pairs stay
    # head_dim / 2 apart (core/rope.py); the rest pass through.
    rotary_dim: int | None = None
    parallel_residual: bool = False  # x + attn(norm(x)) + mlp(norm'(x)), as GPT-NeoX and GPT-J
    init_std: float = 0.02
    attn_scale: float | None = None  # softmax(scale * q.k); None: 1/sqrt(head_dim). GPT-Neo uses 1.0
    head: str = "lm"  # "lm": next-token logits (B, T, vocab); "scalar": one number per position (reward, value)
    # Per-layer schedules, cycled over the layers (their length must divide
    # n_layers): (dense, sliding) alternates like GPT-Neo. Empty: all dense.
    attention: tuple[AttentionPattern, ...] = ()
    feed_forward: tuple[str, ...] = ()  # "dense", "moe" or "none" per layer; empty: all dense
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        self._normalise_parts()
        _check_types(ModelConfig, vars(self))  # ModelConfig(tie_embeddings="no") as from_dict would refuse it
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _check_positive(name, getattr(self, name))
        _check_choice("norm", self.norm, NORMS)
        _check_choice("positions", self.positions, POSITIONS)
        _check_choice("mlp", self.mlp, MLPS)
        _check_choice("head", self.head, HEADS)
        if self.head == "scalar" and self.tie_embeddings:
            raise ValueError("tie_embeddings: a scalar head cannot share the token embedding")
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
        _check_positive("rope_theta", self.rope_theta)  # 0 or inf: NaN RoPE tables
        _check_non_negative("init_std", self.init_std)
        if self.attn_scale is not None:
            _check_positive("attn_scale", self.attn_scale)
        if self.rotary_dim is not None:
            if self.positions != "rope":
                raise ValueError(f"rotary_dim: set, but positions={self.positions!r} is not 'rope'")
            if not 0 < self.rotary_dim <= self.resolved_head_dim or self.rotary_dim % 2:
                raise ValueError(f"rotary_dim: must be even and in (0, head_dim {self.resolved_head_dim}], "
                                 f"got {self.rotary_dim}")
        if self.rope_scaling is not None and self.positions != "rope":
            raise ValueError(f"rope_scaling: set, but positions={self.positions!r} is not 'rope'")
        for name in ("attention", "feed_forward"):
            schedule = getattr(self, name)
            if schedule and self.n_layers % len(schedule):
                raise ValueError(f"{name}: {len(schedule)} entries do not cycle evenly over {self.n_layers} layers")
        for i, kind in enumerate(self.feed_forward):
            _check_choice(f"feed_forward[{i}]", kind, FEED_FORWARDS)
        if "moe" in self.feed_forward and self.moe is None:
            raise ValueError("moe: feed_forward names 'moe' layers but no moe settings are given")
        if self.moe is not None and "moe" not in self.feed_forward:
            raise ValueError("moe: settings are given but feed_forward names no 'moe' layer (e.g. [moe], or "
                             "[dense, moe] to alternate)")

    def _normalise_parts(self) -> None:
        """Nested settings given as mappings (JSON, YAML, Python dicts) become their config
        classes and lists become tuples, so a config built either way is the same frozen value;
        anything else is an error naming the field."""
        parts = {"rope_scaling": _part(RopeScaling, self.rope_scaling, "rope_scaling", "{kind: linear, factor: 2.0}"),
                 "moe": _part(MoEConfig, self.moe, "moe", "{n_experts: 8, top_k: 2}")}
        for name, example in (("attention", "[{kind: sliding, window: 128}]"), ("feed_forward", "[dense, moe]")):
            schedule = getattr(self, name)
            if not isinstance(schedule, (list, tuple)):
                raise ValueError(f"{name}: expected a list such as {example}, got {schedule!r}")
            parts[name] = tuple(schedule)
        parts["attention"] = tuple(_part(AttentionPattern, p, f"attention[{i}]", "{kind: sliding, window: 128}")
                                   for i, p in enumerate(parts["attention"]))
        for i, kind in enumerate(parts["feed_forward"]):
            if not isinstance(kind, str):
                raise ValueError(f"feed_forward[{i}]: expected one of {', '.join(FEED_FORWARDS)}, got {kind!r}")
        for name, value in parts.items():
            object.__setattr__(self, name, value)  # frozen: the one place values are settled

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

    @property
    def resolved_expert_d_ff(self) -> int:
        """An expert's hidden width: moe.d_ff, or the dense width over top_k so
        that a token's active parameters match a dense MLP's."""
        if self.moe is None:
            raise ValueError("moe: this config has no Mixture-of-Experts settings")
        return self.moe.d_ff or max(1, self.resolved_d_ff // self.moe.top_k)

    def attention_pattern(self, layer: int) -> AttentionPattern:
        return self.attention[layer % len(self.attention)] if self.attention else DENSE

    def feed_forward_kind(self, layer: int) -> str:
        return self.feed_forward[layer % len(self.feed_forward)] if self.feed_forward else "dense"

    def is_moe_layer(self, layer: int) -> bool:
        return self.feed_forward_kind(layer) == "moe"

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
        check_fields(cls, data, "")
        return cls(**data)  # the constructor checks types and builds nested settings

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "int | None": (int, type(None)),
    "float": (int, float),
    "float | None": (int, float, type(None)),
    "str": (str,),
    "bool": (bool,),
}


def _part(cls: type, value: Any, where: str, example: str) -> Any:
    """A nested setting as a `cls`: itself, None where the field allows it (not in a list),
    or built from a mapping with errors prefixed by `where`."""
    if isinstance(value, cls) or (value is None and not where.endswith("]")):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping such as {example}, got {value!r}")
    check_fields(cls, value, f"{where}.")
    try:
        _check_types(cls, value)
        return cls(**value)
    except ValueError as err:
        raise ValueError(f"{where}.{err}") from None


def check_fields(cls: type, data: Mapping[str, Any], prefix: str = "") -> None:
    """ValueError naming the first key of `data` that is not a field of dataclass `cls`, or the
    fields without a default that `data` leaves out (the constructor's TypeError names neither
    the file nor the setting)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix or cls.__name__}: expected a mapping of {cls.__name__} fields, got {data!r}")
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown {cls.__name__} field (known: {', '.join(sorted(known))})")
    missing = [f.name for f in fields if f.name not in data and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{prefix}{missing[0]}: missing; {cls.__name__} needs {', '.join(missing)}")


def _check_types(cls: type, values: Mapping[str, Any]) -> None:
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
    if not 0 < value < math.inf:  # written so that NaN fails too
        raise ValueError(f"{name}: must be positive and finite, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not 0 <= value < math.inf:  # written so that NaN fails too
        raise ValueError(f"{name}: must be >= 0 and finite, got {value!r}")


def _check_used(part: Any, fields_by_kind: Mapping[str, tuple[str, ...]], what: str) -> None:
    """ValueError naming the first field of `part`, a dataclass with a `kind`, set away from
    its default though its kind does not read it: a setting the kind ignores is a mistake,
    not a no-op ({kind: dense, window: 128} meant a window)."""
    uses = fields_by_kind[part.kind]
    for f in dataclasses.fields(part):
        if f.name != "kind" and f.name not in uses and getattr(part, f.name) != f.default:
            kinds = ", ".join(k for k, names in fields_by_kind.items() if f.name in names)
            raise ValueError(f"{f.name}: a {part.kind} {what} does not use it "
                             f"(its fields: {', '.join(uses) or 'none'}); set kind to one that does ({kinds})")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}")


DENSE = AttentionPattern()

__all__ = ["AttentionPattern", "DENSE", "MoEConfig", "ModelConfig", "RopeScaling", "check_fields"]
