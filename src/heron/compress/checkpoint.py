"""Quantised checkpoints: a normal Heron model folder plus `quantization.json`.

model.safetensors holds each quantised layer's packed tensors under the
layer's name (`blocks.0.attn.qkv.qweight`, `.scale`, `.zero`, ...; a MoE's
experts under `blocks.0.mlp.experts_up.3.`), a tied head's tensors once
(under `embed.`). quantization.json names every quantised module and its
format (a MoE layer once, kind "experts"), so loading rebuilds those modules
before it reads the weights; it is written inside the same atomic folder and
its sha256 sits in lineage.json with the other files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heron.compress.qlinear import QuantEmbedding, QuantLinear
from heron.compress.quant_moe import QuantMoE, is_expert_layer
from heron.compress.quantize import swap_module, tie_head
from heron.compress.schemes import scheme_from_description
from heron.core.config import ModelConfig
from heron.core.moe import MoE
from heron.core.transformer import Transformer
from heron.govern.digest import QUANTIZATION_FILE
from heron.tokenizer import Tokenizer
from heron.train.checkpoint import (
    MODEL_FILE,
    CheckpointError,
    load_checkpoint,
    load_tokenizer_if_present,
    load_weights,
    resolve_checkpoint,
    save_model_folder,
)

FORMAT = 1


def save_quantized(
    path: str | Path, model: Transformer, tokenizer: Tokenizer | None = None, lineage: dict[str, Any] | None = None
) -> Path:
    """Write a quantised model as a checkpoint folder (atomically) and return its path."""
    modules = quantized_modules(model)
    if not modules:
        raise ValueError("model: has no quantised modules; quantise it first (heron.compress.quantize_model)")
    aliases = {f"{name}.{t}": f"{info['tied_to']}.{t}" for name, info in modules.items() if "tied_to" in info
               for t in model.get_submodule(name).packed()}
    state = {k: v for k, v in model.state_dict().items() if k not in aliases}
    record = {"format": FORMAT, **getattr(model, "quantization", {}), "modules": modules}
    return save_model_folder(
        path, model, tokenizer=tokenizer, lineage={**(lineage or {}), "quantization": _summary(record)},
        state_dict=state, extra_files={QUANTIZATION_FILE: json.dumps(record, indent=2, sort_keys=True).encode()},
    )


def quantized_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{dotted name: format} of every quantised module, as quantization.json records it."""
    found: dict[str, dict[str, Any]] = {}
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        if is_expert_layer(name):
            continue  # rebuilt with its QuantMoE
        if isinstance(module, QuantMoE):
            up = module.experts_up[0]
            found[name] = {"kind": "experts", **up.scheme.describe(), "input_scale": up.input_scale is not None}
        elif isinstance(module, QuantEmbedding):
            found[name] = {"kind": "embedding", **module.scheme.describe()}
            owners[id(module.qweight)] = name
        elif isinstance(module, QuantLinear):
            info: dict[str, Any] = {"kind": "linear", **module.scheme.describe(),
                                    "bias": module.bias is not None, "input_scale": module.input_scale is not None}
            if id(module.qweight) in owners:
                info["tied_to"] = owners[id(module.qweight)]
            found[name] = info
    return found


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("modules", "layers")}


def is_quantized_folder(path: str | Path) -> bool:
    """Whether `path` (a model, run or checkpoints folder) holds a quantised checkpoint."""
    try:
        return (resolve_checkpoint(path) / QUANTIZATION_FILE).is_file()
    except (CheckpointError, OSError):
        return False


def load_quantized_folder(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[Transformer, Tokenizer | None]:
    """(model in eval mode, tokenizer or None): the quantised modules rebuilt
    from quantization.json, then every weight loaded with keys and shapes checked."""
    ckpt = load_checkpoint(path, trainer_state=False)  # verifies every file's hash, quantization.json's too
    modules = read_manifest(ckpt.path / QUANTIZATION_FILE, "modules", "quantisation")
    with torch.device("meta"):
        model = Transformer(ckpt.config)
        for name, info in modules.items():
            if "tied_to" not in info:
                swap_module(model, name, _empty_module(model.get_submodule(name), info, name, ckpt.config))
    model.to_empty(device="cpu")
    model.reset_buffers()
    if isinstance(model.lm_head, nn.Linear) and isinstance(model.embed, nn.Embedding):
        model.tie_weights()
    weights = dict(ckpt.state_dict)
    for name, info in modules.items():
        if "tied_to" in info:
            head = tie_head(model.get_submodule(info["tied_to"]))
            swap_module(model, name, head)
            weights.update({f"{name}.{t}": weights[f"{info['tied_to']}.{t}"] for t in head.packed()
                            if f"{info['tied_to']}.{t}" in weights})
    load_weights(model, weights, source=ckpt.path / MODEL_FILE)
    return model.to(device).eval(), load_tokenizer_if_present(ckpt.path)


def read_manifest(file: Path, key: str, what: str) -> dict[str, dict[str, Any]]:
    """The `key` object of a compression manifest (quantization.json, sparsity.json) of FORMAT."""
    try:
        record = json.loads(file.read_text())
        entries = record[key]
        if record.get("format") != FORMAT or not isinstance(entries, dict):
            raise ValueError(f"format {record.get('format')!r}, expected {FORMAT} with a \"{key}\" object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file}: not a readable {what} record ({err})") from err
    return entries


def _empty_module(old: nn.Module, info: dict[str, Any], name: str, config: ModelConfig) -> nn.Module:
    """A quantised module of `old`'s shape, to be filled by load_state_dict."""
    scheme = scheme_from_description(info)
    if info["kind"] == "experts" and isinstance(old, MoE):
        return QuantMoE(config, scheme, input_scale=bool(info["input_scale"]))
    if info["kind"] == "embedding" and isinstance(old, nn.Embedding):
        return QuantEmbedding(old.num_embeddings, old.embedding_dim, scheme)
    if info["kind"] == "linear" and isinstance(old, nn.Linear):
        return QuantLinear(old.in_features, old.out_features, scheme,
                           bias=bool(info["bias"]), input_scale=bool(info["input_scale"]))
    raise CheckpointError(f"{QUANTIZATION_FILE}: {name} is a {type(old).__name__}, not a quantisable {info['kind']}")


__all__ = ["QUANTIZATION_FILE", "is_quantized_folder", "load_quantized_folder", "quantized_modules", "save_quantized"]
