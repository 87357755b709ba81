"""Hugging Face model families: a weight-name table and a config mapping each.

A `Family` is data: the `config.json` `model_type` and architecture it
reads and writes, its `WeightRow` table (tables.py), the `ModelConfig` fields
copied one to one from `config.json` keys, the fields the architecture fixes,
and the `config.json` values Heron implements only. What does not fit a
one-to-one copy (rope scaling, sliding windows, GPT-Neo's layer schedule,
Mixtral's experts) is one small function per concern, shared by the families
that have it.

`family_config(family, hf)` and `hf_config(family, config)` go between a
`config.json` dict and a `ModelConfig`. Both fail with a ValueError naming
the field when a value has no counterpart on the other side.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from heron.core.config import DENSE, AttentionPattern, ModelConfig, MoEConfig, RopeScaling
from heron.interop.tables import WeightRow

HfConfig = dict[str, Any]


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # config.json "model_type"
    architecture: str  # config.json "architectures"[0] on export
    weights: tuple[WeightRow, ...]
    fields: tuple[tuple[str, str], ...]  # ModelConfig field <-> config.json key, copied as they are
    fixed: tuple[tuple[str, Any], ...]  # ModelConfig fields whose value the architecture implies
    hf_fixed: tuple[tuple[str, Any], ...] = ()  # config.json keys whose value Heron implements only
    read: tuple[Callable[[HfConfig], dict[str, Any]], ...] = ()  # config.json -> more ModelConfig fields
    write: tuple[Callable[[ModelConfig], HfConfig], ...] = ()  # ModelConfig -> more config.json keys
    ignored: tuple[str, ...] = ()  # regexes of checkpoint tensors that hold no weights (mask buffers)
    # transformers' defaults for config.json keys that change the numbers when a folder leaves them out
    # (many Hub configs do): read in their place, so a short config means what transformers reads.
    hf_defaults: tuple[tuple[str, Any], ...] = ()
    # What transformers' config class refuses though config.json and the weights would express it
    # (LlamaConfig's whole heads): checked for a Hugging Face folder, not for a GGUF file made through
    # the family, which states each size itself (`hf_config`'s for_transformers).
    transformers_checks: tuple[Callable[[ModelConfig], HfConfig], ...] = ()


# ----- weight tables -------------------------------------------------------------------------

_A, _M = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
_LLAMA_BODY: tuple[WeightRow, ...] = (
    WeightRow("embed.weight", ("model.embed_tokens.weight",)),
    WeightRow("blocks.{i}.attn_norm.weight", ("model.layers.{i}.input_layernorm.weight",)),
    # Heron's qkv rows are q, then k, then v (attention.py, `self.heads`).
    WeightRow("blocks.{i}.attn.qkv.weight", (f"{_A}.q_proj.weight", f"{_A}.k_proj.weight", f"{_A}.v_proj.weight"),
              split="qkv"),
    WeightRow("blocks.{i}.attn.qkv.bias", (f"{_A}.q_proj.bias", f"{_A}.k_proj.bias", f"{_A}.v_proj.bias"), split="qkv"),
    WeightRow("blocks.{i}.attn.out.weight", (f"{_A}.o_proj.weight",)),
    WeightRow("blocks.{i}.attn.out.bias", (f"{_A}.o_proj.bias",)),
    WeightRow("blocks.{i}.mlp_norm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
    WeightRow("norm.weight", ("model.norm.weight",)),
    WeightRow("lm_head.weight", ("lm_head.weight",)),  # absent on both sides when tied
)
LLAMA_WEIGHTS: tuple[WeightRow, ...] = _LLAMA_BODY + (
    # SwiGLU: Heron's `up` rows are gate, then up (mlp.py: silu(gate) * up after `chunk(2)`).
    WeightRow("blocks.{i}.mlp.up.weight", (f"{_M}.gate_proj.weight", f"{_M}.up_proj.weight"), split="halves"),
    WeightRow("blocks.{i}.mlp.up.bias", (f"{_M}.gate_proj.bias", f"{_M}.up_proj.bias"), split="halves"),
    WeightRow("blocks.{i}.mlp.down.weight", (f"{_M}.down_proj.weight",)),
    WeightRow("blocks.{i}.mlp.down.bias", (f"{_M}.down_proj.bias",)),
)
QWEN3_WEIGHTS: tuple[WeightRow, ...] = LLAMA_WEIGHTS + (
    WeightRow("blocks.{i}.attn.q_norm.weight", (f"{_A}.q_norm.weight",)),
    WeightRow("blocks.{i}.attn.k_norm.weight", (f"{_A}.k_norm.weight",)),
)
_E = "model.layers.{i}.mlp.experts.{e}"
QWEN3_MOE_WEIGHTS: tuple[WeightRow, ...] = QWEN3_WEIGHTS + (  # dense layers (`mlp_only_layers`) read QWEN3's rows
    WeightRow("blocks.{i}.mlp.router.weight", (f"{_M}.gate.weight",)),
    WeightRow("blocks.{i}.mlp.up", (f"{_E}.gate_proj.weight", f"{_E}.up_proj.weight"), dim=2, split="halves",
              transpose=True),
    WeightRow("blocks.{i}.mlp.down", (f"{_E}.down_proj.weight",), transpose=True),
)
PHI3_WEIGHTS: tuple[WeightRow, ...] = (
    # Phi-3 fuses as Heron does: qkv_proj's rows are q, k, v and gate_up_proj's are gate, then up.
    WeightRow("embed.weight", ("model.embed_tokens.weight",)),
    WeightRow("blocks.{i}.attn_norm.weight", ("model.layers.{i}.input_layernorm.weight",)),
    WeightRow("blocks.{i}.attn.qkv.weight", (f"{_A}.qkv_proj.weight",)),
    WeightRow("blocks.{i}.attn.out.weight", (f"{_A}.o_proj.weight",)),
    WeightRow("blocks.{i}.mlp_norm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
    WeightRow("blocks.{i}.mlp.up.weight", (f"{_M}.gate_up_proj.weight",)),
    WeightRow("blocks.{i}.mlp.down.weight", (f"{_M}.down_proj.weight",)),
    WeightRow("norm.weight", ("model.norm.weight",)),
    WeightRow("lm_head.weight", ("lm_head.weight",)),
)
STABLELM_WEIGHTS: tuple[WeightRow, ...] = (
    WeightRow("embed.weight", ("model.embed_tokens.weight",)),
    WeightRow("blocks.{i}.attn_norm.weight", ("model.layers.{i}.input_layernorm.weight",)),
    WeightRow("blocks.{i}.attn_norm.bias", ("model.layers.{i}.input_layernorm.bias",)),
    # q and k rotate part of each head: their rows move where Heron's RoPE tables rotate (tables.py).
    WeightRow("blocks.{i}.attn.qkv.weight", (f"{_A}.q_proj.weight", f"{_A}.k_proj.weight", f"{_A}.v_proj.weight"),
              split="qkv", order="rotary_qkv"),
    WeightRow("blocks.{i}.attn.qkv.bias", (f"{_A}.q_proj.bias", f"{_A}.k_proj.bias", f"{_A}.v_proj.bias"),
              split="qkv", order="rotary_qkv"),
    WeightRow("blocks.{i}.attn.out.weight", (f"{_A}.o_proj.weight",)),
    WeightRow("blocks.{i}.mlp_norm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
    WeightRow("blocks.{i}.mlp_norm.bias", ("model.layers.{i}.post_attention_layernorm.bias",)),
    WeightRow("blocks.{i}.mlp.up.weight", (f"{_M}.gate_proj.weight", f"{_M}.up_proj.weight"), split="halves"),
    WeightRow("blocks.{i}.mlp.down.weight", (f"{_M}.down_proj.weight",)),
    WeightRow("norm.weight", ("model.norm.weight",)),
    WeightRow("norm.bias", ("model.norm.bias",)),
    WeightRow("lm_head.weight", ("lm_head.weight",)),
)
_X = "model.layers.{i}.block_sparse_moe"
MIXTRAL_WEIGHTS: tuple[WeightRow, ...] = _LLAMA_BODY + (
    WeightRow("blocks.{i}.mlp.router.weight", (f"{_X}.gate.weight",)),
    # Heron stacks experts as (E, in, out); Mixtral keeps one (out, in) linear per expert.
    WeightRow("blocks.{i}.mlp.up", (f"{_X}.experts.{{e}}.w1.weight", f"{_X}.experts.{{e}}.w3.weight"),
              dim=2, split="halves", transpose=True),
    WeightRow("blocks.{i}.mlp.down", (f"{_X}.experts.{{e}}.w2.weight",), transpose=True),
)
_G = "transformer.h.{i}"
GPT2_WEIGHTS: tuple[WeightRow, ...] = (
    WeightRow("embed.weight", ("transformer.wte.weight",)),
    WeightRow("pos_embed.weight", ("transformer.wpe.weight",)),
    WeightRow("blocks.{i}.attn_norm.weight", (f"{_G}.ln_1.weight",)),
    WeightRow("blocks.{i}.attn_norm.bias", (f"{_G}.ln_1.bias",)),
    # Conv1D weights are stored (in, out); c_attn's columns are q, k, v.
    WeightRow("blocks.{i}.attn.qkv.weight", (f"{_G}.attn.c_attn.weight",), transpose=True),
    WeightRow("blocks.{i}.attn.qkv.bias", (f"{_G}.attn.c_attn.bias",)),
    WeightRow("blocks.{i}.attn.out.weight", (f"{_G}.attn.c_proj.weight",), transpose=True),
    WeightRow("blocks.{i}.attn.out.bias", (f"{_G}.attn.c_proj.bias",)),
    WeightRow("blocks.{i}.mlp_norm.weight", (f"{_G}.ln_2.weight",)),
    WeightRow("blocks.{i}.mlp_norm.bias", (f"{_G}.ln_2.bias",)),
    WeightRow("blocks.{i}.mlp.up.weight", (f"{_G}.mlp.c_fc.weight",), transpose=True),
    WeightRow("blocks.{i}.mlp.up.bias", (f"{_G}.mlp.c_fc.bias",)),
    WeightRow("blocks.{i}.mlp.down.weight", (f"{_G}.mlp.c_proj.weight",), transpose=True),
    WeightRow("blocks.{i}.mlp.down.bias", (f"{_G}.mlp.c_proj.bias",)),
    WeightRow("norm.weight", ("transformer.ln_f.weight",)),
    WeightRow("norm.bias", ("transformer.ln_f.bias",)),
    WeightRow("lm_head.weight", ("lm_head.weight",)),
)
_N = "transformer.h.{i}.attn.attention"
GPT_NEO_WEIGHTS: tuple[WeightRow, ...] = (
    WeightRow("embed.weight", ("transformer.wte.weight",)),
    WeightRow("pos_embed.weight", ("transformer.wpe.weight",)),
    WeightRow("blocks.{i}.attn_norm.weight", (f"{_G}.ln_1.weight",)),
    WeightRow("blocks.{i}.attn_norm.bias", (f"{_G}.ln_1.bias",)),
    WeightRow("blocks.{i}.attn.qkv.weight", (f"{_N}.q_proj.weight", f"{_N}.k_proj.weight", f"{_N}.v_proj.weight"),
              split="qkv"),
    WeightRow("blocks.{i}.attn.out.weight", (f"{_N}.out_proj.weight",)),
    WeightRow("blocks.{i}.attn.out.bias", (f"{_N}.out_proj.bias",)),
    WeightRow("blocks.{i}.mlp_norm.weight", (f"{_G}.ln_2.weight",)),
    WeightRow("blocks.{i}.mlp_norm.bias", (f"{_G}.ln_2.bias",)),
    WeightRow("blocks.{i}.mlp.up.weight", (f"{_G}.mlp.c_fc.weight",)),  # nn.Linear here, not Conv1D
    WeightRow("blocks.{i}.mlp.up.bias", (f"{_G}.mlp.c_fc.bias",)),
    WeightRow("blocks.{i}.mlp.down.weight", (f"{_G}.mlp.c_proj.weight",)),
    WeightRow("blocks.{i}.mlp.down.bias", (f"{_G}.mlp.c_proj.bias",)),
    WeightRow("norm.weight", ("transformer.ln_f.weight",)),
    WeightRow("norm.bias", ("transformer.ln_f.bias",)),
    WeightRow("lm_head.weight", ("lm_head.weight",)),
)
# Causal-mask buffers that older GPT-2 and GPT-Neo checkpoints saved beside the weights.
MASK_BUFFERS = (r"transformer\.h\.\d+\.attn\.(attention\.)?(bias|masked_bias)",)
_X2 = "gpt_neox.layers.{i}"
GPT_NEOX_WEIGHTS: tuple[WeightRow, ...] = (
    WeightRow("embed.weight", ("gpt_neox.embed_in.weight",)),
    WeightRow("blocks.{i}.attn_norm.weight", (f"{_X2}.input_layernorm.weight",)),
    WeightRow("blocks.{i}.attn_norm.bias", (f"{_X2}.input_layernorm.bias",)),
    # One fused tensor, its rows head by head (q, k, v of head 0, then of head 1, ...): tables.py "neox_qkv".
    WeightRow("blocks.{i}.attn.qkv.weight", (f"{_X2}.attention.query_key_value.weight",), order="neox_qkv"),
    WeightRow("blocks.{i}.attn.qkv.bias", (f"{_X2}.attention.query_key_value.bias",), order="neox_qkv"),
    WeightRow("blocks.{i}.attn.out.weight", (f"{_X2}.attention.dense.weight",)),
    WeightRow("blocks.{i}.attn.out.bias", (f"{_X2}.attention.dense.bias",)),
    WeightRow("blocks.{i}.mlp_norm.weight", (f"{_X2}.post_attention_layernorm.weight",)),
    WeightRow("blocks.{i}.mlp_norm.bias", (f"{_X2}.post_attention_layernorm.bias",)),
    WeightRow("blocks.{i}.mlp.up.weight", (f"{_X2}.mlp.dense_h_to_4h.weight",)),
    WeightRow("blocks.{i}.mlp.up.bias", (f"{_X2}.mlp.dense_h_to_4h.bias",)),
    WeightRow("blocks.{i}.mlp.down.weight", (f"{_X2}.mlp.dense_4h_to_h.weight",)),
    WeightRow("blocks.{i}.mlp.down.bias", (f"{_X2}.mlp.dense_4h_to_h.bias",)),
    WeightRow("norm.weight", ("gpt_neox.final_layer_norm.weight",)),
    WeightRow("norm.bias", ("gpt_neox.final_layer_norm.bias",)),
    WeightRow("lm_head.weight", ("embed_out.weight",)),
)
# Buffers older GPT-NeoX checkpoints (Pythia's) saved beside the weights: masks and RoPE frequencies.
NEOX_BUFFERS = (r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",)


# ----- config pieces shared by several families ---------------------------------------------

ROPE_KEYS: dict[str, tuple[tuple[str, str], ...]] = {  # RopeScaling field -> rope_parameters key
    "linear": (("factor", "factor"),),
    "llama3": (("factor", "factor"), ("low_freq_factor", "low_freq_factor"),
               ("high_freq_factor", "high_freq_factor"), ("original_max_seq_len", "original_max_position_embeddings")),
}


DEFAULT_ROPE_THETA = 10000.0  # PreTrainedConfig.default_theta; Mixtral's 1e6 comes in through its hf_defaults
_ORIGINAL_MAX = "original_max_position_embeddings"


def rope_dict(hf: HfConfig) -> tuple[dict[str, Any], str]:
    """The RoPE dict transformers reads, and the key it sits under (errors name it). `rope_scaling`
    wins where both are set: PreTrainedConfig.convert_rope_params_to_dict takes `rope_scaling or
    rope_parameters`, dropping the other whole, its rope_theta too."""
    if hf.get("rope_scaling"):
        return dict(hf["rope_scaling"]), "rope_scaling"
    return dict(hf.get("rope_parameters") or {}), "rope_parameters"


def read_rope(hf: HfConfig) -> dict[str, Any]:
    """rope_theta and rope_scaling from `rope_parameters` (transformers 5) or the older
    `rope_scaling`; a top-level `partial_rotary_factor` (transformers 4 kept it there: Phi-3)
    fills in as transformers' convert_rope_params_to_dict fills it."""
    params, where = rope_dict(hf)
    if "partial_rotary_factor" in hf:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    return rope_fields(params, where, hf)


def rope_fields(params: dict[str, Any], where: str, hf: HfConfig) -> dict[str, Any]:
    """rope_theta and rope_scaling of one RoPE dict (`where` names it in errors), the keys it
    leaves out filled from the rest of config.json as transformers' standardize_rope_params does."""
    params = {"rope_theta": hf.get("rope_theta", DEFAULT_ROPE_THETA), **params}
    kind, kind_key = _rope_kind(params, where)
    theta = params.pop("rope_theta")
    if theta is None:
        raise ValueError(f"{where}.rope_theta: null; give the RoPE base (10000.0 in most configs)")
    if params.get("partial_rotary_factor", 1.0) == 1.0:
        params.pop("partial_rotary_factor", None)
    if kind == "default":
        scaling = None
    elif kind in ROPE_KEYS:
        if kind == "llama3":
            _fill_original_max(params, hf)
        missing = [key for _, key in ROPE_KEYS[kind] if key not in params]
        if missing:
            raise ValueError(f"{where}.{missing[0]}: required for rope_type {kind!r}")
        scaling = RopeScaling(kind=kind, **{field: params.pop(key) for field, key in ROPE_KEYS[kind]})
    else:
        raise ValueError(f"{where}.{kind_key}: {kind!r} is not one of default, {', '.join(ROPE_KEYS)}")
    if params:
        raise ValueError(f"{where}.{sorted(params)[0]}: not supported by Heron's RoPE")
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def _rope_kind(params: dict[str, Any], where: str) -> tuple[str, str]:
    """The rope type, popped, and the key that gave it: `rope_type`, or the oldest spelling `type`.
    transformers reads rope_type where both are set (standardize_rope_params), so two that
    differ are refused: the file is ambiguous, and another reader may take `type`."""
    legacy, kind = params.pop("type", None), params.pop("rope_type", None)
    if legacy is not None and kind is not None and legacy != kind:
        raise ValueError(f"{where}.type: {legacy!r} differs from {where}.rope_type {kind!r}; "
                         "keep one of the two keys, or give both the same value")
    if kind is None and legacy is not None:
        return legacy, "type"
    return kind or "default", "rope_type"


def _fill_original_max(params: dict[str, Any], hf: HfConfig) -> None:
    """Llama 3's pre-training length, as transformers' standardize_rope_params settles it: a
    top-level `original_max_position_embeddings` wins, then the RoPE dict's, then
    `max_position_embeddings` stands in for a dict that leaves it out."""
    if _ORIGINAL_MAX in hf:
        params[_ORIGINAL_MAX] = hf[_ORIGINAL_MAX]
    elif "max_position_embeddings" in hf:
        params.setdefault(_ORIGINAL_MAX, hf["max_position_embeddings"])


def write_rope(config: ModelConfig) -> HfConfig:
    scaling = config.rope_scaling
    params: dict[str, Any] = {"rope_type": "default" if scaling is None else scaling.kind, "rope_theta": config.rope_theta}
    if scaling is not None:
        params.update({key: getattr(scaling, field) for field, key in ROPE_KEYS[scaling.kind]})
    return {"rope_parameters": params}


# Phi3Config.validate_rope's rope types; it reads the older "su" and "yarn" as longrope. Heron runs
# none of the three, which read_rope refuses by name; linear and llama3 Phi3Config refuses itself.
PHI3_ROPE_TYPES = ("default", "longrope", "su", "yarn")


def read_phi3_rope(hf: HfConfig) -> dict[str, Any]:
    """read_rope for Phi-3, refusing first the rope types transformers' Phi3Config refuses: a
    config.json with linear or llama3 scaling loads in no Phi-3 model, so it has no numbers to match."""
    params, where = rope_dict(hf)
    kind, key = _rope_kind(params, where)
    if kind not in PHI3_ROPE_TYPES:
        raise ValueError(f"{where}.{key}: {kind!r} is not a Phi-3 rope type (transformers' Phi3Config takes "
                         "default and longrope only, and refuses this config.json); set it to default, or give "
                         "the model_type of the family the weights come from")
    return read_rope(hf)


def write_phi3_rope(config: ModelConfig) -> HfConfig:
    """write_rope for Phi-3: transformers' Phi3Config refuses linear and llama3 scaling."""
    if config.rope_scaling is not None:
        raise ValueError(f"rope_scaling: Phi-3 (transformers' Phi3Config) has no {config.rope_scaling.kind!r} "
                         "rope scaling, only default and longrope; export as llama or mistral")
    return write_rope(config)


def read_llama_bias(hf: HfConfig) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    return {"qkv_bias": bias, "out_bias": bias, "mlp_bias": bool(hf.get("mlp_bias", False))}


def write_llama_bias(config: ModelConfig) -> HfConfig:
    if config.qkv_bias != config.out_bias:
        raise ValueError(f"qkv_bias: LLaMA has one attention_bias for q, k, v and o; got qkv_bias={config.qkv_bias}, "
                         f"out_bias={config.out_bias}")
    return {"attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias}


def read_attention_bias(hf: HfConfig) -> dict[str, Any]:
    """Qwen3's `attention_bias`: q, k, v and o alike (its MLP has none)."""
    bias = bool(hf.get("attention_bias", False))
    return {"qkv_bias": bias, "out_bias": bias}


def write_attention_bias(config: ModelConfig) -> HfConfig:
    return {"attention_bias": write_llama_bias(config)["attention_bias"]}


def read_sliding(hf: HfConfig) -> dict[str, Any]:
    """Phi-3's and Mixtral's `sliding_window` on every layer, null for none: their transformers
    models read no other key for it (not Qwen's `use_sliding_window` or `max_window_layers`)."""
    return _sliding_layers(hf.get("sliding_window"), None)


def read_mistral_sliding(hf: HfConfig) -> dict[str, Any]:
    """Mistral's `sliding_window` on every layer, or on the layers `layer_types` names: transformers'
    AutoConfig reads a mistral config.json that has `layer_types` as Ministral's, which slides those."""
    return _sliding_layers(hf.get("sliding_window"), hf.get("layer_types"))


def read_qwen_sliding(hf: HfConfig) -> dict[str, Any]:
    """Qwen2's and Qwen3's window: `sliding_window` counts only with `use_sliding_window` set
    (Qwen2Config drops it otherwise), on the layers `layer_types` names; before those, on the
    layers from `max_window_layers` on."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    types = hf.get("layer_types")
    if not types and window is not None:
        first = int(hf["max_window_layers"])
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(int(hf["num_hidden_layers"]))]
    return _sliding_layers(window, types)


def _sliding_layers(window: int | None, types: list[str] | None) -> dict[str, Any]:
    """The attention patterns of one window and, where given, each layer's type (none: every layer slides)."""
    if window is None:
        if types and any(t != "full_attention" for t in types):
            raise ValueError("layer_types: sliding layers without a sliding_window; give sliding_window, "
                             "or make every layer full_attention")
        return {}
    if not types:
        return {"attention": (AttentionPattern(kind="sliding", window=int(window)),)}
    return {"attention": tuple(_layer_pattern(t, int(window), i) for i, t in enumerate(types))}


def read_switched_sliding(hf: HfConfig) -> dict[str, Any]:
    """Qwen3-MoE's `sliding_window` on every layer when `use_sliding_window` is set:
    transformers' Qwen3MoeModel reads neither `layer_types` nor `max_window_layers`."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return {} if window is None else {"attention": (AttentionPattern(kind="sliding", window=int(window)),)}


def write_switched_sliding(config: ModelConfig) -> HfConfig:
    """One sliding window on every layer, or none, switched by `use_sliding_window` (Qwen3-MoE)."""
    window = write_sliding(config)["sliding_window"]
    return {"use_sliding_window": window is not None, "sliding_window": window}


def _layer_pattern(kind: str, window: int, i: int) -> AttentionPattern:
    if kind == "full_attention":
        return AttentionPattern()
    if kind == "sliding_attention":
        return AttentionPattern(kind="sliding", window=window)
    raise ValueError(f"layer_types[{i}]: {kind!r} is not full_attention or sliding_attention")


def write_sliding(config: ModelConfig) -> HfConfig:
    """Every layer sliding with one window (Mistral's `sliding_window`), or every layer dense."""
    refusal = "this family has either dense attention on every layer or one sliding window on every layer"
    patterns, window = _dense_or_one_window(config, refusal)
    dense = [i for i, p in enumerate(patterns) if p.kind == "dense"]
    if window is not None and dense:
        raise ValueError(f"attention: layer {dense[0]} is 'dense'; {refusal}")
    return {"sliding_window": window}


def write_layer_types(config: ModelConfig) -> HfConfig:
    """Qwen-style `layer_types`: each layer full or sliding, with one window. Qwen2's and
    Qwen3's configs drop `sliding_window` unless `use_sliding_window` is set."""
    patterns, window = _dense_or_one_window(config, "this family has full layers and sliding layers of one window")
    return {"use_sliding_window": window is not None, "sliding_window": window,
            "layer_types": ["full_attention" if p.kind == "dense" else "sliding_attention" for p in patterns]}


def _in_context(config: ModelConfig, layer: int) -> AttentionPattern:
    """Layer `layer`'s pattern as it acts within max_seq_len tokens: a sliding window at least
    that long never leaves a key out, so it is dense attention to every family."""
    pattern = config.attention_pattern(layer)
    return DENSE if pattern.kind == "sliding" and pattern.window >= config.max_seq_len else pattern


def _dense_or_one_window(config: ModelConfig, refusal: str) -> tuple[list[AttentionPattern], int | None]:
    """Each layer's pattern and the one sliding window among them (None: all dense);
    ValueError with `refusal` for any other pattern or a second window."""
    patterns = [_in_context(config, i) for i in range(config.n_layers)]
    windows = {p.window for p in patterns if p.kind == "sliding"}
    bad = [i for i, p in enumerate(patterns) if p.kind not in ("dense", "sliding")]
    if bad or len(windows) > 1:
        i = bad[0] if bad else 0
        raise ValueError(f"attention: layer {i} is {patterns[i].kind!r}; {refusal}")
    return patterns, windows.pop() if windows else None


def dense_attention_only(config: ModelConfig) -> HfConfig:
    sparse = [i for i in range(config.n_layers) if _in_context(config, i).kind != "dense"]
    if sparse:
        raise ValueError(f"attention: layer {sparse[0]} is {config.attention_pattern(sparse[0]).kind!r}; "
                         "this family has dense attention only")
    return {}


def dense_feed_forward_only(config: ModelConfig) -> HfConfig:
    """A dense MLP on every layer: no Mixture-of-Experts, no attention-only ("none") blocks."""
    kinds = [config.feed_forward_kind(i) for i in range(config.n_layers)]
    other = [i for i, kind in enumerate(kinds) if kind != "dense"]
    if other:
        raise ValueError(f"feed_forward: layer {other[0]} is {kinds[other[0]]!r}; this family has a dense MLP "
                         "on every layer")
    return {}


def default_head_dim_only(config: ModelConfig) -> HfConfig:
    """A family whose config.json has no head_dim: its heads are d_model / n_heads wide."""
    if config.resolved_head_dim * config.n_heads != config.d_model:
        raise ValueError(f"head_dim: this family has heads of d_model / n_heads = {config.d_model // config.n_heads}, "
                         f"got {config.resolved_head_dim}")
    return {}


def whole_heads_only(config: ModelConfig) -> HfConfig:
    """LlamaConfig refuses a hidden_size that is not a multiple of num_attention_heads, head_dim
    given or not (its validate_architecture); Mistral's, Qwen's and Phi-3's configs accept it."""
    if config.d_model % config.n_heads:
        raise ValueError(f"n_heads: LLaMA needs d_model a multiple of n_heads, got d_model={config.d_model}, "
                         f"n_heads={config.n_heads}")
    return {}


def multi_head_only(config: ModelConfig) -> HfConfig:
    """GPT-2 and GPT-Neo have one key/value head per query head, of width d_model / n_heads."""
    if config.resolved_kv_heads != config.n_heads:
        raise ValueError(f"n_kv_heads: this family has multi-head attention, got {config.resolved_kv_heads} "
                         f"key/value heads for {config.n_heads} query heads")
    return default_head_dim_only(config)


def _renormalised_top_k(hf: HfConfig, family: str) -> int:
    """num_experts_per_tok of a family that renormalises the chosen weights: a top-1 expert
    there weighs exactly 1, where Heron's top-1 gate is the router's probability (Switch)."""
    top_k = int(hf["num_experts_per_tok"])
    if top_k == 1:
        raise ValueError(f"num_experts_per_tok: 1 is not supported: {family} renormalises the chosen experts' "
                         "weights, so its one expert weighs 1, where Heron's top-1 routing weighs it by the "
                         "router's probability")
    return top_k


def read_mixtral_experts(hf: HfConfig) -> dict[str, Any]:
    moe = MoEConfig(n_experts=int(hf["num_local_experts"]), top_k=_renormalised_top_k(hf, "Mixtral"),
                    d_ff=int(hf["intermediate_size"]), aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)),
                    z_loss_coef=0.0)
    # d_ff is unused with every layer MoE; keep it the experts' total active width.
    return {"feed_forward": ("moe",), "moe": moe, "d_ff": moe.d_ff * moe.top_k}


def write_mixtral_experts(config: ModelConfig) -> HfConfig:
    moe = config.moe
    if moe is None or not all(config.is_moe_layer(i) for i in range(config.n_layers)):
        raise ValueError("feed_forward: Mixtral has a Mixture-of-Experts on every layer")
    _check_plain_routing(moe, "Mixtral")
    return {"num_local_experts": moe.n_experts, "num_experts_per_tok": moe.top_k,
            "intermediate_size": config.resolved_expert_d_ff,
            "router_aux_loss_coef": moe.aux_loss_coef}


def read_qwen3_moe_experts(hf: HfConfig) -> dict[str, Any]:
    """Experts on layer i unless i is in `mlp_only_layers` or (i + 1) is not a multiple of
    `decoder_sparse_step`; the other layers are dense MLPs of `intermediate_size`."""
    n_experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)))
    step, dense = int(hf.get("decoder_sparse_step", 1)), set(hf.get("mlp_only_layers") or ())
    kinds = tuple("moe" if n_experts and i not in dense and (i + 1) % step == 0 else "dense"
                  for i in range(int(hf["num_hidden_layers"])))
    if "moe" not in kinds:
        return {}
    moe = MoEConfig(n_experts=n_experts, top_k=_renormalised_top_k(hf, "Qwen3-MoE"),
                    d_ff=int(hf["moe_intermediate_size"]),
                    aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)), z_loss_coef=0.0)
    return {"feed_forward": kinds if "dense" in kinds else ("moe",), "moe": moe}


def write_qwen3_moe_experts(config: ModelConfig) -> HfConfig:
    kinds = [config.feed_forward_kind(i) for i in range(config.n_layers)]
    if "none" in kinds or "moe" not in kinds:
        i = kinds.index("none") if "none" in kinds else 0
        raise ValueError(f"feed_forward: layer {i} is {kinds[i]!r}; Qwen3-MoE has Mixture-of-Experts layers and "
                         "dense MLPs only, experts on one layer at least")
    _check_plain_routing(config.moe, "Qwen3-MoE")
    return {"num_experts": config.moe.n_experts, "num_experts_per_tok": config.moe.top_k,
            "moe_intermediate_size": config.resolved_expert_d_ff, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, kind in enumerate(kinds) if kind == "dense"],
            "router_aux_loss_coef": config.moe.aux_loss_coef}


def _check_plain_routing(moe: MoEConfig, family: str) -> None:
    """Softmax top-k over routed experts only, renormalised (so k > 1), no capacity; the
    ValueError names every setting that differs."""
    problems = [f"moe.{field}: {family} needs {value!r}, got {getattr(moe, field)!r}"
                for field, value in (("shared_expert", False), ("capacity_factor", None),
                                     ("router_centering", False), ("routed_scale", 1.0))
                if getattr(moe, field) != value]
    if moe.top_k == 1:
        problems.append(f"moe.top_k: {family} renormalises the top-k weights, which top-1 routing does not")
    if problems:
        raise ValueError("; and ".join(problems))


def read_gpt_neo_layers(hf: HfConfig) -> dict[str, Any]:
    """`attention_types` [[["global", "local"], 12]] -> one pattern per layer;
    local layers see the last `window_size` tokens, themselves included."""
    kinds = [kind for group, repeat in hf["attention_types"] for _ in range(repeat) for kind in group]
    if len(kinds) != hf["num_layers"]:
        raise ValueError(f"attention_types: describes {len(kinds)} layers, num_layers is {hf['num_layers']}; "
                         "give one kind per layer")
    local = AttentionPattern(kind="sliding", window=int(hf["window_size"]))
    patterns = []
    for i, kind in enumerate(kinds):
        if kind not in ("global", "local"):
            raise ValueError(f"attention_types: layer {i} is {kind!r}, not 'global' or 'local'")
        patterns.append(AttentionPattern() if kind == "global" else local)
    return {"attention": tuple(patterns)}


def write_gpt_neo_layers(config: ModelConfig) -> HfConfig:
    patterns, window = _dense_or_one_window(config, "GPT-Neo has global layers and local layers of one window")
    kinds = ["global" if p.kind == "dense" else "local" for p in patterns]
    return {"attention_types": [[[kind], 1] for kind in kinds], "attention_layers": kinds,
            "window_size": 256 if window is None else window}


DEFAULT_PARTIAL_ROTARY = 0.25  # GPTNeoXConfig's and StableLmConfig's


def _partial_rope_reader(theta_key: str, factor_key: str) -> Callable[[HfConfig], dict[str, Any]]:
    """The RoPE reader of a family that rotates part of each head: `rope_parameters` (with
    `partial_rotary_factor`), its gaps filled from the top-level keys the family's config class
    reads, `theta_key` for rope_theta and `factor_key` for the factor, and from nothing else: a
    key the class ignores must not change Heron's numbers, or the logits are not transformers'."""
    def read(hf: HfConfig) -> dict[str, Any]:
        params, where = rope_dict(hf)
        factor = float(params.pop("partial_rotary_factor", hf.get(factor_key, DEFAULT_PARTIAL_ROTARY)))
        # set here, so rope_fields never falls back on a top-level rope_theta the class may ignore
        params.setdefault("rope_theta", hf.get(theta_key, DEFAULT_ROPE_THETA))
        head_dim = hf["hidden_size"] // hf["num_attention_heads"]
        rotary_dim = int(head_dim * factor)  # transformers' rounding
        if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
            raise ValueError(f"{where}.partial_rotary_factor: {factor} of a {head_dim}-wide head rotates "
                             f"{rotary_dim} dims; Heron needs an even number from 2 to {head_dim}")
        return {**rope_fields(params, where, hf), "rotary_dim": None if rotary_dim == head_dim else rotary_dim}

    return read


# GPTNeoXConfig.convert_rope_params_to_dict fills rope_parameters from Pythia's `rotary_emb_base` and
# `rotary_pct` only: a top-level rope_theta or partial_rotary_factor is ignored (transformers 5).
read_neox_rope = _partial_rope_reader("rotary_emb_base", "rotary_pct")
# StableLmConfig goes through PreTrainedConfig's: top-level `rope_theta` and `partial_rotary_factor`
# (StableLM 2's), never Pythia's names.
read_stablelm_rope = _partial_rope_reader("rope_theta", "partial_rotary_factor")


def write_neox_rope(config: ModelConfig) -> HfConfig:
    out = write_rope(config)
    head_dim = config.resolved_head_dim
    out["rope_parameters"]["partial_rotary_factor"] = partial_rotary_factor(config.rotary_dim or head_dim, head_dim)
    return out


def partial_rotary_factor(rotary_dim: int, head_dim: int) -> float:
    """The factor transformers reads back as `rotary_dim`: GPT-NeoX and StableLM rotate
    int(head_dim * factor) dims (their attention's `rotary_ndims` and RoPE init), and
    rotary_dim / head_dim can land a hair below the whole number (44 * (30 / 44) = 29.999...,
    read as 29). The quotient moves up one float at a time until it lands; ValueError where none does."""
    factor = rotary_dim / head_dim
    for _ in range(8):  # one or two steps: the quotient is within a float or two of one that lands
        if int(head_dim * factor) >= rotary_dim:
            break
        factor = math.nextafter(factor, math.inf)
    if int(head_dim * factor) != rotary_dim:
        raise ValueError(f"rotary_dim: no partial_rotary_factor makes transformers rotate {rotary_dim} of a "
                         f"{head_dim}-wide head (int(head_dim * factor)); choose another rotary_dim")
    return factor


def read_qkv_bias(hf: HfConfig) -> dict[str, Any]:
    return {"qkv_bias": bool(hf.get("use_qkv_bias", False))}


def write_qkv_bias(config: ModelConfig) -> HfConfig:
    return {"use_qkv_bias": config.qkv_bias}


def read_parallel_residual(hf: HfConfig) -> dict[str, Any]:
    return {"parallel_residual": bool(hf.get("use_parallel_residual", True))}  # transformers' default


def write_parallel_residual(config: ModelConfig) -> HfConfig:
    return {"use_parallel_residual": config.parallel_residual}


ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}


def _activation(key: str) -> tuple[Callable[[HfConfig], dict[str, Any]], Callable[[ModelConfig], HfConfig]]:
    def read(hf: HfConfig) -> dict[str, Any]:
        name = hf.get(key, "gelu_new")
        if name not in ACTIVATIONS:
            raise ValueError(f"{key}: {name!r} is not one of {', '.join(ACTIVATIONS)}")
        return {"mlp": ACTIVATIONS[name]}

    def write(config: ModelConfig) -> HfConfig:
        if config.mlp not in ("gelu", "gelu_tanh"):
            raise ValueError(f"mlp: this family has a GELU MLP, got {config.mlp!r}")
        return {key: "gelu_new" if config.mlp == "gelu_tanh" else "gelu"}

    return read, write


def _optional_width(key: str) -> tuple[Callable[[HfConfig], dict[str, Any]], Callable[[ModelConfig], HfConfig]]:
    """A feed-forward width that None means 4 * d_model."""
    def read(hf: HfConfig) -> dict[str, Any]:
        return {"d_ff": hf.get(key)}

    def write(config: ModelConfig) -> HfConfig:
        return {key: config.d_ff}

    return read, write


def _no_scale(_: HfConfig) -> dict[str, Any]:
    return {"attn_scale": 1.0}  # GPT-Neo does not divide q.k by sqrt(head_dim)


def _unscaled_only(config: ModelConfig) -> HfConfig:
    if config.attn_scale != 1.0:
        raise ValueError(f"attn_scale: GPT-Neo leaves q.k unscaled (1.0), got {config.attn_scale}")
    return {}


# ----- the families --------------------------------------------------------------------------

_LLAMA_FIELDS: tuple[tuple[str, str], ...] = (
    ("vocab_size", "vocab_size"), ("d_model", "hidden_size"), ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"), ("n_kv_heads", "num_key_value_heads"), ("head_dim", "head_dim"),
    ("d_ff", "intermediate_size"), ("max_seq_len", "max_position_embeddings"), ("norm_eps", "rms_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"), ("init_std", "initializer_range"),
)
# What only GPT-NeoX expresses: partial rotary and parallel residuals.
_SEQUENTIAL_FULL_ROTARY: tuple[tuple[str, Any], ...] = (("rotary_dim", None), ("parallel_residual", False))
_RMS_ROPE_SWIGLU: tuple[tuple[str, Any], ...] = (("norm", "rmsnorm"), ("positions", "rope"), ("mlp", "swiglu"),
                                                 ("attn_scale", None), ("head", "lm")) + _SEQUENTIAL_FULL_ROTARY
_LLAMA_FIXED = _RMS_ROPE_SWIGLU + (("qk_norm", False),)
# Dropout keys are not checked: they change training only, and Heron trains without dropout.
_SILU = (("hidden_act", "silu"),)
_GPT_READ_ACT, _GPT_WRITE_ACT = _activation("activation_function")
_QWEN_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("tie_word_embeddings", False), ("rms_norm_eps", 1e-6), ("use_sliding_window", False), ("max_window_layers", 28),
    ("max_position_embeddings", 32768))

LLAMA = Family(
    "llama", "llama", "LlamaForCausalLM", LLAMA_WEIGHTS, _LLAMA_FIELDS, _LLAMA_FIXED, _SILU,
    read=(read_rope, read_llama_bias),
    write=(write_rope, write_llama_bias, dense_attention_only, dense_feed_forward_only),
    hf_defaults=(("tie_word_embeddings", False), ("rms_norm_eps", 1e-6), ("attention_bias", False),
                 ("mlp_bias", False), ("max_position_embeddings", 2048)),
    transformers_checks=(whole_heads_only,),
)
MISTRAL = Family(
    "mistral", "mistral", "MistralForCausalLM", LLAMA_WEIGHTS, _LLAMA_FIELDS,
    _LLAMA_FIXED + (("qkv_bias", False), ("out_bias", False), ("mlp_bias", False)), _SILU,
    read=(read_rope, read_mistral_sliding), write=(write_rope, write_sliding, dense_feed_forward_only),
    hf_defaults=(("tie_word_embeddings", False), ("rms_norm_eps", 1e-6), ("sliding_window", 4096),
                 ("max_position_embeddings", 131072)),
)
QWEN2 = Family(
    "qwen2", "qwen2", "Qwen2ForCausalLM", LLAMA_WEIGHTS, _LLAMA_FIELDS,
    _LLAMA_FIXED + (("qkv_bias", True), ("out_bias", False), ("mlp_bias", False)), _SILU,
    read=(read_rope, read_qwen_sliding), write=(write_rope, write_layer_types, dense_feed_forward_only),
    hf_defaults=_QWEN_DEFAULTS,
)
QWEN3 = Family(
    "qwen3", "qwen3", "Qwen3ForCausalLM", QWEN3_WEIGHTS, _LLAMA_FIELDS,
    _RMS_ROPE_SWIGLU + (("qk_norm", True), ("mlp_bias", False)), _SILU,
    read=(read_rope, read_attention_bias, read_qwen_sliding),
    write=(write_rope, write_attention_bias, write_layer_types, dense_feed_forward_only),
    hf_defaults=_QWEN_DEFAULTS + (("attention_bias", False), ("head_dim", 128)),
)
QWEN3_MOE = Family(
    "qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", QWEN3_MOE_WEIGHTS, _LLAMA_FIELDS, QWEN3.fixed,
    _SILU + (("norm_topk_prob", True),),
    read=(read_rope, read_attention_bias, read_switched_sliding, read_qwen3_moe_experts),
    write=(write_rope, write_attention_bias, write_switched_sliding, write_qwen3_moe_experts),
    hf_defaults=(("tie_word_embeddings", False), ("rms_norm_eps", 1e-6), ("attention_bias", False),
                 ("use_sliding_window", False), ("max_position_embeddings", 32768), ("norm_topk_prob", False)),
)
PHI3 = Family(
    "phi3", "phi3", "Phi3ForCausalLM", PHI3_WEIGHTS, _LLAMA_FIELDS,
    _LLAMA_FIXED + (("qkv_bias", False), ("out_bias", False), ("mlp_bias", False)), _SILU,
    read=(read_phi3_rope, read_sliding), write=(write_phi3_rope, write_sliding, dense_feed_forward_only),
    hf_defaults=(("tie_word_embeddings", False), ("rms_norm_eps", 1e-5), ("max_position_embeddings", 4096)),
)
MIXTRAL = Family(
    "mixtral", "mixtral", "MixtralForCausalLM", MIXTRAL_WEIGHTS,
    tuple(pair for pair in _LLAMA_FIELDS if pair[0] != "d_ff"),
    _LLAMA_FIXED + (("qkv_bias", False), ("out_bias", False), ("mlp_bias", False)),
    _SILU + (("router_jitter_noise", 0.0),),
    read=(read_rope, read_sliding, read_mixtral_experts), write=(write_rope, write_sliding, write_mixtral_experts),
    hf_defaults=(("tie_word_embeddings", False), ("rms_norm_eps", 1e-5), ("rope_theta", 1e6),
                 ("max_position_embeddings", 131072)),
)
GPT2 = Family(
    "gpt2", "gpt2", "GPT2LMHeadModel", GPT2_WEIGHTS,
    (("vocab_size", "vocab_size"), ("d_model", "n_embd"), ("n_layers", "n_layer"), ("n_heads", "n_head"),
     ("max_seq_len", "n_positions"), ("norm_eps", "layer_norm_epsilon"), ("tie_embeddings", "tie_word_embeddings"),
     ("init_std", "initializer_range")),
    (("norm", "layernorm"), ("positions", "learned"), ("qkv_bias", True), ("out_bias", True), ("mlp_bias", True),
     ("attn_scale", None), ("head", "lm"), ("qk_norm", False), ("parallel_residual", False)),
    (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)),
    read=(_GPT_READ_ACT, _optional_width("n_inner")[0]),
    write=(_GPT_WRITE_ACT, _optional_width("n_inner")[1], multi_head_only, dense_attention_only,
           dense_feed_forward_only),
    ignored=MASK_BUFFERS,
    hf_defaults=(("tie_word_embeddings", True), ("layer_norm_epsilon", 1e-5), ("activation_function", "gelu_new"),
                 ("n_positions", 1024)),
)
GPT_NEO = Family(
    "gpt_neo", "gpt_neo", "GPTNeoForCausalLM", GPT_NEO_WEIGHTS,
    (("vocab_size", "vocab_size"), ("d_model", "hidden_size"), ("n_layers", "num_layers"), ("n_heads", "num_heads"),
     ("max_seq_len", "max_position_embeddings"), ("norm_eps", "layer_norm_epsilon"),
     ("tie_embeddings", "tie_word_embeddings"), ("init_std", "initializer_range")),
    (("norm", "layernorm"), ("positions", "learned"), ("qkv_bias", False), ("out_bias", True), ("mlp_bias", True),
     ("head", "lm"), ("qk_norm", False), ("parallel_residual", False)),
    (),
    read=(_GPT_READ_ACT, _optional_width("intermediate_size")[0], read_gpt_neo_layers, _no_scale),
    write=(_GPT_WRITE_ACT, _optional_width("intermediate_size")[1], multi_head_only, write_gpt_neo_layers,
           _unscaled_only, dense_feed_forward_only),
    ignored=MASK_BUFFERS,
    hf_defaults=(("tie_word_embeddings", True), ("layer_norm_epsilon", 1e-5), ("activation_function", "gelu_new"),
                 ("max_position_embeddings", 2048), ("window_size", 256),
                 ("attention_types", ((("global", "local"), 12),))),
)
_NEOX_READ_ACT, _NEOX_WRITE_ACT = _activation("hidden_act")
GPT_NEOX = Family(
    "gpt_neox", "gpt_neox", "GPTNeoXForCausalLM", GPT_NEOX_WEIGHTS,
    (("vocab_size", "vocab_size"), ("d_model", "hidden_size"), ("n_layers", "num_hidden_layers"),
     ("n_heads", "num_attention_heads"), ("d_ff", "intermediate_size"), ("max_seq_len", "max_position_embeddings"),
     ("norm_eps", "layer_norm_eps"), ("tie_embeddings", "tie_word_embeddings"), ("init_std", "initializer_range")),
    (("norm", "layernorm"), ("positions", "rope"), ("mlp_bias", True), ("attn_scale", None), ("head", "lm"),
     ("qk_norm", False)),
    (),
    read=(_NEOX_READ_ACT, read_neox_rope, read_attention_bias, read_parallel_residual),
    write=(_NEOX_WRITE_ACT, write_neox_rope, write_attention_bias, write_parallel_residual, multi_head_only,
           dense_attention_only, dense_feed_forward_only),
    ignored=NEOX_BUFFERS,
    hf_defaults=(("tie_word_embeddings", False), ("layer_norm_eps", 1e-5), ("hidden_act", "gelu"),
                 ("attention_bias", True), ("use_parallel_residual", True), ("max_position_embeddings", 2048)),
)
STABLELM = Family(
    "stablelm", "stablelm", "StableLmForCausalLM", STABLELM_WEIGHTS,
    tuple(pair for pair in _LLAMA_FIELDS if pair[1] not in ("head_dim", "rms_norm_eps")) + (
        ("norm_eps", "layer_norm_eps"),),
    (("norm", "layernorm"), ("positions", "rope"), ("mlp", "swiglu"), ("attn_scale", None), ("head", "lm"),
     ("qk_norm", False), ("out_bias", False), ("mlp_bias", False), ("parallel_residual", False)),
    # Its parallel-residual layers share one LayerNorm, and qk_layernorm is a LayerNorm per head: neither is Heron's.
    _SILU + (("use_parallel_residual", False), ("qk_layernorm", False)),
    read=(read_stablelm_rope, read_qkv_bias),
    write=(write_neox_rope, write_qkv_bias, default_head_dim_only, dense_attention_only, dense_feed_forward_only),
    hf_defaults=(("tie_word_embeddings", False), ("layer_norm_eps", 1e-5), ("use_qkv_bias", False),
                 ("max_position_embeddings", 4096)),
)
FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, QWEN3_MOE, PHI3, MIXTRAL, GPT2, GPT_NEO, GPT_NEOX,
                                STABLELM)
# Export tries these in order and takes the first that expresses the model.
EXPORT_ORDER: tuple[Family, ...] = (LLAMA, MIXTRAL, MISTRAL, QWEN2, QWEN3, QWEN3_MOE, GPT2, GPT_NEO, GPT_NEOX, STABLELM,
                                    PHI3)


def family_of(hf: HfConfig) -> Family:
    """The family of a config.json dict, by its model_type."""
    model_type = hf.get("model_type")
    for family in FAMILIES:
        if family.model_type == model_type:
            return family
    supported = ", ".join(f.model_type for f in FAMILIES)
    raise ValueError(f"model_type: {model_type!r} (architectures {hf.get('architectures')}) is not supported; "
                     f"Heron imports {supported}")


# ModelConfig fields a config.json must give, and those that must be whole numbers where it does.
REQUIRED_SIZES = ("vocab_size", "d_model", "n_layers", "n_heads")
WHOLE_NUMBERS = REQUIRED_SIZES + ("n_kv_heads", "head_dim", "d_ff", "max_seq_len")


def family_config(family: Family, hf: HfConfig) -> ModelConfig:
    """The ModelConfig of a config.json dict of `family`; ValueError names the field. A key
    the dict leaves out reads as transformers' default for the family (`hf_defaults`)."""
    try:
        return _read_config(family, {**dict(family.hf_defaults), **hf})
    except ValueError as err:
        key = str(err).split(":", 1)[0]
        if key in dict(family.hf_defaults) and key not in hf:  # the value it names is not the file's
            raise ValueError(f"{err} (config.json leaves {key} out: that is transformers' default for "
                             f"{family.model_type})") from err
        raise


def _read_config(family: Family, hf: HfConfig) -> ModelConfig:
    """family_config of a dict with the family's defaults filled in."""
    for key, value in family.hf_fixed:
        if key in hf and hf[key] != value:
            raise ValueError(f"{key}: Heron implements {value!r} only, got {hf[key]!r}")
    values: dict[str, Any] = dict(family.fixed)
    for field, key in family.fields:
        if key in hf:
            values[field] = hf[key]
            if field in WHOLE_NUMBERS and hf[key] is not None and (isinstance(hf[key], bool)
                                                                   or not isinstance(hf[key], int)):
                raise ValueError(f"{key}: a whole number expected, got {hf[key]!r}")
        elif field in REQUIRED_SIZES:
            raise ValueError(f"{key}: missing")
    for read in family.read:
        values.update(read(hf))
    config = ModelConfig(**values)
    return _shortest_schedules(_derive_sizes(config))


def hf_config(family: Family, config: ModelConfig, *, for_transformers: bool = True) -> HfConfig:
    """The config.json dict that `family` needs for `config`; the ValueError names every
    field the family cannot express, not only the first, so one try says all that must change.
    for_transformers=False leaves out what only transformers' config class refuses
    (`Family.transformers_checks`): for a GGUF file, whose values llama.cpp reads as they are."""
    problems = [f"{field}: {family.architecture} needs {value!r}, got {getattr(config, field)!r}"
                for field, value in family.fixed if getattr(config, field) != value]
    out: HfConfig = {"architectures": [family.architecture], "model_type": family.model_type}
    out.update(dict(family.hf_fixed))
    resolved = {"d_ff": config.resolved_d_ff, "n_kv_heads": config.resolved_kv_heads,
                "head_dim": config.resolved_head_dim}
    for field, key in family.fields:
        out[key] = resolved.get(field, getattr(config, field))
    for write in family.write + (family.transformers_checks if for_transformers else ()):
        try:
            out.update(write(config))
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("; and ".join(problems))
    return out


DERIVED_SIZES: tuple[tuple[str, str], ...] = (
    ("d_ff", "resolved_d_ff"), ("n_kv_heads", "resolved_kv_heads"), ("head_dim", "resolved_head_dim"),
)


def _derive_sizes(config: ModelConfig) -> ModelConfig:
    """Sizes that equal Heron's derivation rule become None, so a Heron config
    survives the trip through Hugging Face unchanged. A size with no rule here stays:
    head_dim where d_model is not a multiple of n_heads (Mistral's and Qwen3's configs allow it)."""
    for field, resolved in DERIVED_SIZES:
        try:
            derived = config.replace(**{field: None})
        except ValueError:  # the rule does not apply (d_model % n_heads), or gives a size Heron cannot run
            continue
        if getattr(derived, resolved) == getattr(config, resolved):
            config = derived
    if config.moe is not None and config.moe.d_ff is not None:
        rule = config.replace(moe=dataclasses.replace(config.moe, d_ff=None))
        if rule.resolved_expert_d_ff == config.moe.d_ff:
            config = rule
    return config


SCHEDULES: tuple[tuple[str, Any], ...] = (("attention", DENSE), ("feed_forward", "dense"))  # field, default entry


def _shortest_schedules(config: ModelConfig) -> ModelConfig:
    """Per-layer schedules as their shortest cycle, and one of the default entry alone as ():
    config.json spells out every layer, and a Heron model's (dense, sliding) over four layers
    must come back as it went, not as four entries that compare unequal."""
    changes: dict[str, tuple[Any, ...]] = {}
    for field, default in SCHEDULES:
        schedule = getattr(config, field)
        if not schedule:
            continue
        period = next(p for p in range(1, len(schedule) + 1)
                      if len(schedule) % p == 0 and schedule == schedule[:p] * (len(schedule) // p))
        changes[field] = () if schedule[:period] == (default,) else schedule[:period]
    return config.replace(**changes)


__all__ = [
    "EXPORT_ORDER", "FAMILIES", "Family", "GPT2", "GPT_NEO", "GPT_NEOX", "LLAMA", "MISTRAL", "MIXTRAL", "PHI3", "QWEN2", "QWEN3",
    "QWEN3_MOE", "STABLELM", "family_config", "family_of", "hf_config",
]
