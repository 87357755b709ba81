"""A quantised Heron model as a GGUF file, its integer codes carried over unchanged.

Re-quantising the dequantised weights would round them a second time and,
for GPTQ, throw away the error compensation that chose each code. Instead
each scheme's codes and scales are written straight into the ggml block type
that holds the same numbers (blocks of 32 weights of one row, scales fp16):

  int8 per channel        -> Q8_0: d = fp16(s_row), q = code; the only change
                             is the row scale's rounding to fp16 (relative 2^-11).
  int4, symmetric         -> Q4_0: d = s, q = code; exact (s is fp16 already).
  int4, with zero points  -> Q4_1: d = s, m = fp16(-s * z), w = d * q + m; the
                             only change is m's rounding to fp16.

The int4 group must be a multiple of 32 so that every block lies in one
group. A matrix that does not fit (a group of 16, an embedding width that
32 does not divide) is written dequantised in the file's float type, as
llama.cpp's converter falls back, with a warning naming it
(`dequantised_layers`). A MoE layer's quantised experts go in the same way,
each expert's rows of blocks stacked into llama.cpp's one tensor per layer
and matrix (gate and up are the halves of each expert's up
layer). AWQ's per-input-channel scale has no place in a llama.cpp file: such
a model is refused, naming the layer; so is a layer whose block scale or
minimum fp16 would hold as inf (an int8 row whose largest |weight| is past
127 x 65504), as save_gguf refuses a float weight past its type's range.

    save_quantized_gguf(model, tokenizer, "model.gguf")   # heron convert to-gguf
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import gguf
import torch

from heron.compress.qlinear import QuantEmbedding, QuantLinear
from heron.compress.quant_moe import QuantMoE, is_expert_layer
from heron.compress.schemes import Int4Grouped, Int8PerChannel, QParams, Scheme
from heron.core.transformer import Transformer
from heron.interop.gguf import f16_overflow, f16_overflow_error, save_gguf
from heron.tokenizer.bpe import HeronTokenizer
from heron.tokenizer.pretrained import PretrainedTokenizer

BLOCK = 32  # weights per block in every type used here
Q8_0, Q4_0, Q4_1 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1
_EXPERT_TENSORS = _GATE, _UP, _DOWN = (gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP,
                                       gguf.MODEL_TENSOR.FFN_DOWN_EXP)


def ggml_type(scheme: Scheme, in_features: int) -> gguf.GGMLQuantizationType | None:
    """The ggml type that holds this scheme's codes exactly, or None."""
    if in_features % BLOCK:
        return None
    if isinstance(scheme, Int8PerChannel):
        return Q8_0
    if isinstance(scheme, Int4Grouped) and scheme.group_size % BLOCK == 0:
        return Q4_0 if scheme.symmetric else Q4_1
    return None


def ggml_blocks(codes: torch.Tensor, params: QParams, qtype: gguf.GGMLQuantizationType, *,
                name: str = "tensor") -> torch.Tensor:
    """(N, K) codes and their (N, G) parameters as (N, K / 32 * bytes per block)
    uint8: each row's blocks in ggml's layout (d, [m], packed codes). A scale or
    minimum that fp16 would hold as inf is refused, naming the layer (`name`)
    and the value, as save_gguf refuses a float weight (`f16_overflow_error`)."""
    N, K = codes.shape
    blocks = codes.reshape(N, K // BLOCK, BLOCK)  # (N, B, 32)
    per_group = K // params.scale.shape[1] // BLOCK  # blocks sharing one group's parameters
    scale = params.scale.repeat_interleave(per_group, dim=1)  # (N, B)
    header = [_fp16_bytes(scale, name, f"as {qtype.name.lower()}, a block's f16 scale")]  # d
    if qtype == Q8_0:
        body = blocks.to(torch.int8).view(torch.uint8)
    else:  # Q4_0 / Q4_1: value j in the low nibble of byte j, value j + 16 in its high nibble
        nibbles = blocks.to(torch.uint8)
        body = nibbles[..., : BLOCK // 2] | (nibbles[..., BLOCK // 2:] << 4)
        if qtype == Q4_1:
            zero = params.zero.float().repeat_interleave(per_group, dim=1)
            header.append(_fp16_bytes(-scale * zero, name, f"as {qtype.name.lower()}, a block's f16 minimum"))  # m
    return torch.cat([*header, body], dim=2).reshape(N, -1)


def _fp16_bytes(values: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """(N, B) floats -> (N, B, 2) the bytes of their fp16 values, little-endian as ggml reads them;
    ValueError where one would be inf (`what` it is, of layer `name`)."""
    if (number := f16_overflow(values.float().numpy())) is not None:
        raise f16_overflow_error(name, what, number, "its codes fit no GGUF block; write the model it was quantised "
                                 "from instead, as f32 (--type f32)")
    return values.half().contiguous().view(torch.uint8).reshape(*values.shape, 2)


def _own_matrices(model: Transformer) -> Iterator[tuple[str, QuantLinear | QuantEmbedding]]:
    """The quantised matrices written under their own names: not a MoE's experts
    (stacked per layer) nor a tied head (llama.cpp reads it from token_embd)."""
    for name, module in model.named_modules():
        if not isinstance(module, (QuantLinear, QuantEmbedding)) or is_expert_layer(name):
            continue
        if name == "lm_head" and model.config.tie_embeddings:
            continue
        yield name, module


def _matrix_type(module: QuantLinear | QuantEmbedding) -> gguf.GGMLQuantizationType | None:
    width = module.in_features if isinstance(module, QuantLinear) else module.embedding_dim
    return ggml_type(module.scheme, width)


def _expert_types(moe: QuantMoE) -> tuple[gguf.GGMLQuantizationType | None, gguf.GGMLQuantizationType | None]:
    """The ggml types of a MoE layer's (up, down) experts (all share their layer's scheme)."""
    up, down = moe.experts_up[0], moe.experts_down[0]
    return ggml_type(up.scheme, up.in_features), ggml_type(down.scheme, down.in_features)


def dequantised_layers(model: Transformer) -> list[str]:
    """The quantised layers whose codes fit no ggml block type: `save_quantized_gguf`
    writes them dequantised, in the file's float type (a MoE layer's experts as one)."""
    names = [name for name, module in _own_matrices(model) if _matrix_type(module) is None]
    names += [f"{name} experts" for name, module in model.named_modules()
              if isinstance(module, QuantMoE) and None in _expert_types(module)]
    return names


def gguf_weights(model: Transformer) -> tuple[dict[str, torch.Tensor], dict[str, gguf.GGMLQuantizationType],
                                              dict[str, tuple[torch.Tensor, gguf.GGMLQuantizationType]]]:
    """For `save_gguf`: (Heron name -> tensor, Heron name -> ggml type of those
    given as block bytes, llama.cpp name -> (blocks, type) of stacked experts):
    quantised matrices as blocks, the rest as floats."""
    weights = {name: p.detach() for name, p in model.named_parameters()}
    raw: dict[str, gguf.GGMLQuantizationType] = {}
    stacked: dict[str, tuple[torch.Tensor, gguf.GGMLQuantizationType]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantMoE):
            stacked.update(_expert_blocks(name, module, weights))
    for name, module in _own_matrices(model):
        if isinstance(module, QuantLinear):
            _refuse_input_scale(name, module)
            if module.bias is not None:
                weights[f"{name}.bias"] = module.bias
        codes, params = module.unpacked()
        qtype = _matrix_type(module)
        if qtype is None:
            weights[f"{name}.weight"] = module.scheme.dequantize(codes, params)
        else:
            weights[f"{name}.weight"], raw[f"{name}.weight"] = ggml_blocks(codes, params, qtype, name=name), qtype
    return weights, raw, stacked


def _refuse_input_scale(name: str, layer: QuantLinear) -> None:
    if layer.input_scale is not None:
        raise ValueError(f"{name}: AWQ's per-input-channel scale has no GGUF equivalent; export a model "
                         "quantised with --method rtn or gptq")


def _expert_blocks(name: str, moe: QuantMoE, weights: dict[str, torch.Tensor]
                   ) -> dict[str, tuple[torch.Tensor, gguf.GGMLQuantizationType]]:
    """A MoE layer's experts as llama.cpp's stacked gate, up and down tensors of
    blocks, (E, rows, bytes); or, when their codes fit no block type, as
    dequantised stacks in `weights` under the MoE's own names (then {})."""
    for which, layers in (("up", moe.experts_up), ("down", moe.experts_down)):
        for e, layer in enumerate(layers):
            _refuse_input_scale(f"{name}.experts_{which}.{e}", layer)
    up_type, down_type = _expert_types(moe)
    if up_type is None or down_type is None:
        weights[f"{name}.up"], weights[f"{name}.down"] = moe.dequantized()
        return {}
    up_blocks = torch.stack([ggml_blocks(*layer.unpacked(), up_type, name=f"{name}.experts_up.{e}")
                             for e, layer in enumerate(moe.experts_up)])  # (E, width, b)
    down_blocks = torch.stack([ggml_blocks(*layer.unpacked(), down_type, name=f"{name}.experts_down.{e}")
                               for e, layer in enumerate(moe.experts_down)])
    ff, layer = moe.experts_down[0].in_features, int(name.split(".")[1])  # "blocks.{layer}.mlp"
    tensor = {kind: f"{gguf.TENSOR_NAMES[kind].format(bid=layer)}.weight" for kind in _EXPERT_TENSORS}
    return {tensor[_GATE]: (up_blocks[:, :ff], up_type), tensor[_UP]: (up_blocks[:, ff:], up_type),
            tensor[_DOWN]: (down_blocks, down_type)}


def save_quantized_gguf(model: Transformer, tokenizer: HeronTokenizer | PretrainedTokenizer,
                        path: str | os.PathLike[str], *, dtype: str = "f16", name: str | None = None) -> Path:
    """`save_gguf` for a model with quantised layers: their codes go in as
    ggml blocks; any float matrix left is written as `dtype`, and so is each of
    `dequantised_layers`, with a warning naming them."""
    if fallen_back := dequantised_layers(model):
        warnings.warn(f"{', '.join(fallen_back)}: codes fit no ggml block (an int4 group must be a multiple of "
                      f"{BLOCK}, as must the input width); written dequantised, as {dtype}", stacklevel=2)
    weights, raw_types, blocks = gguf_weights(model)
    return save_gguf(model, tokenizer, path, dtype=dtype, name=name, weights=weights, raw_types=raw_types,
                     blocks=blocks)


__all__ = ["dequantised_layers", "ggml_blocks", "ggml_type", "gguf_weights", "save_quantized_gguf"]
