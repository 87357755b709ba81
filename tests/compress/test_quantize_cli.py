"""`heron compress quantize` on a tiny checkpoint and a tiny shard folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import heron
from compress_helpers import checkpoint_and_shards
from heron.cli.main import main
from heron.compress import QuantLinear
from heron.compress.checkpoint import QUANTIZATION_FILE


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    return checkpoint_and_shards(tmp_path_factory.mktemp("quantize_cli"))


def test_gptq_int4_with_calibration_shards_writes_a_loadable_checkpoint(folders, tmp_path, capsys) -> None:
    ckpt, shards = folders
    out = tmp_path / "int4"
    assert main(["compress", "quantize", str(ckpt), str(out), "--scheme", "int4", "--method", "gptq",
                 "--group-size", "32", "--act-order", "--calib-shards", str(shards), "--calib-batches", "2",
                 "--calib-batch-size", "2", "--seq-len", "32"]) == 0
    assert "wrote int4 gptq checkpoint" in capsys.readouterr().out
    model, _ = heron.load(out)
    assert isinstance(model.blocks[1].mlp.down, QuantLinear)
    record = json.loads((out / QUANTIZATION_FILE).read_text())
    assert record["group_size"] == 32 and record["act_order"] is True
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["quantized_from"] == str(ckpt) and lineage["calibration"]["calib_batches"] == 2
    assert lineage["energy"]["joules"] > 0 and lineage["energy"]["source"]


def test_rtn_needs_no_shards_and_calibrated_methods_do(folders, tmp_path, capsys) -> None:
    ckpt, _ = folders
    assert main(["compress", "quantize", str(ckpt), str(tmp_path / "int8")]) == 0
    assert main(["compress", "quantize", str(ckpt), str(tmp_path / "awq"), "--method", "awq"]) == 2
    assert "calib_shards: method 'awq' needs a shard folder" in capsys.readouterr().err
    assert main(["compress", "quantize", str(ckpt), str(tmp_path / "g"), "--scheme", "int4", "--group-size", "48"]) == 2
    assert "group_size: 48 does not divide" in capsys.readouterr().err
