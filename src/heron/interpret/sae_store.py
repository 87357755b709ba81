"""Sparse autoencoder folders: sae.safetensors (weights, input scale, dead-feature counters),
sae.json (d_in, hook name, settings, step, metrics) and, mid-training, optimizer.safetensors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from heron.interpret.sae import SAEMetrics, SAESettings, SAETraining, SparseAutoencoder
from heron.store.atomic import write_bytes_atomic
from heron.train.checkpoint import atomic_folder, folder_files, require_replaceable

SAE_FILE = "sae.safetensors"
SETTINGS_FILE = "sae.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT_VERSION = 1


def save_sae(
    path: str | Path, training: SAETraining | SparseAutoencoder, *, metrics: SAEMetrics | dict[str, Any] | None = None
) -> Path:
    """Write an SAE folder atomically: sae.safetensors (weights, input scale, dead-feature
    counters), sae.json (d_in, hook name, settings, step, metrics) and, when there is
    Adam state, optimizer.safetensors, so `train_sae(..., resume_from=load_sae(path))`
    continues. A bare SparseAutoencoder is saved as fully trained. An existing `path` is
    replaced only when it is empty or an SAE folder (nothing but the files save_sae writes)."""
    if isinstance(training, SparseAutoencoder):
        training = SAETraining(training, training.settings.steps, {})
    sae, target = training.sae, require_replaceable(path, _not_from_an_sae, "save_sae")
    if isinstance(metrics, SAEMetrics):
        metrics = metrics.to_dict()
    record = {
        "format": FORMAT_VERSION,
        "d_in": sae.d_in,
        "hook_name": sae.hook_name,
        "settings": sae.settings.to_dict(),
        "step": training.step,
        "metrics": training.metrics if metrics is None else metrics,
    }
    with atomic_folder(target) as tmp:
        write_bytes_atomic(tmp / SAE_FILE, _safetensors(sae.state_dict()))
        if training.optimizer_state:
            write_bytes_atomic(tmp / OPTIMIZER_FILE, _safetensors(training.optimizer_state))
        write_bytes_atomic(tmp / SETTINGS_FILE, json.dumps(record, indent=2, sort_keys=True).encode())
    return target


def _not_from_an_sae(folder: Path) -> set[str]:
    """The files of `folder` save_sae does not write (all of them, without its sae.json)."""
    files = folder_files(folder)
    return files - {SAE_FILE, SETTINGS_FILE, OPTIMIZER_FILE} if SETTINGS_FILE in files else files


def load_sae(path: str | Path, *, device: str | torch.device = "cpu") -> SAETraining:
    """Read a folder written by save_sae; `.sae` is the autoencoder."""
    folder = Path(path)
    record = json.loads((folder / SETTINGS_FILE).read_text())
    if record.get("format") != FORMAT_VERSION:
        raise ValueError(f"{folder / SETTINGS_FILE}: format {record.get('format')!r}, expected {FORMAT_VERSION}")
    sae = SparseAutoencoder(record["d_in"], SAESettings.from_dict(record["settings"]), record["hook_name"])
    weights = safetensors.torch.load_file(folder / SAE_FILE)
    sae.to(weights["W_enc"].dtype)  # a float64 SAE stays float64: load_state_dict would round it to float32
    sae.load_state_dict(weights, strict=True)
    optimizer_file = folder / OPTIMIZER_FILE
    optimizer_state = safetensors.torch.load_file(optimizer_file) if optimizer_file.is_file() else {}
    return SAETraining(sae.to(device), record["step"], optimizer_state, record["metrics"])


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save({name: t.detach().contiguous().cpu() for name, t in tensors.items()})


__all__ = ["load_sae", "save_sae"]
