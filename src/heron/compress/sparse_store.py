"""Sparse checkpoints: a normal Heron model folder whose sparse weights are
stored compactly, plus `sparsity.json`.

A weight W with many zeros, of any shape of two or more dimensions (a
linear's (N, K), a MoE's stacked experts (E, K, N)), is stored as two tensors
in model.safetensors:

    {name}.sparse_mask    uint8 (ceil(numel / 8),): bit i of byte k is whether element 8k + i
                          (row-major, last dimension fastest) is stored, little-endian bit order
                          as numpy.packbits(bitorder="little")
    {name}.sparse_values  W's dtype (nnz,): the stored elements in row-major order

so an fp32 weight costs 1/8 + 4 * density bytes per element: at 50% sparsity
2.125 instead of 4, 47% less. A tensor is stored so only when that is smaller
than dense (density below 31/32 for fp32), never a tied tensor (loading
re-ties it by name). sparsity.json names each such tensor with its shape,
dtype and nonzero count; it is written inside the same atomic folder and
hashed in lineage.json. `heron.load` restores the dense weights exactly, to
the shape recorded there.

An element is stored unless it is +0.0 (all its bits zero): -0.0 is stored
too, so that the round trip is exact bit for bit (a mask of `!= 0` would
bring it back as +0.0). prune_model writes its zeros as +0.0, so a pruned
weight stores only its survivors.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heron.compress.checkpoint import FORMAT, read_manifest
from heron.core.transformer import Transformer
from heron.govern.digest import SPARSITY_FILE
from heron.tokenizer import Tokenizer
from heron.train.checkpoint import (
    MODEL_FILE,
    CheckpointError,
    load_checkpoint,
    load_tokenizer_if_present,
    load_weights,
    resolve_checkpoint,
    save_model_folder,
    tied_aliases,
)

MASK, VALUES = ".sparse_mask", ".sparse_values"
_BITS = 2 ** torch.arange(8, dtype=torch.uint8)  # (8,) bit i of a byte


def pack_sparse(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitmask uint8 (ceil(numel / 8),), stored values (nnz,)) of a tensor: every element but +0.0."""
    flat = w.detach().reshape(-1).cpu()  # (numel,)
    stored = stored_elements(flat)
    padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8)
    padded[: flat.numel()] = stored.to(torch.uint8)
    bits = (padded.view(-1, 8) * _BITS).sum(dim=1, dtype=torch.uint8)  # (ceil(numel/8),) bit i = element 8k + i
    return bits, flat[stored].contiguous()


def stored_elements(w: torch.Tensor) -> torch.Tensor:
    """Bool mask (w's shape) of the elements the packed form keeps: all but +0.0. -0.0 is
    kept, as its sign is lost otherwise (it is == 0; only signbit tells it apart)."""
    return (w != 0) | torch.signbit(w)


def unpack_sparse(bits: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense tensor `pack_sparse` took apart."""
    numel = int(torch.Size(shape).numel())
    nonzero = ((bits[:, None] & _BITS) != 0).reshape(-1)[:numel]  # (numel,)
    if int(nonzero.sum()) != values.numel():
        raise ValueError(f"values: {values.numel()} stored, but the mask marks {int(nonzero.sum())} nonzeros")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[nonzero] = values
    return dense.reshape(shape)


def packed_bytes(w: torch.Tensor) -> int:
    """Bytes of the packed form: the mask and the stored values (`stored_elements`)."""
    return -(-w.numel() // 8) + int(stored_elements(w).sum()) * w.element_size()


def sparse_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """(state dict with sparse weights packed, {name: record} for sparsity.json)."""
    aliases = tied_aliases(model)
    tied = set(aliases) | set(aliases.values())
    state: dict[str, torch.Tensor] = {}
    records: dict[str, dict[str, Any]] = {}
    for name, value in model.state_dict().items():
        if value.dim() < 2 or not value.is_floating_point() or name in tied or packed_bytes(value) >= value.nbytes:
            state[name] = value
            continue
        state[name + MASK], state[name + VALUES] = pack_sparse(value)
        records[name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                         "nonzeros": state[name + VALUES].numel()}
    return state, records


def save_sparse(
    path: str | Path, model: Transformer, tokenizer: Tokenizer | None = None, lineage: dict[str, Any] | None = None
) -> Path:
    """Write a model as a checkpoint folder (atomically), its sparse weights packed; return the path."""
    state, records = sparse_state(model)
    stored = sum(math.prod(r["shape"]) for r in records.values())
    nonzeros = sum(r["nonzeros"] for r in records.values())
    summary = {"tensors": len(records), "sparsity": 1 - nonzeros / stored if stored else 0.0}
    record = {"format": FORMAT, "tensors": records}
    return save_model_folder(
        path, model, tokenizer=tokenizer, lineage={**(lineage or {}), "sparse_storage": summary},
        state_dict=state, extra_files={SPARSITY_FILE: json.dumps(record, indent=2, sort_keys=True).encode()},
    )


def is_sparse_folder(path: str | Path) -> bool:
    """Whether `path` (a model, run or checkpoints folder) holds a sparse checkpoint."""
    try:
        return (resolve_checkpoint(path) / SPARSITY_FILE).is_file()
    except (CheckpointError, OSError):
        return False


def load_sparse_folder(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer | None]:
    """(model in eval mode, tokenizer or None) with every packed weight made dense again."""
    ckpt = load_checkpoint(path, trainer_state=False)  # verifies every file's hash, sparsity.json's too
    records = read_manifest(ckpt.path / SPARSITY_FILE, "tensors", "sparsity")
    weights = dict(ckpt.state_dict)
    for name, info in records.items():
        try:
            bits, values = weights.pop(name + MASK), weights.pop(name + VALUES)
            weights[name] = unpack_sparse(bits, values, tuple(info["shape"])).to(getattr(torch, info["dtype"]))
        except (KeyError, ValueError, RuntimeError, AttributeError, TypeError) as err:
            raise CheckpointError(f"{ckpt.path / MODEL_FILE}: sparse tensor {name} unreadable ({err})") from err
    model = Transformer(ckpt.config)
    load_weights(model, weights, source=ckpt.path / MODEL_FILE)
    return model.to(device).eval(), load_tokenizer_if_present(ckpt.path)


__all__ = [
    "SPARSITY_FILE", "is_sparse_folder", "load_sparse_folder", "pack_sparse", "packed_bytes", "save_sparse",
    "sparse_state", "stored_elements", "unpack_sparse",
]
