"""The demo's alignment and compression stages on a tiny model: a stage's model is reused only when it was
made from the same base, and the judge's comparison reports what the judge says."""
import json

import pytest
import torch

from heron.align.synthetic import RepeatTask
from heron.cli import demo
from heron.core import ModelConfig, Transformer
from heron.tokenizer import train_tokenizer
from heron.train.checkpoint import save_model_folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two different tiny checkpoints whose tokenizer knows the task's words."""
    task = RepeatTask()
    tokenizer = train_tokenizer([m["content"] for c in task.sft_chats(200, seed=0) for m in c] * 2,
                                vocab_size=300, progress=False)
    folder = tmp_path_factory.mktemp("bases")
    made = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                        max_seq_len=64))
        made.append(save_model_folder(folder / f"base{seed}", model, tokenizer=tokenizer))
    return made


def made_from(model_dir):
    return json.loads((model_dir / "lineage.json").read_text())["alignment"]["base"]


def test_a_stage_is_reused_for_the_same_base_and_redone_for_another(bases, tmp_path, capsys):
    small = ("fit.steps=2", "data.task.n=16")
    first = demo._aligned("sft", "task-sft", bases[0], tmp_path / "sft", small)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = demo._aligned("sft", "task-sft", bases[0], tmp_path / "sft", small)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert "reusing" in capsys.readouterr().out
    redone = demo._aligned("sft", "task-sft", bases[1], tmp_path / "sft", small)
    assert made_from(redone) == str(bases[1].resolve())


def test_the_comparison_of_a_model_with_itself_is_an_even_match(bases, capsys):
    demo._compare_on_task({"SFT": bases[0], "DPO": bases[0]})
    out = capsys.readouterr().out
    assert "DPO beats SFT on 50% of the prompts" in out
    lines = [line for line in out.splitlines() if line.startswith(("  SFT", "  DPO"))]  # the score table
    assert len(lines) == 2 and lines[0].split()[1:] == lines[1].split()[1:]  # same score, same exact share


def test_the_int8_stage_is_reused_for_the_same_model_and_redone_for_another(bases, tmp_path, capsys):
    first = demo._quantized(bases[0], tmp_path / "int8")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert demo._quantized(bases[0], tmp_path / "int8") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp and "reusing" in capsys.readouterr().out
    redone = demo._quantized(bases[1], tmp_path / "int8")
    assert json.loads((redone / "lineage.json").read_text())["quantized_from"] == str(bases[1].resolve())
