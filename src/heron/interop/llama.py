"""Heron <-> Hugging Face `LlamaForCausalLM`, both ways, driven by two tables.

`LLAMA_WEIGHTS` lists every weight once: a Heron name pattern and the Hugging
Face names it is made of. Heron fuses projections that `transformers` keeps
apart (q, k, v into `attn.qkv`; gate and up into `mlp.up`), so a row may name
several Hugging Face tensors, concatenated along `dim` in the order given.
Split sizes are never computed here: they are read off the target model's
shapes, so the table stays pure data.

`LLAMA_CONFIG` pairs `ModelConfig` fields with `LlamaConfig` fields. Fields
with no Hugging Face counterpart must hold the one value LLaMA implies
(`LLAMA_REQUIRED`); anything else is a ValueError naming the field.

Conversion asserts every key and shape, as nanoGPT's `from_pretrained` does:
a missing, unexpected or mis-shaped tensor is a ValueError naming the key.
Rows whose names a model does not have (biases; `lm_head` when tied) are
skipped, consistently on both sides.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from heron.core.config import ModelConfig, RopeScaling
from heron.core.transformer import Transformer

if TYPE_CHECKING:  # transformers is an optional dependency of Heron
    from transformers import LlamaConfig, LlamaForCausalLM

LAYER = "{i}"  # stands for the block index in a name pattern


@dataclass(frozen=True)
class WeightRow:
    """One Heron tensor and the Hugging Face tensors it is the concatenation of."""

    heron: str
    hf: tuple[str, ...]
    dim: int = 0  # concatenation axis when `hf` names several tensors


_ATTN = "model.layers.{i}.self_attn"
_MLP = "model.layers.{i}.mlp"

LLAMA_WEIGHTS: tuple[WeightRow, ...] = (
    WeightRow("embed.weight", ("model.embed_tokens.weight",)),
    WeightRow("blocks.{i}.attn_norm.weight", ("model.layers.{i}.input_layernorm.weight",)),
    # Heron's qkv rows are q, then k, then v (attention.py, `self.split`).
    WeightRow("blocks.{i}.attn.qkv.weight", (f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight", f"{_ATTN}.v_proj.weight")),
    WeightRow("blocks.{i}.attn.qkv.bias", (f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias")),
    WeightRow("blocks.{i}.attn.out.weight", (f"{_ATTN}.o_proj.weight",)),
    WeightRow("blocks.{i}.attn.out.bias", (f"{_ATTN}.o_proj.bias",)),
    WeightRow("blocks.{i}.mlp_norm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
    # SwiGLU: Heron's `up` rows are gate, then up (mlp.py: silu(gate) * up after `chunk(2)`).
    WeightRow("blocks.{i}.mlp.up.weight", (f"{_MLP}.gate_proj.weight", f"{_MLP}.up_proj.weight")),
    WeightRow("blocks.{i}.mlp.up.bias", (f"{_MLP}.gate_proj.bias", f"{_MLP}.up_proj.bias")),
    WeightRow("blocks.{i}.mlp.down.weight", (f"{_MLP}.down_proj.weight",)),
    WeightRow("blocks.{i}.mlp.down.bias", (f"{_MLP}.down_proj.bias",)),
    WeightRow("norm.weight", ("model.norm.weight",)),
    WeightRow("lm_head.weight", ("lm_head.weight",)),  # absent on both sides when tied
)

# ModelConfig field -> LlamaConfig field, copied as they are.
LLAMA_CONFIG: tuple[tuple[str, str], ...] = (
    ("vocab_size", "vocab_size"),
    ("d_model", "hidden_size"),
    ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"),
    ("max_seq_len", "max_position_embeddings"),
    ("norm_eps", "rms_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"),
    ("mlp_bias", "mlp_bias"),
    ("init_std", "initializer_range"),
)
# ModelConfig fields whose value is fixed by the LLaMA architecture.
LLAMA_REQUIRED: tuple[tuple[str, Any], ...] = (("norm", "rmsnorm"), ("positions", "rope"), ("mlp", "swiglu"))
# LlamaConfig fields Heron has no switch for, and the value it implements.
HF_REQUIRED: tuple[tuple[str, Any], ...] = (("hidden_act", "silu"), ("attention_dropout", 0.0))
# Optional ModelConfig sizes (None: derived by a rule) and the property that resolves them.
DERIVED_SIZES: tuple[tuple[str, str], ...] = (
    ("d_ff", "resolved_d_ff"), ("n_kv_heads", "resolved_kv_heads"), ("head_dim", "resolved_head_dim"),
)
# RopeScaling field -> rope_parameters key, per scaling kind.
ROPE_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "linear": (("factor", "factor"),),
    "llama3": (
        ("factor", "factor"),
        ("low_freq_factor", "low_freq_factor"),
        ("high_freq_factor", "high_freq_factor"),
        ("original_max_seq_len", "original_max_position_embeddings"),
    ),
}


def expand_rows(n_layers: int, rows: tuple[WeightRow, ...] = LLAMA_WEIGHTS) -> Iterator[tuple[str, tuple[str, ...], int]]:
    """Concrete (heron_name, hf_names, dim) for a model with `n_layers` blocks."""
    for row in rows:
        if LAYER not in row.heron:
            yield row.heron, row.hf, row.dim
            continue
        for i in range(n_layers):
            yield row.heron.replace(LAYER, str(i)), tuple(n.replace(LAYER, str(i)) for n in row.hf), row.dim


# ---------------------------------------------------------------------------
# Configs


def llama_config(config: ModelConfig, attn_implementation: str = "sdpa") -> LlamaConfig:
    """The `LlamaConfig` of a Heron config; ValueError names what LLaMA cannot express."""
    from transformers import LlamaConfig

    for field, value in LLAMA_REQUIRED:
        if getattr(config, field) != value:
            raise ValueError(f"{field}: LlamaForCausalLM needs {value!r}, got {getattr(config, field)!r}")
    if config.qkv_bias != config.out_bias:
        raise ValueError("qkv_bias: LlamaForCausalLM has one attention_bias for q, k, v and o; "
                         f"got qkv_bias={config.qkv_bias}, out_bias={config.out_bias}")
    if config.d_model % config.n_heads:
        raise ValueError(f"n_heads: transformers requires d_model ({config.d_model}) divisible by n_heads ({config.n_heads})")
    sparse = [i for i in range(config.n_layers) if config.attention_pattern(i).kind != "dense"]
    if sparse:
        raise ValueError(f"attention: layer {sparse[0]} is {config.attention_pattern(sparse[0]).kind!r}; "
                         "LlamaForCausalLM has dense attention only")
    if any(config.is_moe_layer(i) for i in range(config.n_layers)):
        raise ValueError("feed_forward: LlamaForCausalLM has no Mixture-of-Experts layers")
    return LlamaConfig(
        **{hf: getattr(config, heron) for heron, hf in LLAMA_CONFIG},
        intermediate_size=config.resolved_d_ff,
        num_key_value_heads=config.resolved_kv_heads,
        head_dim=config.resolved_head_dim,
        attention_bias=config.qkv_bias,
        rope_parameters=_hf_rope(config),
        bos_token_id=None,  # token ids belong to the tokenizer, which a ModelConfig does not know
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation=attn_implementation,
    )


def heron_config(hf_config: LlamaConfig) -> ModelConfig:
    """The `ModelConfig` of a `LlamaConfig`; ValueError names what Heron cannot express.

    Sizes that equal Heron's defaults are left as None (derived), so a Heron
    config survives the trip through Hugging Face unchanged.
    """
    for field, value in HF_REQUIRED:
        if getattr(hf_config, field) != value:
            raise ValueError(f"{field}: Heron implements {value!r} only, got {getattr(hf_config, field)!r}")
    bias = bool(hf_config.attention_bias)
    config = ModelConfig(
        **{heron: getattr(hf_config, hf) for heron, hf in LLAMA_CONFIG},
        d_ff=hf_config.intermediate_size,
        n_kv_heads=hf_config.num_key_value_heads,
        head_dim=hf_config.head_dim,
        qkv_bias=bias,
        out_bias=bias,
        **_heron_rope(dict(hf_config.rope_parameters)),
    )
    derived = config.replace(**{field: None for field, _ in DERIVED_SIZES})
    return config.replace(**{
        field: None for field, resolved in DERIVED_SIZES if getattr(derived, resolved) == getattr(config, resolved)
    })


def _hf_rope(config: ModelConfig) -> dict[str, Any]:
    scaling = config.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    keys = ROPE_KEYS[scaling.kind]
    return {"rope_type": scaling.kind, "rope_theta": config.rope_theta, **{hf: getattr(scaling, h) for h, hf in keys}}


def _heron_rope(params: dict[str, Any]) -> dict[str, Any]:
    kind = params.pop("rope_type", "default")
    theta = params.pop("rope_theta", None)
    if theta is None:
        raise ValueError("rope_parameters.rope_theta: missing")
    if params.get("partial_rotary_factor", 1.0) == 1.0:
        params.pop("partial_rotary_factor", None)
    if kind == "default":
        scaling = None
    elif kind in ROPE_KEYS:
        missing = [hf for _, hf in ROPE_KEYS[kind] if hf not in params]
        if missing:
            raise ValueError(f"rope_parameters.{missing[0]}: required for rope_type {kind!r}")
        scaling = RopeScaling(kind=kind, **{h: params.pop(hf) for h, hf in ROPE_KEYS[kind]})
    else:
        raise ValueError(f"rope_parameters.rope_type: {kind!r} is not one of default, {', '.join(ROPE_KEYS)}")
    if params:
        raise ValueError(f"rope_parameters.{sorted(params)[0]}: not supported by Heron's RoPE")
    return {"rope_theta": float(theta), "rope_scaling": scaling}


# ---------------------------------------------------------------------------
# Weights: pure functions of name -> tensor mappings


def heron_to_hf_weights(
    heron: Mapping[str, torch.Tensor],  # Heron name -> tensor
    hf_shapes: Mapping[str, torch.Size],  # every parameter the Hugging Face model has
    n_layers: int,
) -> dict[str, torch.Tensor]:
    """Split Heron's tensors into the Hugging Face tensors `hf_shapes` asks for."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for heron_name, hf_names, dim in expand_rows(n_layers):
        if not _row_present(hf_names, hf_shapes):
            continue
        source = _take(heron, heron_name, "Heron weights")
        used.add(heron_name)
        parts = [hf_shapes[n] for n in hf_names]
        _check_shape(heron_name, source.shape, _joined_shape(parts, dim), f"from {_describe(hf_names, parts)}")
        out.update(zip(hf_names, source.split([p[dim] for p in parts], dim=dim)))
    _check_complete(out, hf_shapes, heron, used)
    return out


def hf_to_heron_weights(
    hf: Mapping[str, torch.Tensor],  # Hugging Face name -> tensor
    heron_shapes: Mapping[str, torch.Size],  # every parameter the Heron model has
    n_layers: int,
) -> dict[str, torch.Tensor]:
    """Concatenate Hugging Face tensors into the Heron tensors `heron_shapes` asks for."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for heron_name, hf_names, dim in expand_rows(n_layers):
        if heron_name not in heron_shapes:
            continue
        parts = [_take(hf, n, "Hugging Face weights") for n in hf_names]
        used.update(hf_names)
        shapes = [p.shape for p in parts]
        _check_shape(heron_name, _joined_shape(shapes, dim), heron_shapes[heron_name], f"from {_describe(hf_names, shapes)}")
        out[heron_name] = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
    _check_complete(out, heron_shapes, hf, used)
    return out


def _row_present(names: tuple[str, ...], shapes: Mapping[str, torch.Size]) -> bool:
    present = [n in shapes for n in names]
    if any(present) and not all(present):
        missing = names[present.index(False)]
        raise ValueError(f"{missing}: missing from the target model, which has its partners {names}")
    return all(present)


def _take(weights: Mapping[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    if name not in weights:
        raise ValueError(f"{name}: missing from the {where}")
    return weights[name]


def _joined_shape(shapes: list[torch.Size], dim: int) -> torch.Size:
    first = list(shapes[0])
    for s in shapes[1:]:
        if len(s) != len(first) or any(a != b for j, (a, b) in enumerate(zip(s, first)) if j != dim):
            return torch.Size([-1])  # cannot be concatenated: reported as a mismatch by the caller
    first[dim] = sum(s[dim] for s in shapes)
    return torch.Size(first)


def _check_shape(name: str, got: torch.Size, want: torch.Size, context: str) -> None:
    if got != want:
        raise ValueError(f"{name}: shape {tuple(got)} does not match {tuple(want)} ({context})")


def _describe(names: tuple[str, ...], shapes: list[torch.Size]) -> str:
    return ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes))


def _check_complete(
    out: Mapping[str, torch.Tensor], want: Mapping[str, Any], source: Mapping[str, Any], used: set[str]
) -> None:
    """Every target tensor made, every source tensor used."""
    for name in want:
        if name not in out:
            raise ValueError(f"{name}: no row of LLAMA_WEIGHTS produces this parameter")
    for name in source:
        if name not in used:
            raise ValueError(f"{name}: unexpected weight, not used by the target model")


# ---------------------------------------------------------------------------
# Models


def to_hf_llama(model: Transformer, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A `transformers` LlamaForCausalLM computing the same function as `model`."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(llama_config(model.config, attn_implementation))
    hf.to(dtype=_dtype(model), device=_device(model))
    hf_shapes = {n: p.shape for n, p in hf.named_parameters()}  # tied lm_head appears once
    _load(hf, heron_to_hf_weights(dict(model.named_parameters()), hf_shapes, model.config.n_layers))
    return hf.train(model.training)


def from_hf_llama(hf_model: LlamaForCausalLM) -> Transformer:
    """A Heron Transformer computing the same function as a LlamaForCausalLM."""
    config = heron_config(hf_model.config)
    model = Transformer(config).to(dtype=_dtype(hf_model), device=_device(hf_model))
    heron_shapes = {n: p.shape for n, p in model.named_parameters()}
    _load(model, hf_to_heron_weights(dict(hf_model.named_parameters()), heron_shapes, config.n_layers))
    return model.train(hf_model.training)


@torch.no_grad()
def _load(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        param.copy_(weights[name])  # keys and shapes checked by the *_weights functions


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


__all__ = [
    "LLAMA_CONFIG",
    "LLAMA_WEIGHTS",
    "WeightRow",
    "expand_rows",
    "from_hf_llama",
    "heron_config",
    "heron_to_hf_weights",
    "hf_to_heron_weights",
    "llama_config",
    "to_hf_llama",
]
