"""Weight-name tables: which Hugging Face tensors make up each Heron tensor.

A family's table is a tuple of `WeightRow`s, pure data. A row names one Heron
tensor and the checkpoint tensors it is built from, in the names they have
on disk (what `save_pretrained` writes and the Hub serves):

- several names are concatenated along `dim` (Heron fuses q, k and v into
  `attn.qkv`, and SwiGLU's gate and up into `mlp.up`); `split` names the rule
  that gives the part sizes back on export (`part_sizes`);
- `transpose` marks tensors stored (in, out), the transpose of Heron's
  layout: GPT-2's Conv1D weights, and Mixtral's per-expert linears against
  Heron's stacked (E, in, out) experts;
- a name with `{e}` is one tensor per expert, stacked along a new first axis.

`{i}` stands for the block index. The two directions are generators that
yield one Heron (or Hugging Face) tensor at a time, so a converter can copy
each into place and let it go: memory stays near one copy of the model.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from heron.core.config import ModelConfig

LAYER, EXPERT = "{i}", "{e}"


@dataclass(frozen=True)
class WeightRow:
    """One Heron tensor and the Hugging Face tensors it is made of."""

    heron: str
    hf: tuple[str, ...]
    dim: int = 0  # concatenation axis, in Heron's layout, when `hf` names several tensors
    split: str | None = None  # how export splits the Heron tensor back: a key of PART_SIZES
    transpose: bool = False  # the Hugging Face tensors are stored (in, out)


def _qkv(config: ModelConfig, _: int) -> tuple[int, ...]:
    q, kv = config.n_heads * config.resolved_head_dim, config.resolved_kv_heads * config.resolved_head_dim
    return q, kv, kv


def _halves(_: ModelConfig, total: int) -> tuple[int, ...]:
    return total // 2, total - total // 2


# Part sizes along a row's `dim`, from the config and the fused size: q, k and v
# widths; SwiGLU's gate and up, always of one width.
PART_SIZES: dict[str, Callable[[ModelConfig, int], tuple[int, ...]]] = {"qkv": _qkv, "halves": _halves}


@dataclass(frozen=True)
class Part:
    """One concrete Hugging Face tensor of a row, or the per-expert tensors stacked into it."""

    names: tuple[str, ...]  # one name, or one per expert
    stacked: bool


def expand(rows: tuple[WeightRow, ...], n_layers: int, n_experts: int) -> Iterator[tuple[str, WeightRow, list[Part]]]:
    """(Heron name, row, parts) for every concrete tensor the table describes."""
    for row in rows:
        layers = range(n_layers) if LAYER in row.heron else [None]
        for i in layers:
            def fill(name: str, i: int | None = i) -> str:
                return name if i is None else name.replace(LAYER, str(i))

            parts = [Part(tuple(fill(n).replace(EXPERT, str(e)) for e in range(n_experts)), True) if EXPERT in n
                     else Part((fill(n),), False) for n in row.hf]
            yield fill(row.heron), row, parts


def hf_to_heron(
    source: Mapping[str, torch.Tensor],  # Hugging Face name -> tensor (read on access)
    heron_shapes: Mapping[str, torch.Size],  # every tensor the Heron model has
    rows: tuple[WeightRow, ...],
    config: ModelConfig,
    ignored: tuple[str, ...] = (),  # regexes of source tensors that hold no weights
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Heron name, tensor) for every Heron tensor; then check every source
    tensor was used. ValueError names the tensor at fault."""
    used: set[str] = set()
    made: set[str] = set()
    for name, row, parts in expand(rows, config.n_layers, _experts(config)):
        if name not in heron_shapes:
            continue
        tensors = []
        for part in parts:
            for n in part.names:
                if n not in source:
                    raise ValueError(f"{n}: missing from the checkpoint (needed for {name})")
            used.update(part.names)
            pieces = [source[n].t() if row.transpose else source[n] for n in part.names]
            common = collections.Counter(p.shape for p in pieces).most_common(1)[0][0]
            odd = next((n for n, p in zip(part.names, pieces) if p.shape != common), None)
            if odd is not None:
                raise ValueError(f"{odd}: shape {tuple(source[odd].shape)} differs from the other experts' "
                                 f"(stacked into {name})")
            tensors.append(torch.stack(pieces) if part.stacked else pieces[0])
        want = heron_shapes[name]
        fits = all(t.dim() == len(want) and all(a == b for j, (a, b) in enumerate(zip(t.shape, want)) if j != row.dim)
                   for t in tensors) and sum(t.shape[row.dim] for t in tensors) == want[row.dim]
        if not fits:
            got = ", ".join(f"{p.names[0]}{'[e]' if p.stacked else ''} {tuple(t.shape)}" for p, t in zip(parts, tensors))
            raise ValueError(f"{name}: {got} do not make the model's shape {tuple(want)}")
        out = torch.cat(tensors, dim=row.dim) if len(tensors) > 1 else tensors[0]
        made.add(name)
        yield name, out.contiguous()
    missing = sorted(set(heron_shapes) - made)
    if missing:
        raise ValueError(f"{missing[0]}: no row of the weight table produces this parameter")
    skip = [re.compile(p) for p in ignored]
    unexpected = sorted(n for n in source if n not in used and not any(p.fullmatch(n) for p in skip))
    if unexpected:
        raise ValueError(f"{unexpected[0]}: unexpected tensor in the checkpoint, not used by the model")


def heron_to_hf(
    weights: Mapping[str, torch.Tensor],  # Heron name -> tensor (tied aliases appear once)
    rows: tuple[WeightRow, ...],
    config: ModelConfig,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, tensor) for every tensor the Heron weights make;
    rows whose Heron tensor the model lacks (biases, a tied head) are skipped."""
    for name, row, parts in expand(rows, config.n_layers, _experts(config)):
        if name not in weights:
            continue
        tensor = weights[name]
        total = tensor.shape[row.dim]
        sizes = PART_SIZES[row.split](config, total) if row.split else (total,)
        if len(sizes) != len(parts) or sum(sizes) != total:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not split into {len(parts)} parts of "
                             f"{sizes} along dim {row.dim}")
        for part, piece in zip(parts, tensor.split(sizes, dim=row.dim)):
            pieces = piece.unbind(0) if part.stacked else (piece,)
            for n, p in zip(part.names, pieces):
                yield n, (p.t() if row.transpose else p).contiguous()


def _experts(config: ModelConfig) -> int:
    return config.moe.n_experts if config.moe is not None else 0


__all__ = ["EXPERT", "LAYER", "PART_SIZES", "Part", "WeightRow", "expand", "heron_to_hf", "hf_to_heron"]
