"""The audit records of `heron compress quantize` and `prune`, and the record a kill left out.

A kill between the written folder and its audit record leaves a finished folder that no
record wrote; the same command run again writes the very record the killed run would
have written (compared here field by field with what the killed run tried to append),
once, and refuses the folder as before.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from compress_helpers import checkpoint_and_shards
from heron.cli import demo
from heron.compress import records
from heron.compress.prune_checkpoint import PruneSettings, prune_checkpoint
from heron.compress.quantize import QuantizeSettings
from heron.compress.quantize_checkpoint import QuantizeCheckpointSettings, quantize_checkpoint
from heron.govern.audit import LOG_ENV, AuditLog
from heron.govern.digest import artifact, json_value

NOW_WRITTEN = "exists .the audit record a kill left it without: now written.; write to a new folder"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    return checkpoint_and_shards(tmp_path_factory.mktemp("compress_records"))


@pytest.fixture
def log(tmp_path, monkeypatch) -> AuditLog:
    monkeypatch.setenv(LOG_ENV, str(tmp_path / "audit.db"))
    return AuditLog.open(tmp_path / "audit.db")


def gptq_int4(shards: Path) -> QuantizeCheckpointSettings:
    return QuantizeCheckpointSettings(QuantizeSettings(scheme="int4", method="gptq", group_size=32),
                                      calib_shards=str(shards), calib_batches=2, calib_batch_size=2, seq_len=32)


def wanda_half(shards: Path) -> PruneSettings:
    return PruneSettings(method="wanda", sparsity=0.5, calib_shards=str(shards), calib_batches=2,
                         calib_batch_size=2, seq_len=32)


COMMANDS = {
    "compress.quantize": lambda source, target, shards: quantize_checkpoint(source, target, gptq_int4(shards),
                                                                            progress=False),
    "compress.prune": lambda source, target, shards: prune_checkpoint(source, target, wanda_half(shards),
                                                                      progress=False),
}


EXPECTED = {  # a part of each record's parameters, known from the command's settings
    "compress.quantize": lambda source: {"quantized_from": str(source.resolve()), "scheme": "int4", "group_size": 32,
                                         "method": "gptq"},
    "compress.prune": lambda source: {"pruned_from": str(source.resolve())},
}


@pytest.mark.parametrize("event", sorted(COMMANDS))
def test_a_rerun_writes_the_record_a_kill_left_out_as_the_killed_run_would_have(event, folders, log, tmp_path,
                                                                                killed_before_the_record) -> None:
    source, shards = folders
    target = tmp_path / "out"
    attempted = killed_before_the_record(records, lambda: COMMANDS[event](source, target, shards))
    assert target.is_dir() and log.records(event=event) == []
    with pytest.raises(FileExistsError, match=NOW_WRITTEN):
        COMMANDS[event](source, target, shards)
    [record] = log.records(event=event)
    assert record.outputs == {"checkpoint": artifact(target)}
    assert record.inputs == {"source": artifact(source), "calibration": artifact(shards / "meta.json")}
    assert record.inputs == {role: artifact(path) for role, path in attempted["inputs"].items()}
    assert record.model_hash == attempted["model_hash"]
    assert record.parameters == json_value(attempted["parameters"])
    assert record.parameters == EXPECTED[event](source) | record.parameters  # what each command records
    energy = record.parameters.get("energy") or record.parameters["pruning"]["energy"]
    assert energy["joules"] > 0 and not {"format", "modules"} & record.parameters.keys()
    with pytest.raises(FileExistsError, match=f"{target}: exists; write to a new folder"):  # recorded: no second one
        COMMANDS[event](source, target, shards)
    assert len(log.records(event=event)) == 1


# What each command returns, as its audit record's parameters hold it: quantise returns the
# record's parameters plus two sizes; prune returns the report the record holds under "pruning".
RETURNED_IN_RECORD = {
    "compress.quantize": lambda parameters, returned: parameters == json_value(
        {k: v for k, v in returned.items() if k not in ("model_bytes", "size_vs_source")}),
    "compress.prune": lambda parameters, returned: parameters["pruning"] == json_value(returned),
}


@pytest.mark.parametrize("event", sorted(COMMANDS))
def test_an_unbroken_run_writes_one_record_and_a_rerun_none(event, folders, log, tmp_path) -> None:
    """The record holds what the run itself made (its returned summary), not only what it wrote."""
    source, shards = folders
    returned = COMMANDS[event](source, tmp_path / "out", shards)
    [record] = log.records(event=event)
    assert record.outputs == {"checkpoint": artifact(tmp_path / "out")}
    assert RETURNED_IN_RECORD[event](record.parameters, returned)
    with pytest.raises(FileExistsError, match="exists; write to a new folder"):
        COMMANDS[event](source, tmp_path / "out", shards)
    assert len(log.records(event=event)) == 1


def test_a_folder_made_from_another_source_gets_no_record(folders, log, tmp_path, killed_before_the_record) -> None:
    source, shards = folders
    other, _ = checkpoint_and_shards(tmp_path / "other")
    killed_before_the_record(records, lambda: COMMANDS["compress.prune"](source, tmp_path / "out", shards))
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        COMMANDS["compress.prune"](other, tmp_path / "out", shards)
    assert log.records(event="compress.prune") == []


def test_a_damaged_folder_gets_no_record(folders, log, tmp_path, killed_before_the_record) -> None:
    source, shards = folders
    target = tmp_path / "out"
    killed_before_the_record(records, lambda: COMMANDS["compress.quantize"](source, target, shards))
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        COMMANDS["compress.quantize"](source, target, shards)
    assert log.records(event="compress.quantize") == []


def test_the_demo_reusing_its_int8_model_writes_the_record_a_kill_left_out(folders, log, tmp_path,
                                                                           killed_before_the_record) -> None:
    source, _ = folders
    target = tmp_path / "int8"
    killed_before_the_record(records, lambda: demo._quantized(source, target))
    assert demo._quantized(source, target) == target
    [record] = log.records(event="compress.quantize")
    assert record.outputs == {"checkpoint": artifact(target)} and record.inputs == {"source": artifact(source)}
    demo._quantized(source, target)
    assert len(log.records(event="compress.quantize")) == 1
