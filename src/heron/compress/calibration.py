"""Calibration data for the calibrated methods (GPTQ, AWQ, Wanda, SparseGPT):
token windows from shards, and the inputs each block and each linear sees.

The methods calibrate sequentially, block by block, as the GPTQ and SparseGPT
reference code does: `first_block_inputs` catches what the model passes to
its first block, and `feed` runs a block on those inputs up to one module,
handing that module's input to a sink. `feed_experts` does the same for a
MoE's stacked experts, handing each expert only the rows routed to it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from heron.compress.quant_moe import QuantMoE
from heron.core.hooks import attach_hooks
from heron.core.moe import MoE
from heron.core.transformer import Transformer
from heron.data import load_shards
from heron.data.batches import PackedBatches

# Keyword-only, so a settings class built on it keeps its own fields' positional order.
@dataclass(frozen=True, kw_only=True)
class CalibrationSettings:
    """Where calibration windows come from, for the compress settings built on it
    (QuantizeCheckpointSettings, PruneSettings); checked on construction."""

    calib_shards: str | None = None  # shard folder: random windows of its training split
    calib_batches: int = 16
    calib_batch_size: int = 8
    seq_len: int = 256  # capped at the model's max_seq_len
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("calib_batches", "calib_batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")



# The linears that compression methods rewrite, per block, in data-flow order.
BLOCK_LINEARS = ("attn.qkv", "attn.out", "mlp.shared.up", "mlp.shared.down", "mlp.up", "mlp.down")
# Where a linear's input is captured when the linear itself may not be called: over many
# rows a SwiGLU MLP multiplies by halves of `up.weight` with F.linear (core/mlp.py).
INPUT_OF = {"mlp.up": "mlp", "mlp.shared.up": "mlp.shared"}
# A MoE's stacked expert weights (E, K, N), in data-flow order, and the hook point of
# core/moe.py that carries their inputs, rows grouped by expert.
EXPERT_INPUTS = {"mlp.up": "mlp.hook_expert_in", "mlp.down": "mlp.hook_expert_post"}


def block_linears(model: Transformer) -> dict[str, nn.Linear]:
    """{dotted name: linear} of the linears compression rewrites, block by block in data-flow order."""
    found: dict[str, nn.Linear] = {}
    for i, block in enumerate(model.blocks):
        for suffix in BLOCK_LINEARS:
            layer = find_module(block, suffix)
            if isinstance(layer, nn.Linear):
                found[f"blocks.{i}.{suffix}"] = layer
    return found


def block_experts(model: Transformer) -> dict[str, nn.Parameter]:
    """{dotted name: stacked expert weight (E, K, N)} of every MoE layer with float
    experts, block by block in data-flow order."""
    return {f"blocks.{i}.{suffix}": block.get_parameter(suffix) for i, block in enumerate(model.blocks)
            if isinstance(block.mlp, MoE) and not isinstance(block.mlp, QuantMoE) for suffix in EXPERT_INPUTS}


def find_module(module: nn.Module, dotted: str) -> nn.Module | None:
    """The submodule at a dotted name, or None."""
    try:
        return module.get_submodule(dotted)
    except AttributeError:
        return None


def input_reader(block: nn.Module, suffix: str) -> nn.Module:
    """The module of `block` whose first input is the input of the linear at `suffix`."""
    return block.get_submodule(INPUT_OF.get(suffix, suffix))


def calibration_windows(shards: str | Path, batches: int, batch_size: int, seq_len: int,
                        seed: int = 0) -> list[torch.Tensor]:
    """`batches` (batch_size, seq_len) windows of token ids from a shard folder's training split."""
    try:
        windows = PackedBatches(load_shards(shards).train, batch_size, seq_len, seed=seed)
    except ValueError as err:  # a training split shorter than one window
        raise ValueError(f"calib_shards: {shards}'s training split is too short to calibrate on ({err}); "
                         "prepare more text, or give a shorter seq_len") from None
    return [windows.batch(step)[0] for step in range(batches)]


def calibration_batches(calibration: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """(B, T) long batches from an (n, T) tensor or array, or an iterable of batches."""
    if isinstance(calibration, np.ndarray):
        calibration = torch.from_numpy(calibration.astype(np.int64, copy=False))
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise ValueError(f"calibration: expected token ids (n, T), got shape {tuple(calibration.shape)}")
        batches = list(calibration.split(batch_size))
    else:
        batches = [torch.as_tensor(b) for b in calibration]
    if not batches or any(b.dim() != 2 or b.numel() == 0 or b.is_floating_point() for b in batches):
        raise ValueError("calibration: expected non-empty (B, T) batches of token ids")
    return batches

class _Stop(Exception):
    """Raised by a capture hook once it has what it needs."""

def first_block_inputs(model: Transformer, batches: Sequence[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """The arguments the model passes to its first block, per batch (the
    reference's "Catcher"): hidden states, RoPE tables, mask, ..."""
    captured: list[tuple[tuple, dict]] = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Stop

    handle = model.blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(ids)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured

def feed(block: nn.Module, reader: nn.Module, inputs: list[tuple[tuple, dict]],
          sink: Callable[[torch.Tensor], None]) -> None:
    """Run the block on every batch until `reader` is reached, passing its input to `sink`."""

    def capture(_module: nn.Module, args: tuple) -> None:
        sink(args[0])
        raise _Stop

    handle = reader.register_forward_pre_hook(capture)
    try:
        for args, kwargs in inputs:
            try:
                block(*args, **kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()


def feed_experts(block: nn.Module, suffix: str, inputs: list[tuple[tuple, dict]],
                 sinks: Sequence[Callable[[torch.Tensor], None]]) -> None:
    """Run the block on every batch until the inputs of its stacked expert weight
    `suffix` (a key of EXPERT_INPUTS), passing expert e's rows (n_e, K) to sinks[e];
    an expert routed no token of a batch gets nothing for it."""
    groups: dict[str, torch.Tensor] = {}

    def split(rows: torch.Tensor) -> None:  # (A, K) grouped by expert in order
        kept = groups["mlp.hook_expert_load"] - groups["mlp.hook_expert_dropped"]  # (E,) fired before the rows
        for sink, part in zip(sinks, rows.split(kept.tolist()), strict=True):
            if len(part):
                sink(part)

    def remember(counts: torch.Tensor, name: str) -> None:  # (E,)
        groups[name] = counts

    with attach_hooks(block, {"mlp.hook_expert_load": remember, "mlp.hook_expert_dropped": remember}):
        feed(block, block.get_submodule(EXPERT_INPUTS[suffix]), inputs, split)


__all__ = [
    "BLOCK_LINEARS", "EXPERT_INPUTS", "INPUT_OF", "CalibrationSettings", "block_experts", "block_linears",
    "calibration_batches", "calibration_windows", "feed", "feed_experts", "find_module", "first_block_inputs",
    "input_reader",
]
