"""Flags the CLI refuses with one line naming them, before any work: values no run could use, and
options that would do nothing with the others given."""
import importlib
from pathlib import Path

import pytest

from heron.cli.commands import sampling_params
from heron.cli.main import build_parser, main
from heron.compress.distill_loss import check_settings
from heron.core import ModelConfig, Transformer
from heron.tokenizer import train_tokenizer
from heron.train.checkpoint import save_model_folder


def test_a_vocabulary_no_tokenizer_could_allocate_is_refused(tmp_path: Path, capsys) -> None:
    """1e12 tokens aborted the process in Rust (exit 134) instead of failing."""
    (tmp_path / "a.txt").write_text("some text\n")
    assert main(["tokenizer", "train", str(tmp_path / "a.txt"), "--vocab-size", "1000000000000",
                 "--out", str(tmp_path / "tok.json")]) == 2
    assert capsys.readouterr().err.endswith("--vocab-size: at most 1,048,576, got 1,000,000,000,000\n")
    assert not (tmp_path / "tok.json").exists()


@pytest.mark.parametrize("flags, complaint", [
    (["--seed", "99999999999999999999999"], "--seed: must be <= 18446744073709551615, got 99999999999999999999999"),
    (["--watermark-key", "k", "--watermark-delta", "1e300"], "--watermark-delta: the green-list bias must lie in "
                                                              "[0, 10000], got 1e+300"),
    (["--watermark-gamma", "0.5"], "--watermark-gamma: sets the watermark of --watermark-key; add the key"),
    (["--watermark-delta", "3"], "--watermark-delta: sets the watermark of --watermark-key; add the key"),
])
def test_a_generation_flag_that_cannot_work_is_named(flags, complaint) -> None:
    with pytest.raises(ValueError) as caught:
        sampling_params(build_parser().parse_args(["generate", "ckpt", *flags]))
    assert str(caught.value) == complaint


def test_calibration_shards_magnitude_pruning_never_reads_are_refused(tmp_path: Path, capsys) -> None:
    argv = ["compress", "prune", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--sparsity", "0.5",
            "--method", "magnitude", "--calib-shards", str(tmp_path / "shards")]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("heron compress: error: --calib-shards: --method magnitude reads no "
                                              "calibration windows, and no --recover-steps train on them")


@pytest.mark.parametrize("flags, complaint", [
    (["--temperature", "-1"], "--temperature: must be > 0, got -1.0"),
    (["--alpha", "2"], "--alpha: must be in [0, 1], got 2.0"),
    (["--hidden-layers", "x"], "--hidden-layers: 'x' in 'x' is not a teacher layer index or '_'"),
])
def test_distillation_errors_name_the_flag_not_the_keyword(monkeypatch, capsys, flags, complaint) -> None:
    def distill(teacher, recipe, *, temperature, alpha, **rest):  # the library's own check, without a teacher
        check_settings(temperature, alpha)

    monkeypatch.setattr(importlib.import_module("heron.compress.distill"), "distill", distill)
    assert main(["compress", "distill", "teacher", "test", *flags]) == 2
    assert capsys.readouterr().err == f"heron compress: error: {complaint}\n"


def test_data_prepare_into_the_folder_of_its_tokenizer_keeps_that_file_from_later_runs(tmp_path: Path,
                                                                                       capsys) -> None:
    """`heron data prepare SOURCES --tokenizer F/tokenizer.json --out F`, then with another tokenizer into F: that
    one would be installed over the user's file beside the shards, so the second run is refused naming both."""
    (tmp_path / "src").mkdir()
    for i in range(6):
        (tmp_path / "src" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    mine, other, out = tmp_path / "out" / "tokenizer.json", tmp_path / "other.json", tmp_path / "out"
    for tok, vocab_size in ((mine, "270"), (other, "280")):
        assert main(["tokenizer", "train", str(tmp_path / "src"), "--vocab-size", vocab_size, "--out", str(tok)]) == 0
    saved = mine.read_bytes()
    assert main(["data", "prepare", str(tmp_path / "src"), "--tokenizer", str(mine), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["data", "prepare", str(tmp_path / "src"), "--tokenizer", str(other), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"heron data: error: {mine}: your own tokenizer, not {other}; ")
    assert mine.read_bytes() == saved


@pytest.mark.parametrize("verb, inside", [("to-gguf", "model.gguf"), ("to-gguf", "gguf/model.gguf"), ("to-hf", "hf")])
def test_convert_refuses_a_target_inside_its_source_checkpoint_before_writing(tmp_path: Path, capsys, verb,
                                                                             inside) -> None:
    """A file written into the checkpoint folder changes what its lineage and audit hashes describe."""
    tokenizer = train_tokenizer(["def f(a):\n    return a + 1\n" * 20], vocab_size=270, progress=False)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2,
                                    max_seq_len=16))
    checkpoint = save_model_folder(tmp_path / "ckpt", model, tokenizer=tokenizer)
    before = sorted(str(p) for p in checkpoint.rglob("*"))
    assert main(["convert", verb, str(checkpoint), str(checkpoint / inside)]) == 2
    assert capsys.readouterr().err == (f"heron convert: error: {checkpoint / inside}: inside the source {checkpoint}; "
                                       "write to a folder outside it\n")
    assert sorted(str(p) for p in checkpoint.rglob("*")) == before


def test_the_demo_refuses_a_recipe_of_generated_tokens_naming_the_way_out(tmp_path: Path, capsys) -> None:
    """The shipped `test` recipe trains on a synthetic stream; the demo's stages need the corpus's shards."""
    assert main(["demo", "--recipe", "test", "--out", str(tmp_path / "demo")]) == 2
    assert ("--recipe test: trains on generated tokens (data.synthetic); the demo trains on the Python standard "
            "library's shards") in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
