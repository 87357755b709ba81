"""The audit records of quantised and pruned checkpoints, made from the folder's own files.

A record made from what the folder holds (its lineage.json and quantization.json)
is the same whether the run that wrote the folder appends it or a later run does.
A kill between the folder's atomic rename and its record leaves a finished folder
that no record wrote; rerunning the same command into it writes that record and
then refuses the folder as it refuses any existing one (reruns of finished
training and alignment runs do the same).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from heron.data.shards import META_FILE
from heron.govern.audit import record_event
from heron.govern.audit_lineage import lacks_record
from heron.govern.digest import LINEAGE_FILE, QUANTIZATION_FILE, model_hash
from heron.train.checkpoint import CheckpointError, resolve_checkpoint, verify_checkpoint

# quantization.json's own keys around the settings `quantize_model` records (compress/checkpoint.py).
_LAYOUT_KEYS = ("format", "modules")


def record_quantized(folder: Path) -> None:
    """Append the `compress.quantize` record of the quantised checkpoint at `folder`."""
    lineage = _read_json(folder / LINEAGE_FILE)
    report = {key: lineage[key] for key in ("quantized_from", "calibration", "energy")}
    stored = _read_json(folder / QUANTIZATION_FILE)
    settings = {key: value for key, value in stored.items() if key not in _LAYOUT_KEYS}
    record_event("compress.quantize", outputs={"checkpoint": folder}, model_hash=model_hash(folder),
                 inputs=_inputs(report["quantized_from"], report["calibration"]["calib_shards"]),
                 parameters={**report, **settings})


def record_pruned(folder: Path) -> None:
    """Append the `compress.prune` record of the pruned checkpoint at `folder`."""
    lineage = _read_json(folder / LINEAGE_FILE)
    made = {key: lineage[key] for key in ("pruned_from", "pruning")}
    record_event("compress.prune", outputs={"checkpoint": folder}, model_hash=model_hash(folder),
                 inputs=_inputs(made["pruned_from"], made["pruning"]["settings"]["calib_shards"]),
                 parameters=made)


def refuse_finished(target: str | Path, source: str | Path, made_from: str, record: Callable[[Path], None]) -> None:
    """Return when `target` is not a complete checkpoint whose lineage says (under `made_from`)
    it was made from `source`; else raise the FileExistsError of an existing folder, after
    appending with `record` the audit record a kill left it without, if it has none."""
    folder = Path(target)
    if not folder.is_dir():
        return
    try:
        lineage = verify_checkpoint(folder)  # every file as its lineage records it: no record for a damaged folder
    except CheckpointError:
        return  # not a finished folder: require_new_folder refuses it as anything else there
    if lineage.get(made_from) != str(resolve_checkpoint(source).resolve()):
        return
    written = lacks_record(folder)
    if written:
        record(folder)
    recorded = " (the audit record a kill left it without: now written)" if written else ""
    raise FileExistsError(f"{folder}: exists{recorded}; write to a new folder")


def _read_json(file: Path) -> dict[str, Any]:
    return json.loads(file.read_text(encoding="utf-8"))


def _inputs(source: str, calib_shards: str | None) -> dict[str, Any]:
    """The record's inputs: the source checkpoint and the calibration shards' meta file, each
    left out when it is gone (a rerun from another folder may not find a relative shard path)."""
    found = {"source": Path(source), "calibration": Path(calib_shards) / META_FILE if calib_shards else None}
    return {role: path for role, path in found.items() if path is not None and path.exists()}


__all__ = ["record_pruned", "record_quantized", "refuse_finished"]
