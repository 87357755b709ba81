"""`heron convert to-gguf` on a quantised checkpoint whose int4 groups fit no ggml block:
the layers written as floats are named in a warning and the summary line says so."""
from __future__ import annotations

import torch

from heron.cli.main import main
from heron.compress.checkpoint import save_quantized
from heron.compress.gguf_export import dequantised_layers
from heron.compress.quantize import quantize_model
from heron.core import ModelConfig, Transformer
from heron.tokenizer import train_tokenizer

torch.set_num_threads(1)


def quantised(group_size: int) -> tuple[Transformer, object]:
    tokenizer = train_tokenizer(["def f(a):\n    return a + 1\n" * 40], vocab_size=300, progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_layers=1, n_heads=2,
                                    max_seq_len=64, d_ff=128)).eval()
    return quantize_model(model, scheme="int4", group_size=group_size, progress=False), tokenizer


def test_layers_whose_groups_fit_no_block_are_named_and_counted(tmp_path, capsys):
    model, tokenizer = quantised(group_size=16)
    assert dequantised_layers(model) == ["blocks.0.attn.qkv", "blocks.0.attn.out", "blocks.0.mlp.up",
                                         "blocks.0.mlp.down"]
    save_quantized(tmp_path / "g16", model, tokenizer=tokenizer)
    assert main(["convert", "to-gguf", str(tmp_path / "g16"), str(tmp_path / "g16.gguf")]) == 0
    out, err = capsys.readouterr()
    assert f"warning: {', '.join(dequantised_layers(model))}: codes fit no ggml block" in err
    assert "4 dequantised as f16" in out


def test_groups_of_a_block_multiple_fall_back_nowhere(tmp_path, capsys):
    model, tokenizer = quantised(group_size=32)
    assert dequantised_layers(model) == []
    save_quantized(tmp_path / "g32", model, tokenizer=tokenizer)
    assert main(["convert", "to-gguf", str(tmp_path / "g32"), str(tmp_path / "g32.gguf")]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and "quantised layers' own codes, other matrices f16" in out
