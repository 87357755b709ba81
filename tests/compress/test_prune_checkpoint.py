"""PruneSettings: a bad request fails on construction, its error naming the
field and the value (library errors name fields; the CLI maps them to flags).
prune_checkpoint: a source with a NaN or infinite weight is refused, and a recovery that diverges writes nothing."""
from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import heron
from compress_helpers import checkpoint_and_shards
from heron.compress.prune_checkpoint import PruneSettings, prune_checkpoint
from heron.compress.calibration import CalibrationSettings, calibration_windows
from heron.train.checkpoint import CheckpointError, save_model_folder
from heron.train.loop import DivergedError

SHARDS = {"calib_shards": "shards"}  # never read: construction only checks the settings


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "magnitude", "sparsity": 0.5, "recover_steps": 2, "recover_lr": 0.0, **SHARDS},
     r"recover_lr: expected a positive learning rate, got 0"),
    ({"method": "magnitude", "sparsity": 0.5, "recover_steps": -1, **SHARDS},
     r"recover_steps: expected a number of steps >= 0, got -1"),
    ({"method": "magnitude", "sparsity": 0.5, "calib_batches": 0}, r"calib_batches: expected a positive integer, got 0"),
    ({"mlp_channels": 0.25, "seq_len": -8, **SHARDS}, r"seq_len: expected a positive integer, got -8"),
    ({"heads": 1.5, **SHARDS}, r"heads: expected a fraction in \(0, 1\), got 1\.5"),
    ({"method": "magnitude", "sparsity": 1.0}, r"sparsity: expected a fraction in \[0, 1\), got 1\.0"),
    ({"method": "magnitude", "nm": (3, 2)}, r"nm: expected 0 < n <= m, got 3:2"),
    ({"method": "magnitude", "nm": (4, 4)}, r"nm: 4:4 keeps every weight; give n < m"),  # a no-op called pruned
    ({"method": "magnitude", "sparsity": 0.5, "nm": (2, 4)},
     r"sparsity: give exactly one of sparsity or nm, got sparsity=0\.5 and nm=2:4"),
    ({"method": "wanda", "sparsity": 0.5}, r"calib_shards: a shard folder of calibration windows is needed for "
                                           r"method 'wanda', got None"),
    ({"experts": 2, "recover_steps": 3}, r"calib_shards: .* needed for experts=2 and recover_steps=3, got None"),
    ({"method": "obs", "sparsity": 0.5, **SHARDS}, r"method: unknown 'obs'; known: magnitude, wanda, sparsegpt"),
    ({"method": "sparsegpt", "mlp_channels": 0.25, **SHARDS},
     r"method: 'sparsegpt' scores unstructured and N:M pruning; it applies only with sparsity or nm"),
    ({}, r"sparsity: nothing to prune; give sparsity, nm, mlp_channels, heads or experts"),
])
def test_a_bad_setting_fails_on_construction_naming_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$") as caught:
        PruneSettings(**kwargs)
    assert "--" not in str(caught.value)  # a field, not a command-line flag


def test_the_calibration_fields_are_shared_and_keep_their_keywords():
    settings = PruneSettings("magnitude", sparsity=0.5, calib_shards="s", calib_batches=2, seed=3)
    assert isinstance(settings, CalibrationSettings) and settings.method == "magnitude"
    recorded = asdict(settings)  # the lineage's record of the settings
    assert (recorded["calib_shards"], recorded["calib_batches"], recorded["seed"]) == ("s", 2, 3)
    with pytest.raises(TypeError):  # the calibration fields are keyword-only: no positional mix-ups
        PruneSettings("magnitude", 0.5, None, None, None, None, 0, 1e-5, "extra")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    return checkpoint_and_shards(tmp_path_factory.mktemp("prune_checkpoint"))


@pytest.mark.parametrize("lr", [1e30, 1e39])
def test_a_diverging_recovery_writes_nothing(folders, tmp_path, lr):
    ckpt, shards = folders
    settings = PruneSettings("magnitude", sparsity=0.5, calib_shards=str(shards), calib_batch_size=2, seq_len=16,
                             recover_steps=3, recover_lr=lr)
    with pytest.raises(DivergedError, match=r"step \d+: "):
        prune_checkpoint(ckpt, tmp_path / "pruned", settings, progress=False)
    assert not (tmp_path / "pruned").exists()


def test_a_non_finite_source_is_refused_before_any_work(folders, tmp_path):
    """A source holding a NaN (in the embedding, which magnitude pruning leaves as it is):
    refused as it loads, naming the source and the tensor; nothing is written."""
    ckpt, _ = folders
    model, _ = heron.load(ckpt)
    with torch.no_grad():
        model.embed.weight[3, 5] = float("nan")  # the embedding: magnitude pruning leaves it as it is
    save_model_folder(tmp_path / "nan_source", model)
    target = tmp_path / "pruned"
    with pytest.raises(CheckpointError, match=rf"^source: {re.escape(str(tmp_path / 'nan_source'))} holds NaN or "
                                              r"infinite weights in \d tensor\(s\) \(first: embed\.weight\)"):
        prune_checkpoint(tmp_path / "nan_source", target, PruneSettings("magnitude", sparsity=0.5), progress=False)
    assert not target.exists()


def test_calibration_shards_shorter_than_one_window_are_named(folders):
    _, shards = folders  # 4,000 training tokens
    with pytest.raises(ValueError, match=rf"^calib_shards: {re.escape(str(shards))}'s training split is too short to "
                                         r"calibrate on \(need at least seq_len \+ 1 = 4097 tokens .*got 4000\)"):
        calibration_windows(shards, 1, 2, 4096)
