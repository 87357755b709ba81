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
- a name with `{e}` is one tensor per expert, stacked along a new first axis;
- `order` names a rule (`ROW_ORDERS`) that reorders the rows of the tensor
  the parts make together: GPT-NeoX interleaves q, k and v head by head, and
  it and StableLM rotate only part of each head, which Heron keeps where its
  RoPE tables expect it.

`{i}` stands for the block index. Import (`load_into`) reads each checkpoint
tensor straight into its slice of the model's tensor; export (`heron_to_hf`)
yields one Hugging Face tensor at a time. Either way memory stays near one
copy of the model.
"""
from __future__ import annotations

import collections
import itertools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

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
    order: str | None = None  # a key of ROW_ORDERS: Heron's row r is row index[r] of the parts joined


def _qkv(config: ModelConfig, _: int) -> tuple[int, ...]:
    q, kv = config.n_heads * config.resolved_head_dim, config.resolved_kv_heads * config.resolved_head_dim
    return q, kv, kv


def _halves(_: ModelConfig, total: int) -> tuple[int, ...]:
    return total // 2, total - total // 2


# Part sizes along a row's `dim`, from the config and the fused size: q, k and v
# widths; SwiGLU's gate and up, always of one width.
PART_SIZES: dict[str, Callable[[ModelConfig, int], tuple[int, ...]]] = {"qkv": _qkv, "halves": _halves}


def rotary_order(head_dim: int, rotary_dim: int | None) -> list[int]:
    """For each of Heron's dims in a head, the checkpoint's dim it holds. A checkpoint
    rotates its first rotary_dim dims as two halves (pairs rd/2 apart) and passes the
    rest through; Heron's RoPE tables rotate the first rd/2 dims of each of the head's
    halves (pairs hd/2 apart: core/rope.py), so the halves move there."""
    rd = head_dim if rotary_dim is None else rotary_dim
    half, rd_half = head_dim // 2, rd // 2
    rotated = {d: d for d in range(rd_half)} | {half + d: rd_half + d for d in range(rd_half)}
    passing = iter(range(rd, head_dim))  # the dims a checkpoint does not rotate, in order
    return [rotated[d] if d in rotated else next(passing) for d in range(head_dim)]


def _neox_qkv(config: ModelConfig) -> torch.Tensor:
    """GPT-NeoX's fused query_key_value rows run head by head, q, k and v of each head
    in turn; Heron's run all q, then all k, then all v, q and k in `rotary_order`."""
    hd, heads = config.resolved_head_dim, config.n_heads
    if config.resolved_kv_heads != heads:
        raise ValueError(f"n_kv_heads: GPT-NeoX's fused q/k/v has as many key/value heads as query heads ({heads}), "
                         f"got {config.resolved_kv_heads}")
    rotated, plain = rotary_order(hd, config.rotary_dim), list(range(hd))
    return torch.tensor([(h * 3 + part) * hd + d for part in range(3) for h in range(heads)
                         for d in (plain if part == 2 else rotated)])


def _rotary_qkv(config: ModelConfig) -> torch.Tensor:
    """q, k and v joined as Heron joins them, the dims of each q and k head in `rotary_order`."""
    hd, rotated = config.resolved_head_dim, rotary_order(config.resolved_head_dim, config.rotary_dim)
    q_k_heads, v_rows = config.n_heads + config.resolved_kv_heads, config.resolved_kv_heads * hd
    q_k = [h * hd + d for h in range(q_k_heads) for d in rotated]
    return torch.tensor(q_k + list(range(q_k_heads * hd, q_k_heads * hd + v_rows)))


ROW_ORDERS: dict[str, Callable[[ModelConfig], torch.Tensor]] = {"neox_qkv": _neox_qkv, "rotary_qkv": _rotary_qkv}


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


class TensorSource(Protocol):
    """What import reads from: names, shapes without reading, and tensors.
    A plain dict of tensors is one (`as_source`); `WeightFiles` is another,
    which can also read straight into a destination (`read_into`)."""

    def __contains__(self, name: object) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...

    def shape(self, name: str) -> torch.Size: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read_into(self, name: str, out: torch.Tensor) -> None: ...

    def __getitem__(self, name: str) -> torch.Tensor: ...


class DictSource(dict):
    """A dict of tensors as a `TensorSource`."""

    def shape(self, name: str) -> torch.Size:
        return self[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self[name].dtype

    def read_into(self, name: str, out: torch.Tensor) -> None:
        out.copy_(self[name])


@torch.no_grad()
def load_into(
    source: TensorSource | Mapping[str, torch.Tensor],  # Hugging Face name -> tensor
    targets: Mapping[str, torch.Tensor],  # every Heron tensor to fill, in place
    rows: tuple[WeightRow, ...],
    config: ModelConfig,
    ignored: tuple[str, ...] = (),  # regexes of source tensors that hold no weights
) -> None:
    """Fill every target from the source tensors its row names.

    Every name and shape is checked before anything is read, and every source
    tensor must be used or ignored; a ValueError names the tensor at fault.
    Each part is read straight into its slice of the target where the layouts
    agree, so no tensor is held twice.
    """
    if not hasattr(source, "read_into"):
        source = DictSource(source)
    plans = list(_plan(source, targets, rows, config))
    skip = [re.compile(p) for p in ignored]
    used = {n for _, _, parts in plans for part, _ in parts for n in part.names}
    unexpected = sorted(n for n in source if n not in used and not any(p.fullmatch(n) for p in skip))
    if unexpected:
        raise ValueError(f"{unexpected[0]}: unexpected tensor in the checkpoint, not used by the model")
    for name, row, parts in plans:
        if row.order is not None:  # rows reordered: the parts read and joined, then placed
            joined = torch.cat([source[n] for part, _ in parts for n in part.names])
            targets[name].copy_(joined.index_select(0, ROW_ORDERS[row.order](config)))
            continue
        for part, region in parts:
            slices = region.unbind(0) if part.stacked else (region,)
            for n, out in zip(part.names, slices):
                _read(source, n, out.t() if row.transpose else out)


def _plan(source: TensorSource, targets: Mapping[str, torch.Tensor], rows: tuple[WeightRow, ...],
          config: ModelConfig) -> Iterator[tuple[str, WeightRow, list[tuple[Part, torch.Tensor]]]]:
    """(Heron name, row, [(part, the region of the target it fills)]) for every target, shapes checked."""
    made = set()
    for name, row, parts in expand(rows, config.n_layers, _experts(config)):
        if name not in targets:
            continue
        target, shapes = targets[name], []
        for part in parts:
            for n in part.names:
                if n not in source:
                    raise ValueError(f"{n}: missing from the checkpoint (needed for {name})")
            found = [source.shape(n) for n in part.names]
            common = collections.Counter(found).most_common(1)[0][0]
            odd = next((n for n, s in zip(part.names, found) if s != common), None)
            if odd is not None:
                raise ValueError(f"{odd}: shape {tuple(source.shape(odd))} differs from the other experts' "
                                 f"(stacked into {name})")
            shape = torch.Size(reversed(common)) if row.transpose else common
            shapes.append(torch.Size((len(found), *shape)) if part.stacked else shape)
        want = target.shape
        fits = all(len(s) == len(want) and all(a == b for j, (a, b) in enumerate(zip(s, want)) if j != row.dim)
                   for s in shapes) and sum(s[row.dim] for s in shapes) == want[row.dim]
        if not fits:
            got = ", ".join(f"{p.names[0]}{'[e]' if p.stacked else ''} {tuple(s)}" for p, s in zip(parts, shapes))
            raise ValueError(f"{name}: {got} do not make the model's shape {tuple(want)}")
        offsets = itertools.accumulate((s[row.dim] for s in shapes), initial=0)
        made.add(name)
        yield name, row, [(part, target.narrow(row.dim, start, s[row.dim]))
                          for part, start, s in zip(parts, offsets, shapes)]
    missing = sorted(set(targets) - made)
    if missing:
        raise ValueError(f"{missing[0]}: no row of the weight table produces this parameter")


def _read(source: TensorSource, name: str, out: torch.Tensor) -> None:
    """Source tensor `name` into `out` (a view of a target): read in place when
    `out` is one contiguous block of the source's dtype, else read and convert."""
    if out.is_contiguous() and out.dtype == source.dtype(name):
        source.read_into(name, out)
    else:
        out.copy_(source[name])


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
        if row.order is not None:  # back to the checkpoint's row order
            tensor = tensor.index_select(0, ROW_ORDERS[row.order](config).argsort())
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


__all__ = ["EXPERT", "LAYER", "PART_SIZES", "ROW_ORDERS", "DictSource", "Part", "TensorSource", "WeightRow", "expand",
           "heron_to_hf", "load_into", "rotary_order"]
