"""Flags the CLI refuses with one line naming them, before any work: values no run could use, and
options that would do nothing with the others given."""
import importlib
from pathlib import Path

import pytest

from heron.cli.commands import sampling_params
from heron.cli.main import build_parser, main
from heron.compress.distill_loss import check_settings


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
