"""`heron watermark detect` on text a tiny random model generated, through its tokenizer."""
import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from heron.cli.watermark import add_generation_options, register, watermark_from_args
from heron.core import ModelConfig, Transformer
from heron.generate import Generator, SamplingParams
from heron.govern.watermark import Watermark
from heron.tokenizer import load_tokenizer, train_tokenizer

TEXTS = [f"def add_{i}(a, b):\n    return a + b + {i}\n\nclass Counter{i}:\n    count = {i}\n" for i in range(40)]
MODEL_VOCAB = 320  # padded past the tokenizer's 300, as imported models often are


def heron_cli(argv: list[str]) -> int:
    """The verb as main.py would run it (register(verbs) on the CLI's subparsers)."""
    parser = argparse.ArgumentParser(prog="heron")
    register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A folder with config.json and tokenizer.json: all the detector reads."""
    folder = tmp_path_factory.mktemp("ckpt")
    train_tokenizer(TEXTS, 300, progress=False).save(folder)
    (folder / "config.json").write_text(json.dumps({"vocab_size": MODEL_VOCAB}))
    return folder


def generated_text(folder: Path, watermark: Watermark | None) -> str:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=MODEL_VOCAB, d_model=32, n_layers=1, n_heads=2, max_seq_len=512)).eval()
    tokenizer = load_tokenizer(folder)
    # A random model's ids often re-encode differently (decoded bytes merge into other BPE tokens), so about
    # half the bigrams the detector sees were never biased: 400 tokens keep z far above 4 all the same.
    params = SamplingParams(max_new_tokens=400, seed=0, ignore_eos=True, watermark=watermark)
    ids = Generator(model, tokenizer).generate_ids([tokenizer.encode("def ")], params)[0]
    return tokenizer.decode([i for i in ids if i < tokenizer.vocab_size])  # a random model samples padding ids too


def test_detect_says_watermarked_for_the_key_and_not_otherwise(checkpoint, tmp_path, capsys):
    text = tmp_path / "out.txt"
    text.write_text(generated_text(checkpoint, Watermark(key="k3y", delta=4.0)))
    assert heron_cli(["watermark", "detect", str(text), "--tokenizer", str(checkpoint), "--key", "k3y"]) == 0
    out = capsys.readouterr().out
    assert "verdict: watermarked" in out, out
    assert heron_cli(["watermark", "detect", str(text), "--tokenizer", str(checkpoint), "--key", "other"]) == 0
    assert "verdict: not watermarked" in capsys.readouterr().out


def test_detect_reads_text_from_the_argument_and_a_bare_tokenizer_json(checkpoint, capsys):
    text = generated_text(checkpoint, None)
    argv = ["watermark", "detect", text, "--tokenizer", str(checkpoint / "tokenizer.json"), "--key", "k3y",
            "--vocab-size", str(MODEL_VOCAB), "--z", "3.5"]
    assert heron_cli(argv) == 0
    assert "verdict: not watermarked (p-value > 0.0002326, the false-positive rate of z > 3.5)" \
        in capsys.readouterr().out


def test_a_p_value_just_past_the_threshold_reads_apart_from_it(checkpoint, monkeypatch, capsys):
    """z 4.41 by the normal approximation, but the exact tail 3.223e-5 is just above z 4's 3.167e-5."""
    from heron.govern import watermark

    near = watermark.Detection(4.41, 40, 60, 3.223e-5, 4.0, False)
    monkeypatch.setattr(watermark, "detect", lambda *args, **kwargs: near)
    assert heron_cli(["watermark", "detect", "some text", "--tokenizer", str(checkpoint), "--key", "k3y"]) == 0
    out = capsys.readouterr().out
    assert "z 4.41 (normal approximation), p-value 3.223e-05 (exact binomial tail: the verdict's)" in out
    assert "verdict: not watermarked (p-value > 3.167e-05, the false-positive rate of z > 4)" in out


def test_a_text_too_short_to_score_gets_no_verdict(checkpoint, capsys):
    assert heron_cli(["watermark", "detect", "", "--tokenizer", str(checkpoint), "--key", "k3y"]) == 0
    assert capsys.readouterr().out.endswith("verdict: none: no token was scored (a text needs at least two tokens)\n")


@pytest.mark.parametrize("flag, value, complaint", [("--z", "nan", "must be a finite number, got 'nan'"),
                                                     ("--z", "-5", "must be above 0, got '-5'"),
                                                     ("--z", "0", "must be above 0, got '0'"),
                                                     ("--vocab-size", "0", "must be above 0, got 0")])
def test_a_setting_that_cannot_hold_is_refused_by_name(checkpoint, capsys, flag, value, complaint):
    with pytest.raises(SystemExit):
        heron_cli(["watermark", "detect", "x y", "--tokenizer", str(checkpoint), "--key", "k", flag, value])
    assert f"argument {flag}: {complaint}" in capsys.readouterr().err


@pytest.mark.parametrize("config, complaint", [("[320]", "expected a JSON object, got list"),
                                               ('{"vocab_size": 3', "not valid JSON"),
                                               (b'\xff{}', "not UTF-8 text")])
def test_a_checkpoint_config_that_cannot_be_read_is_named(checkpoint, tmp_path, config, complaint):
    """A config.json that was not an object ended in a traceback (AttributeError), and invalid JSON named no file."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((checkpoint / "tokenizer.json").read_bytes())
    (folder / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder / 'config.json'))}: {complaint}"):
        heron_cli(["watermark", "detect", "x y", "--tokenizer", str(folder), "--key", "k"])

def test_generation_options_build_the_watermark():
    parser = argparse.ArgumentParser()
    add_generation_options(parser)
    assert watermark_from_args(parser.parse_args([])) is None
    args = parser.parse_args(["--watermark-key", "42", "--watermark-delta", "3"])
    assert watermark_from_args(args) == Watermark(key=42, delta=3.0)  # "42" and 42 are the same key


@pytest.mark.parametrize("size", ["100000000000", "299"])  # hashing 1e11 ids would take 800 GB; 299 < the ids
def test_a_vocab_size_no_model_of_the_tokenizer_has_is_refused(checkpoint, size):
    argv = ["watermark", "detect", "x y", "--tokenizer", str(checkpoint / "tokenizer.json"), "--key", "k",
            "--vocab-size", size]
    with pytest.raises(ValueError, match=f"^--vocab-size: .* has 300 to 1024, got {size}$"):
        heron_cli(argv)


@pytest.mark.parametrize("flag", ["--watermark-gamma", "--watermark-delta"])
def test_a_watermark_setting_without_its_key_is_refused(flag):
    parser = argparse.ArgumentParser()
    add_generation_options(parser)
    with pytest.raises(ValueError, match=f"^{flag}: .*--watermark-key"):
        watermark_from_args(parser.parse_args([flag, "0.5"]))
