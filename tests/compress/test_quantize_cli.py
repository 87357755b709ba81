"""`heron compress quantize` on a tiny checkpoint and a tiny shard folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import heron
from compress_helpers import V, checkpoint_and_shards
from heron.cli.main import main
from heron.compress import QuantLinear
from heron.compress.checkpoint import QUANTIZATION_FILE
from heron.compress.quant_moe import QuantMoE
from heron.core import ModelConfig, MoEConfig, Transformer
from heron.train.checkpoint import save_model_folder


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
    assert "error: --calib-shards: method 'awq' needs a shard folder, got None" in capsys.readouterr().err
    weights = (ckpt / "model.safetensors").read_bytes()
    for taken, refusal in ((ckpt, "exists and is not empty"), (tmp_path / "int8", "exists; write to a new folder")):
        assert main(["compress", "quantize", str(ckpt), str(taken)]) == 2  # the source itself, or an earlier result
        assert f"{taken}: {refusal}" in capsys.readouterr().err
    assert (ckpt / "model.safetensors").read_bytes() == weights
    assert main(["compress", "quantize", str(ckpt), str(tmp_path / "g"), "--scheme", "int4", "--group-size", "48"]) == 2
    assert "error: --group-size: 48 does not divide" in capsys.readouterr().err
    _, shards = folders
    for flags, complaint in ((["--group-size", "32"], "--group-size: applies to int4 only"),
                             (["--calib-shards", str(shards)], "--calib-shards: rtn rounds each weight on its own")):
        assert main(["compress", "quantize", str(ckpt), str(tmp_path / "ignored"), *flags]) == 2  # int8, rtn
        assert complaint in capsys.readouterr().err


def test_a_moe_checkpoint_quantises_with_its_experts_and_loads(folders, tmp_path, capsys) -> None:
    _, shards = folders
    torch.manual_seed(1)
    config = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
                         feed_forward=("moe",), moe=MoEConfig(n_experts=4, top_k=2, d_ff=64))
    ckpt = save_model_folder(tmp_path / "moe", Transformer(config))
    out = tmp_path / "moe-int4"
    assert main(["compress", "quantize", str(ckpt), str(out), "--scheme", "int4", "--method", "gptq",
                 "--group-size", "32", "--calib-shards", str(shards), "--calib-batches", "2",
                 "--calib-batch-size", "4", "--seq-len", "32"]) == 0
    model, _ = heron.load(out)
    assert isinstance(model.blocks[0].mlp, QuantMoE)
    record = json.loads((out / QUANTIZATION_FILE).read_text())
    assert record["modules"]["blocks.1.mlp"]["kind"] == "experts"
    assert sum(record["layers"]["blocks.1.mlp.experts"]["mlp.up"]) == 2 * 4 * 32 * 2  # tokens x top-2
