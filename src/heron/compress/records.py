"""The audit records of quantised and pruned checkpoints, made from the folder's own files.

A record made from what the folder holds (its lineage.json and quantization.json)
is the same whether the run that wrote the folder appends it or a later run does.
A kill between the folder's atomic rename and its record leaves a finished folder
that no record wrote; rerunning the same command into it writes that record and
then refuses the folder as it refuses any existing one (`refuse_finished` in
train/checkpoint.py; reruns of finished training and alignment runs write theirs too).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from heron.data.shards import META_FILE
from heron.govern.audit import record_event
from heron.govern.digest import LINEAGE_FILE, QUANTIZATION_FILE, model_hash
from heron.govern.history import read_json
from heron.train.checkpoint import resolve_checkpoint

# quantization.json's own keys around the settings `quantize_model` records (compress/checkpoint.py).
_LAYOUT_KEYS = ("format", "modules")


def record_quantized(folder: Path) -> None:
    """Append the `compress.quantize` record of the quantised checkpoint at `folder`."""
    lineage = read_json(folder / LINEAGE_FILE)
    report = {key: lineage[key] for key in ("quantized_from", "calibration", "energy")}
    stored = read_json(folder / QUANTIZATION_FILE)
    settings = {key: value for key, value in stored.items() if key not in _LAYOUT_KEYS}
    record_event("compress.quantize", outputs={"checkpoint": folder}, model_hash=model_hash(folder),
                 inputs=_inputs(report["quantized_from"], report["calibration"]["calib_shards"]),
                 parameters={**report, **settings})


def record_pruned(folder: Path) -> None:
    """Append the `compress.prune` record of the pruned checkpoint at `folder`."""
    lineage = read_json(folder / LINEAGE_FILE)
    made = {key: lineage[key] for key in ("pruned_from", "pruning")}
    record_event("compress.prune", outputs={"checkpoint": folder}, model_hash=model_hash(folder),
                 inputs=_inputs(made["pruned_from"], made["pruning"]["settings"]["calib_shards"]),
                 parameters=made)


def _inputs(source: str, calib_shards: str | None) -> dict[str, Any]:
    """The record's inputs: the source checkpoint and the calibration shards' meta file, each
    left out when it is gone (a rerun from another folder may not find a relative shard path)."""
    found = {"source": Path(source), "calibration": Path(calib_shards) / META_FILE if calib_shards else None}
    return {role: path for role, path in found.items() if path is not None and path.exists()}


def made_from(key: str, source: str | Path) -> Callable[[dict[str, Any]], bool]:
    """Whether a lineage says (under `key`: quantized_from, pruned_from) it was made from `source`."""
    resolved = str(resolve_checkpoint(source).resolve())
    return lambda lineage: lineage.get(key) == resolved


__all__ = ["made_from", "record_pruned", "record_quantized"]
