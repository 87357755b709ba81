"""Quantised checkpoints: save_quantized -> heron.load gives the same logits;
sizes on disk; the record is hashed with the rest of the folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import heron
from heron.compress import QuantEmbedding, QuantLinear, is_quantized_folder, quantize_model, save_quantized
from heron.compress.checkpoint import QUANTIZATION_FILE
from heron.core import ModelConfig, Transformer
from heron.tokenizer.bpe import train_tokenizer
from heron.train.checkpoint import MODEL_FILE, CheckpointError, save_checkpoint, save_model_folder

CONFIG = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
IDS = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300, progress=False)


def tiny_model(seed: int = 0, config: ModelConfig = CONFIG) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config).eval()


def logits(model: Transformer) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).logits


@pytest.mark.parametrize(("scheme", "method", "kwargs"), [
    ("int8", "rtn", {}),
    ("int4", "awq", dict(group_size=32, tie_embeddings=False)),  # per-input-channel scales, untied head
    ("int4", "gptq", dict(group_size=32, embeddings="fp32")),  # tied fp32 embedding stays a tied Linear
    ("int4", "rtn", dict(group_size=32, embeddings="int4")),
])
def test_round_trip_through_heron_load_gives_identical_logits(
    tmp_path: Path, tokenizer, scheme: str, method: str, kwargs: dict
) -> None:
    options = {k: v for k, v in kwargs.items() if k != "tie_embeddings"}
    tie = kwargs.get("tie_embeddings", True)
    model = tiny_model(config=CONFIG.replace(tie_embeddings=tie))
    calibration = IDS if method != "rtn" else None
    quantize_model(model, scheme, method, calibration, progress=False, **options)
    folder = save_quantized(tmp_path / "q", model, tokenizer, lineage={"source": "test"})
    loaded, loaded_tokenizer = heron.load(folder)
    assert torch.equal(logits(loaded), logits(model))
    assert loaded_tokenizer is not None and not loaded.training
    assert type(loaded.embed) is type(model.embed) and type(loaded.lm_head) is type(model.lm_head)
    if tie:
        assert loaded.lm_head.weight is loaded.embed.weight or loaded.lm_head.qweight is loaded.embed.qweight
    record = json.loads((folder / QUANTIZATION_FILE).read_text())
    assert record["scheme"] == scheme and record["method"] == method
    assert record["modules"]["blocks.1.mlp.down"]["kind"] == "linear"
    lineage = json.loads((folder / "lineage.json").read_text())
    assert lineage["quantization"]["scheme"] == scheme and lineage["source"] == "test"
    assert QUANTIZATION_FILE in lineage["files"]


def test_a_run_folder_of_quantised_checkpoints_loads_too(tmp_path: Path) -> None:
    model = quantize_model(tiny_model(), "int8", progress=False)
    save_quantized(tmp_path / "run" / "checkpoints" / "step_00000001", model)
    assert is_quantized_folder(tmp_path / "run")
    assert torch.equal(logits(heron.load(tmp_path / "run")[0]), logits(model))


def test_int4_checkpoint_is_under_a_fifth_of_fp32_when_linears_dominate(tmp_path: Path) -> None:
    config = ModelConfig(vocab_size=256, d_model=256, n_layers=2, n_heads=4, d_ff=512, max_seq_len=64)
    model = tiny_model(config=config)
    fp32 = save_model_folder(tmp_path / "fp32", model)
    int4 = save_quantized(tmp_path / "int4", quantize_model(model, "int4", group_size=128, progress=False))
    ratio = (int4 / MODEL_FILE).stat().st_size / (fp32 / MODEL_FILE).stat().st_size
    assert ratio < 0.2


def test_a_tampered_record_or_packed_tensor_is_caught(tmp_path: Path) -> None:
    folder = save_quantized(tmp_path / "q", quantize_model(tiny_model(), "int8", progress=False))
    record = folder / QUANTIZATION_FILE
    record.write_text(record.read_text().replace('"int8"', '"int4"'))
    with pytest.raises(CheckpointError, match="quantization.json: sha256 does not match"):
        heron.load(folder)


def test_fp32_folders_are_not_quantised_and_unquantised_models_are_not_saved_as_such(tmp_path: Path) -> None:
    model = tiny_model()
    save_checkpoint(tmp_path / "run", 1, model, keep_last=1)
    assert not is_quantized_folder(tmp_path / "run")
    assert not is_quantized_folder(tmp_path / "missing")
    assert isinstance(heron.load(tmp_path / "run")[0].lm_head, torch.nn.Linear)
    with pytest.raises(ValueError, match="model: has no quantised modules"):
        save_quantized(tmp_path / "q", model)
    with pytest.raises(ValueError, match="save a quantised model with heron.compress.save_quantized"):
        save_model_folder(tmp_path / "plain", quantize_model(model))


def test_loaded_modules_are_quantised_ones(tmp_path: Path) -> None:
    folder = save_quantized(tmp_path / "q", quantize_model(tiny_model(), "int4", group_size=32, progress=False))
    model, _ = heron.load(folder)
    assert isinstance(model.blocks[0].attn.qkv, QuantLinear) and isinstance(model.embed, QuantEmbedding)
    assert model.blocks[0].attn.qkv.scheme.group_size == 32
