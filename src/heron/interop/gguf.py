"""GGUF out: a Heron model and its tokenizer as one file that llama.cpp runs.

The file is built on the Hugging Face export, not on Heron's modules:
`hf_config(LLAMA, config)` (`MIXTRAL` for a Mixture of Experts, `QWEN3` or
`QWEN3_MOE` for a model with `qk_norm`, `GPT_NEOX` for LayerNorm with RoPE)
decides whether the model is expressible (a ValueError names the field when
it is not: sparse attention, router centring, ...) and its values fill
llama.cpp's hyperparameters (what only transformers' config class refuses,
LlamaConfig's heads that do not divide d_model, is not refused: the file
states the head width itself); `heron_to_hf` yields the tensors, renamed by
gguf-py's own name table for llama.cpp's architecture: `llama`, which runs
Mixtral too, `qwen3`, `qwen3moe` or `gptneox`. What a Hugging Face family
expresses and llama.cpp's architecture would not run as Heron does (a
sliding window, which none of the four reads) is refused too, by
`LLAMA_CPP_CHECKS`.
Four things differ from a Hugging Face folder, and all are done as
llama.cpp's `convert_hf_to_gguf.py` does them:

- for the llama architecture q and k rows are permuted (`interleave_rope`):
  it rotates consecutive pairs of a head's dimensions, where Hugging Face,
  Heron and llama.cpp's qwen3 rotate dimension j with j + head_dim / 2;
- Llama 3 RoPE scaling travels as per-frequency divisors in a
  `rope_freqs.weight` tensor (llama only); linear scaling as llama.cpp's "linear" rope
  scaling type;
- GPT-NeoX's fused q/k/v rows, head by head in the checkpoint, go in as
  all q, then all k, then all v (`qkv_in_blocks`);
- a MoE layer's experts are stacked, one (experts, out, in) tensor each for
  gate, up and down, for Mixtral and Qwen3-MoE alike (`stacked_experts`; quantised experts come as blocks
  already stacked, `blocks`).

Tensor types follow the converter as well: 1-D tensors (norms, biases, rope
factors) stay f32, and a matrix whose rows do not split into blocks of the
file's quantisation falls back to f16. A weight past what its type keeps
finite (a value, or a block's scale or minimum, past f16's 65504:
`F16_NUMBERS`) is refused, naming the tensor, and so is a NaN or inf
weight. A caller may hand in matrices already encoded as rows of ggml
blocks (`raw_types`): a quantised Heron model's codes (compress/gguf_export.py)
go into the file as they are, not rounded twice.

The tokenizer goes in as a llama.cpp tokenizer model that tokenizes as its
tokenizer.json does (interop/gguf_tokenizer.py); any other is refused.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from heron.core.config import ModelConfig
from heron.core.rope import rope_frequencies
from heron.core.transformer import Transformer
from heron.govern.audit import record_event
from heron.interop.families import (GPT_NEOX, LLAMA, MIXTRAL, QWEN3, QWEN3_MOE, Family, HfConfig, _in_context,
                                     hf_config)
from heron.interop.finite import check_finite
from heron.interop.gguf_tokenizer import add_tokenizer
from heron.interop.tables import expand, heron_to_hf
from heron.store.atomic import atomic_path
from heron.tokenizer.bpe import HeronTokenizer
from heron.tokenizer.pretrained import PretrainedTokenizer

# The llama.cpp architecture each family is written as, and whether it rotates pairs of
# dimensions (llama: q and k rows permuted) rather than halves (qwen3: rows as they are).
ARCHS: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    LLAMA.name: (gguf.MODEL_ARCH.LLAMA, True), MIXTRAL.name: (gguf.MODEL_ARCH.LLAMA, True),
    QWEN3.name: (gguf.MODEL_ARCH.QWEN3, False), QWEN3_MOE.name: (gguf.MODEL_ARCH.QWEN3MOE, False),
    GPT_NEOX.name: (gguf.MODEL_ARCH.GPTNEOX, False),
}
F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
Q8_0, Q4_0, Q4_1 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1

# save_gguf's dtype -> (general.file_type, the type of the file's matrices)
FILE_TYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, Q4_0),
    "q4_1": (gguf.LlamaFileType.MOSTLY_Q4_1, Q4_1),
}

# type -> the numbers it keeps as f16: (what each is, blocks (n, block size) float32 -> (n,)), computed
# as gguf.quants computes them (bit-exact with ggml-quants.c). One that f16 rounds past its largest
# number, 65504, is inf in the file, and llama.cpp's logits NaN. A Q8_0 block's scale is its largest
# |weight| / 127 and a Q4_0 block's / 8; Q4_1 keeps (max - min) / 15 and min, so it holds a large
# positive weight (1e5 in a block of small ones) and not a large negative one.
F16_MAX = float(np.finfo(np.float16).max)
F16_NUMBERS: dict[gguf.GGMLQuantizationType, tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...]] = {
    F32: (),
    F16: (("a value", lambda blocks: blocks[:, 0]),),  # blocks of one value
    Q8_0: (("a block's f16 scale (its largest |value| / 127)", lambda blocks: np.abs(blocks).max(axis=1) / 127),),
    Q4_0: (("a block's f16 scale (its largest |value| / 8)", lambda blocks: np.abs(blocks).max(axis=1) / 8),),
    Q4_1: (("a block's f16 scale ((its largest value - its smallest) / 15)",
            lambda blocks: (blocks.max(axis=1) - blocks.min(axis=1)) / 15),
           ("a block's f16 minimum (its smallest value)", lambda blocks: blocks.min(axis=1))),
}

_W = gguf.GGUFWriter
# llama.cpp hyperparameter <- config.json key, as convert_hf_to_gguf.py writes them for LlamaForCausalLM.
HPARAMS: tuple[tuple[Callable[[gguf.GGUFWriter, Any], None], str], ...] = (
    (_W.add_vocab_size, "vocab_size"),
    (_W.add_context_length, "max_position_embeddings"),
    (_W.add_embedding_length, "hidden_size"),
    (_W.add_block_count, "num_hidden_layers"),
    (_W.add_feed_forward_length, "intermediate_size"),
    (_W.add_head_count, "num_attention_heads"),
    (_W.add_head_count_kv, "num_key_value_heads"),
    (_W.add_key_length, "head_dim"),
    (_W.add_value_length, "head_dim"),
    (_W.add_rope_dimension_count, "head_dim"),  # RoPE turns every dimension of a head
    (_W.add_layer_norm_rms_eps, "rms_norm_eps"),
)

def save_gguf(
    model: Transformer,
    tokenizer: HeronTokenizer | PretrainedTokenizer,
    path: str | os.PathLike[str],
    *,
    dtype: str = "f32",
    name: str | None = None,  # general.name; None: the file name without its suffix
    weights: Mapping[str, torch.Tensor] | None = None,  # Heron name -> tensor; None: the model's parameters
    raw_types: Mapping[str, gguf.GGMLQuantizationType] | None = None,  # weights given as ggml block bytes
    blocks: Mapping[str, tuple[torch.Tensor, gguf.GGMLQuantizationType]] | None = None,  # llama.cpp name -> blocks
) -> Path:
    """Write `model` and `tokenizer` as a GGUF file of llama.cpp's llama (or,
    with qk_norm, qwen3; with LayerNorm, gptneox) architecture; returns the
    path. The file appears whole or not at all.
    ValueError names the field when llama.cpp cannot express the model.

    `dtype` is the type of the float matrices. A weight named in `raw_types`
    is a (rows, bytes) uint8 tensor of ggml blocks of that type, written as it
    is; `blocks` adds tensors of ggml blocks already in llama.cpp's name and
    layout (a MoE layer's stacked experts, (E, rows, bytes)), for weights left
    out of `weights`. The file's type is then the most common block type's."""
    if dtype not in FILE_TYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(FILE_TYPES)}")
    file_type, matrix_type = FILE_TYPES[dtype]
    raw_types, blocks = dict(raw_types or {}), dict(blocks or {})
    block_types = [*raw_types.values(), *(qtype for _, qtype in blocks.values())]
    if block_types:
        most_common = max(set(block_types), key=block_types.count)
        file_type = next(ftype for ftype, qtype in FILE_TYPES.values() if qtype == most_common)
    config = model.config
    family = family_of(config)
    try:
        hf = hf_config(family, _one_attention_bias(config), for_transformers=False)  # the file states head_dim
    except ValueError as err:  # say which mapping a GGUF file goes through, and which ones exist
        raise ValueError(f"{err} (a GGUF file is written as llama.cpp's llama, qwen3, qwen3moe or gptneox "
                         f"architecture, through Hugging Face's {family.architecture} mapping)") from None
    _check_llama_cpp_runs(family, config)
    target = Path(path)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[ARCHS[family.name][0]])
    writer.add_name(name if name is not None else target.stem)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, hf, config)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    for tensor_name, tensor, heron_name in gguf_tensors(config, weights or dict(model.named_parameters())):
        if heron_name in raw_types:
            data, qtype = tensor.contiguous().numpy(), raw_types[heron_name]
        else:
            data, qtype = encode_tensor(tensor, matrix_type, name=f"{heron_name} ({tensor_name} in the file)")
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    for tensor_name, (data, qtype) in blocks.items():
        writer.add_tensor(tensor_name, data.contiguous().numpy(), raw_dtype=qtype)
    _write_atomic(writer, target)
    record_event("convert.to_gguf", outputs={"gguf": target},
                 parameters={"dtype": dtype, "file_type": file_type.name, "name": name or target.stem,
                             "raw_tensors": len(raw_types) + len(blocks)})
    return target


# ----- hyperparameters --------------------------------------------------------------------------

def family_of(config: ModelConfig) -> Family:
    """The Hugging Face family a GGUF file is made through: GPT-NeoX for LayerNorm with
    RoPE (its parallel residuals and partial rotary too), Qwen3 (Qwen3-MoE with experts)
    for per-head q and k norms, Mixtral for a Mixture of Experts, else LLaMA."""
    if config.norm == "layernorm" and config.positions == "rope":
        return GPT_NEOX
    if config.qk_norm:
        return QWEN3 if config.moe is None else QWEN3_MOE
    return LLAMA if config.moe is None else MIXTRAL


def _one_attention_bias(config: ModelConfig) -> ModelConfig:
    """`config` as Hugging Face's one `attention_bias` flag (LlamaConfig's) sees it. A GGUF
    file holds each bias as a tensor of its own: llama.cpp's llama reads bq, bk, bv and bo
    each where present (llama-model.cpp: TENSOR_NOT_REQUIRED), and gptneox is given zeros
    (`neox_stand_ins`). So Qwen2's q/k/v biases without an o bias need not pass that flag's
    check; qwen3, which reads none, is refused by `_no_qwen3_biases`."""
    return config.replace(out_bias=config.qkv_bias)


def _arch_name(family: Family) -> str:
    return gguf.MODEL_ARCH_NAMES[ARCHS[family.name][0]]


def _dense_attention(family: Family, config: ModelConfig) -> str | None:
    """None of the architectures written reads a sliding window (llama.cpp reads
    {arch}.attention.sliding_window for Gemma, Cohere2, ... only), so a window left out of
    the file would let llama.cpp attend further back than the model does. A window the
    context fits in leaves no key out: that layer is dense (`_in_context`)."""
    sparse = [i for i in range(config.n_layers) if _in_context(config, i).kind != "dense"]
    if not sparse:
        return None
    pattern = config.attention_pattern(sparse[0])
    window = f" (window {pattern.window})" if pattern.kind == "sliding" else ""
    return (f"attention: layer {sparse[0]} is {pattern.kind!r}{window}; llama.cpp's {_arch_name(family)} "
            "architecture has dense attention only, and the file would attend further back than the model does")


def _no_qwen3_biases(family: Family, config: ModelConfig) -> str | None:
    """Hugging Face's Qwen3 families have `attention_bias`; llama.cpp's qwen3 and qwen3moe load none."""
    if family not in (QWEN3, QWEN3_MOE):
        return None
    field = next((f for f in ("qkv_bias", "out_bias") if getattr(config, f)), None)
    return None if field is None else f"{field}: llama.cpp's {_arch_name(family)} architecture has no attention biases"


def _experts_on_every_layer(family: Family, config: ModelConfig) -> str | None:
    """Qwen3-MoE's `mlp_only_layers` keep dense MLPs; llama.cpp's qwen3moe has experts on every layer."""
    dense = [i for i in range(config.n_layers) if family is QWEN3_MOE and not config.is_moe_layer(i)]
    if not dense:
        return None
    return f"feed_forward: layer {dense[0]} is dense; llama.cpp's qwen3moe architecture has experts on every layer"


def _llama3_rope_on_llama(family: Family, config: ModelConfig) -> str | None:
    """Llama 3 scaling travels as `rope_freqs.weight`, which llama.cpp's llama loads and its
    qwen3, qwen3moe and gptneox do not: the file would hold a tensor they reject."""
    scaling = config.rope_scaling
    if scaling is None or scaling.kind != "llama3" or ARCHS[family.name][0] == gguf.MODEL_ARCH.LLAMA:
        return None
    return (f"rope_scaling: llama.cpp's {_arch_name(family)} architecture reads no rope_freqs.weight, which "
            "carries Llama 3 scaling; only a model written as llama (no qk_norm, RMSNorm) can have it")


# What llama.cpp's architectures cannot run though Hugging Face's family expresses it: each
# check gives its problem, naming the field, or None.
LLAMA_CPP_CHECKS: tuple[Callable[[Family, ModelConfig], str | None], ...] = (
    _dense_attention, _no_qwen3_biases, _experts_on_every_layer, _llama3_rope_on_llama,
)


def _check_llama_cpp_runs(family: Family, config: ModelConfig) -> None:
    """ValueError naming every problem `LLAMA_CPP_CHECKS` finds, as `hf_config` names its own."""
    problems = [problem for check in LLAMA_CPP_CHECKS if (problem := check(family, config))]
    if problems:
        raise ValueError("; and ".join(problems))


# llama.cpp's gptneox hyperparameters <- GPT-NeoX's config.json keys, as convert_hf_to_gguf.py writes them.
NEOX_HPARAMS: tuple[tuple[Callable[[gguf.GGUFWriter, Any], None], str], ...] = (
    (_W.add_context_length, "max_position_embeddings"),
    (_W.add_embedding_length, "hidden_size"),
    (_W.add_block_count, "num_hidden_layers"),
    (_W.add_feed_forward_length, "intermediate_size"),
    (_W.add_head_count, "num_attention_heads"),
    (_W.add_parallel_residual, "use_parallel_residual"),
    (_W.add_layer_norm_eps, "layer_norm_eps"),
)


def _add_hparams(writer: gguf.GGUFWriter, hf: HfConfig, config: ModelConfig) -> None:
    if hf["model_type"] == GPT_NEOX.model_type:
        for add, key in NEOX_HPARAMS:
            add(writer, hf[key])
        writer.add_rope_dimension_count(config.rotary_dim or config.resolved_head_dim)
        _add_rope(writer, config)
        return
    for add, key in HPARAMS:
        add(writer, hf[key])
    if "num_local_experts" in hf:  # Mixtral: feed_forward_length above is one expert's width
        writer.add_expert_count(hf["num_local_experts"])
        writer.add_expert_used_count(hf["num_experts_per_tok"])
    if "num_experts" in hf:  # Qwen3-MoE: the experts' width apart from the dense one
        writer.add_expert_count(hf["num_experts"])
        writer.add_expert_used_count(hf["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(hf["moe_intermediate_size"])
    _add_rope(writer, config)


def _add_rope(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """RoPE's base, and linear scaling as llama.cpp's "linear" type: llama-model.cpp reads
    rope.scaling.* for every architecture, and each graph rotates by positions times
    1 / factor (freq_scale). Llama 3 scaling is a tensor instead: `rope_freq_factors`."""
    writer.add_rope_freq_base(config.rope_theta)
    scaling = config.rope_scaling
    if scaling is not None and scaling.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)


def rope_freq_factors(config: ModelConfig) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs.weight` for Llama 3 scaling, (head_dim // 2,):
    the divisor of each inverse frequency, so that llama.cpp's angles are
    Heron's (core/rope.py); None for other scalings."""
    scaling = config.rope_scaling
    if scaling is None or scaling.kind != "llama3":
        return None
    head_dim, theta = config.resolved_head_dim, config.rope_theta
    return (rope_frequencies(head_dim, theta, None) / rope_frequencies(head_dim, theta, scaling)).float()


# ----- tensors ----------------------------------------------------------------------------------

def interleave_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q or k projection rows, (n_heads * head_dim, ...), from rotate-half order to llama.cpp's.

    Hugging Face and Heron (core/rope.py) rotate dimension j of a head with
    j + head_dim / 2; llama.cpp's llama architecture rotates the pair
    (2j, 2j + 1). Row a * head_dim / 2 + j of a head moves to row 2j + a:
    convert_hf_to_gguf.py's `LlamaModel.permute`. Biases move the same way.
    """
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def qkv_in_blocks(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """GPT-NeoX's fused rows, head by head (q, k, v of each head), as llama.cpp's gptneox
    reads them: all q, then all k, then all v (convert_hf_to_gguf.py's GPTNeoXModel)."""
    return qkv.reshape(n_heads, 3, -1, *qkv.shape[1:]).transpose(0, 1).reshape(qkv.shape)


def gguf_tensors(config: ModelConfig, weights: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(llama.cpp name, tensor in llama.cpp's layout, the Heron tensor it comes
    from) for every tensor of the file. Every step moves whole rows, so a
    matrix given as rows of ggml blocks is rearranged like a float one. A
    tied output head is left out: llama.cpp's llama and qwen3 reuse `token_embd` when
    `output` is absent (gptneox does not: `neox_stand_ins`)."""
    family = family_of(config)
    arch, rotates_pairs = ARCHS[family.name]
    names = gguf.get_tensor_name_map(arch, config.n_layers)
    rope_heads = {gguf.MODEL_TENSOR.ATTN_Q: config.n_heads,
                  gguf.MODEL_TENSOR.ATTN_K: config.resolved_kv_heads} if rotates_pairs else {}
    n_experts = 0 if config.moe is None else config.moe.n_experts
    origin = {hf: heron for heron, _, parts in expand(family.weights, config.n_layers, n_experts)
              for part in parts for hf in part.names}
    origin |= {_stack_name(expert): heron for hf, heron in origin.items() if (expert := _EXPERT.match(hf))}
    for hf_name, tensor in stacked_experts(heron_to_hf(weights, family.weights, config), n_experts):
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ValueError(f"{hf_name}: no tensor of llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} architecture "
                             "has this name")
        kind, name = found
        if family is GPT_NEOX and kind == gguf.MODEL_TENSOR.ATTN_QKV:
            tensor = qkv_in_blocks(tensor, config.n_heads)
        yield name, interleave_rope(tensor, rope_heads[kind]) if kind in rope_heads else tensor, origin[hf_name]
    if family is GPT_NEOX:
        yield from neox_stand_ins(config, weights)
    factors = rope_freq_factors(config)
    if factors is not None:
        yield f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight", factors, "rope_freqs"


def neox_stand_ins(config: ModelConfig, weights: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """What llama.cpp's gptneox loader requires (llama-model.cpp creates `output`, `bqkv` and
    `bo` without TENSOR_NOT_REQUIRED) and a Heron GPT-NeoX may lack, as `gguf_tensors` yields
    tensors, each exact: a tied head is the embedding itself (quantised blocks too, hence
    its origin), and a bias the model has none of is zeros."""
    if config.tie_embeddings:
        yield f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT]}.weight", weights["embed.weight"], "embed.weight"
    width = config.n_heads * config.resolved_head_dim  # gptneox: as many k and v heads as q heads
    biases = ((config.qkv_bias, gguf.MODEL_TENSOR.ATTN_QKV, "qkv", 3 * width),
              (config.out_bias, gguf.MODEL_TENSOR.ATTN_OUT, "out", config.d_model))
    for i in range(config.n_layers):
        for present, kind, linear, size in biases:
            if not present:
                name = f"{gguf.TENSOR_NAMES[kind].format(bid=i)}.bias"
                yield name, torch.zeros(size), f"blocks.{i}.attn.{linear}.bias"


_EXPERT = re.compile(r"(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<linear>w[123]|(?:gate|up|down)_proj)\.weight$")


def _stack_name(expert: re.Match[str]) -> str:
    """...experts.{e}.w1.weight -> ...experts.w1.weight (Qwen3-MoE: gate_proj for w1), the
    name convert_hf_to_gguf.py maps."""
    return f"{expert['prefix']}.{expert['linear']}.weight"


def stacked_experts(tensors: Iterator[tuple[str, torch.Tensor]],
                    n_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Mixtral's or Qwen3-MoE's per-expert linears (out, in), as `heron_to_hf` yields them,
    stacked into one (n_experts, out, in) tensor per layer and linear, in
    expert order, as llama.cpp keeps them; other tensors pass through."""
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors:
        expert = _EXPERT.match(name)
        if expert is None:
            yield name, tensor
            continue
        stacked = _stack_name(expert)
        stack = pending.setdefault(stacked, {})
        stack[int(expert["expert"])] = tensor
        if len(stack) == n_experts:
            yield stacked, torch.stack([stack.pop(e) for e in range(n_experts)])
            del pending[stacked]
    if pending:  # a layer some of whose experts never came
        stacked, stack = next(iter(pending.items()))
        raise ValueError(f"{stacked}: got experts {sorted(stack)} of {n_experts}")


def encode_tensor(
    tensor: torch.Tensor, matrix_type: gguf.GGMLQuantizationType, *, name: str = "tensor"
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The data gguf writes for one tensor, and its ggml type.

    1-D tensors stay f32: llama.cpp's norm and bias kernels take f32. A
    matrix whose rows do not split into the type's blocks (32 values for
    Q8_0 and Q4_x) is written f16 instead, as convert_hf_to_gguf.py falls back.
    A ValueError names the tensor (`name`) when a weight is NaN or inf, or
    past what its type keeps finite (`F16_NUMBERS`).
    """
    data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
    qtype = F32 if data.ndim == 1 else matrix_type
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:  # rows that do not fill blocks
        qtype = F16
    _check_finite(name, data, qtype, matrix_type)
    return gguf.quants.quantize(data, qtype), qtype


def _check_finite(name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType,
                  matrix_type: gguf.GGMLQuantizationType) -> None:
    """Refuse a tensor with a NaN or inf weight, which no type helps, or one that `qtype` would
    hold as inf (`F16_NUMBERS`), suggesting the types that hold it."""
    no_type_helps = "in any type llama.cpp would compute NaN logits: fix the model's weights"
    check_finite(name, torch.from_numpy(data), no_type_helps)
    found = _f16_overflow_in(data, qtype)
    if found is None:
        return
    what, number = found
    fell_back = qtype != matrix_type  # rows that fill no block fall back to f16 in any quantised type
    why = f" (its rows fill no {matrix_type.name.lower()} blocks)" if fell_back else ""
    holds = [t.name.lower() for t in (F32, Q8_0) if t != qtype and not data.shape[-1] % gguf.GGML_QUANT_SIZES[t][0]
             and _f16_overflow_in(data, t) is None]
    raise f16_overflow_error(name, f"as {qtype.name.lower()}{why}, {what}", number,
                             f"write the file as {' or '.join(holds)} (--type)")


def _f16_overflow_in(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[str, float] | None:
    """(what, number) for the first of the numbers `qtype` keeps as f16 (`F16_NUMBERS`) that would be inf."""
    blocks = data.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][0])  # (n, block size): rows fill blocks
    for what, numbers in F16_NUMBERS[qtype]:
        if (number := f16_overflow(numbers(blocks))) is not None:
            return what, number
    return None


def f16_overflow(numbers: np.ndarray) -> float | None:
    """The first of `numbers` that f16 holds as inf (one that rounds past its 65504), or None."""
    with np.errstate(over="ignore"):
        overflows = np.isinf(numbers.astype(np.float16))
    return float(numbers[overflows].flat[0]) if overflows.any() else None


def f16_overflow_error(name: str, what: str, number: float, advice: str) -> ValueError:
    """The refusal of a number `f16_overflow` found (`what` it is, in tensor `name`), for float
    weights (`encode_tensor`) and a quantised model's scales (compress/gguf_export.py) alike."""
    return ValueError(f"{name}: {what} would be {number:.6g}, beyond f16's range (±{F16_MAX:.0f}), so the file "
                      f"would hold inf and llama.cpp would compute NaN logits; {advice}")


# ----- file -------------------------------------------------------------------------------------

def _write_atomic(writer: gguf.GGUFWriter, target: Path) -> None:
    """Write the file whole or not at all (`atomic_path`: gguf opens its file by name)."""
    with atomic_path(target) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


__all__ = [
    "ARCHS", "F16_NUMBERS", "FILE_TYPES", "HPARAMS", "LLAMA_CPP_CHECKS", "encode_tensor", "f16_overflow",
    "f16_overflow_error", "family_of", "gguf_tensors", "interleave_rope", "neox_stand_ins", "rope_freq_factors",
    "save_gguf", "stacked_experts",
]
