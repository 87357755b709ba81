"""A flag value no run could use is refused in one line naming the flag the user typed (`--val-fraction`,
not the library's `val_fraction`), before any corpus, tokenizer or model is loaded."""
from pathlib import Path

import pytest

from heron.cli.main import main
from heron.cli.options import RECIPES_DIR
from heron.interpret import explain as explain_module
from heron.tokenizer import load_tokenizer
from heron.train.checkpoint import save_model_folder


@pytest.fixture
def checkpoint(code_model, tmp_path: Path) -> Path:
    """A checkpoint folder of code_model's model and its 300-token tokenizer."""
    model, tokenizer, _ = code_model()
    return save_model_folder(tmp_path / "ckpt", model, tokenizer=tokenizer)


@pytest.mark.parametrize("value, complaint", [("1.5", "must be in [0, 1), got 1.5"),
                                              ("-0.1", "must be in [0, 1), got -0.1"),
                                              ("1", "must be in [0, 1), got 1"),
                                              ("nan", "must be a finite number, got 'nan'")])
def test_data_prepare_refuses_a_val_fraction_outside_0_1_by_its_flag(checkpoint, tmp_path: Path, capsys, value,
                                                                     complaint) -> None:
    """It reached the library, which said `val_fraction must be in [0, 1), got 1.5` once the tokenizer was loaded."""
    argv = ["data", "prepare", str(tmp_path / "corpus"), "--tokenizer", str(checkpoint / "tokenizer.json"),
            "--out", str(tmp_path / "shards2"), "--val-fraction", value]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(f"heron data prepare: error: argument --val-fraction: {complaint}\n")
    assert not (tmp_path / "shards2").exists()


def test_tokenizer_train_refuses_a_vocabulary_below_the_bytes_and_specials(tmp_path: Path, capsys) -> None:
    """The library's `vocab_size must be at least 263 ...` named its keyword."""
    (tmp_path / "a.txt").write_text("some text\n")
    assert main(["tokenizer", "train", str(tmp_path / "a.txt"), "--vocab-size", "100",
                 "--out", str(tmp_path / "tok.json")]) == 2
    assert capsys.readouterr().err == ("heron tokenizer: error: --vocab-size: at least 263 (256 bytes + 7 special "
                                       "tokens), got 100\n")
    assert not (tmp_path / "tok.json").exists()


@pytest.mark.parametrize("flags, complaint", [
    (["--top-p", "2"], "--top-p: must be in (0, 1], got 2.0"),
    (["--temperature", "-1"], "--temperature: must be >= 0 (0 = greedy), got -1.0"),
    (["--watermark-key", "k", "--watermark-gamma", "1.5"],
     "--watermark-gamma: the green fraction must lie in (0, 1), got 1.5"),
    (["--system", "Be brief."], "--system: a system turn belongs to a chat; add --chat"),
])
def test_generate_checks_its_flags_before_loading_the_model(tmp_path: Path, capsys, flags, complaint) -> None:
    """A checkpoint that is not there: the flags' error comes first, as argparse's own would (they were
    checked only after the model had loaded)."""
    assert main(["generate", str(tmp_path / "no-checkpoint"), "--prompt", "def ", *flags]) == 2
    assert capsys.readouterr().err == f"heron generate: error: {complaint}\n"


def test_a_watermark_gamma_that_leaves_no_token_green_is_named_before_sampling(checkpoint, capsys) -> None:
    """γ of the model's vocabulary: the library's `gamma: ...` came from the first sampling step."""
    argv = ["generate", str(checkpoint), "--prompt", "def ", "--watermark-key", "k", "--watermark-gamma", "0.0001"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("heron generate: error: --watermark-gamma: 0.0001 of a 300-token vocabulary gives "
                                 "0 green tokens; need at least 1 and fewer than all\n")


@pytest.mark.parametrize("flags, complaint", [
    (["--gamma", "1.5"], "--gamma: the green fraction must lie in (0, 1), got 1.5"),
    (["--gamma", "nan"], "--gamma: expected a finite number, got nan"),
    (["--gamma", "0.0001"], "--gamma: 0.0001 of a 300-token vocabulary gives 0 green tokens; need at least 1 and "
                            "fewer than all"),
])
def test_watermark_detect_names_its_gamma_flag(checkpoint, capsys, flags, complaint) -> None:
    """The Watermark's own `gamma: ...` named no flag."""
    assert main(["watermark", "detect", "x y", "--tokenizer", str(checkpoint), "--key", "k", *flags]) == 2
    assert capsys.readouterr().err == f"heron watermark: error: {complaint}\n"


def test_watermark_detect_checks_its_flags_before_loading_the_tokenizer(tmp_path: Path, capsys) -> None:
    argv = ["watermark", "detect", "x y", "--tokenizer", str(tmp_path / "none.json"), "--key", ""]
    assert main(argv) == 2
    assert capsys.readouterr().err == "heron watermark: error: --key: must not be empty\n"


@pytest.mark.parametrize("flags, complaint", [
    (["--alpha", "2"], "--alpha: must be in [0, 1], got 2.0"),
    (["--temperature", "0"], "--temperature: must be > 0, got 0.0"),
    (["--hidden-weight", "-1"], "--hidden-weight: must be a number >= 0, got -1.0"),
    (["--hidden-layers", "0"], "--hidden-layers: matches hidden states, which --hidden-weight 0 (the default) "
                               "leaves out; add --hidden-weight above 0"),
])
def test_distill_checks_its_flags_before_loading_the_teacher(tmp_path: Path, capsys, flags, complaint) -> None:
    """A teacher that is not there: distill() checked these only once it had loaded the teacher and the data."""
    assert main(["compress", "distill", str(tmp_path / "no-teacher"), "test", *flags]) == 2
    assert capsys.readouterr().err == f"heron compress: error: {complaint}\n"


def test_explain_names_a_prompt_of_no_tokens_by_its_flag(checkpoint, tmp_path: Path, capsys) -> None:
    assert main(["explain", str(checkpoint), "--prompt", "", "--out", str(tmp_path / "report")]) == 2
    assert capsys.readouterr().err == "heron explain: error: --prompt: '' encodes to no tokens\n"
    assert not (tmp_path / "report").exists()


def test_prune_without_a_pruning_flag_offers_the_flags(tmp_path: Path, capsys) -> None:
    """PruneSettings said `--sparsity: nothing to prune; give sparsity, nm, mlp_channels, heads or experts`: its
    fields, under a flag not given. Before the checkpoint (not there) is read."""
    assert main(["compress", "prune", str(tmp_path / "no-checkpoint"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("heron compress: error: nothing to prune; give --sparsity, --nm, --mlp-channels, "
                                       "--heads or --experts\n")
    assert not (tmp_path / "out").exists()


def test_prune_given_both_sparsity_and_nm_shows_them_as_typed(tmp_path: Path, capsys) -> None:
    """The library's `nm=(2, 4)` came out as `--nm (2, 4)`, a tuple where 2:4 was typed."""
    assert main(["compress", "prune", str(tmp_path / "no-checkpoint"), str(tmp_path / "out"),
                 "--sparsity", "0.5", "--nm", "2:4"]) == 2
    assert capsys.readouterr().err == ("heron compress: error: give exactly one of --sparsity or --nm, "
                                       "got --sparsity 0.5 and --nm 2:4\n")


@pytest.mark.parametrize("flags, needs", [
    (["--experts", "3"], "--experts 3"),
    (["--sparsity", "0.5"], "--method wanda"),
    (["--nm", "2:4", "--experts", "2"], "--method wanda and --experts 2"),
    (["--method", "magnitude", "--sparsity", "0.5", "--recover-steps", "2"], "--recover-steps 2"),
])
def test_prune_names_what_needs_calib_shards_by_its_flags(tmp_path: Path, capsys, flags, needs) -> None:
    """PruneSettings said `... needed for experts=3, got None`."""
    assert main(["compress", "prune", str(tmp_path / "no-checkpoint"), str(tmp_path / "out"), *flags]) == 2
    assert capsys.readouterr().err == ("heron compress: error: --calib-shards: a shard folder of calibration windows "
                                       f"is needed for {needs}\n")


def test_a_bad_set_value_is_named_as_the_set_the_user_typed(tmp_path: Path, capsys) -> None:
    """pydantic's `train.steps: Input should be greater than 0 (got -1)` named no --set; a recipe file's own bad
    field keeps its name, on the line of its own next to the --set's."""
    assert main(["train", "test", "--set", "train.steps=-1"]) == 2
    assert capsys.readouterr().err == "heron train: error: --set train.steps=-1: must be greater than 0\n"
    recipe = tmp_path / "bad.yaml"
    recipe.write_text((RECIPES_DIR / "test.yaml").read_text().replace("steps: 100", "steps: -1"))
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err == "heron train: error: train.steps: Input should be greater than 0 (got -1)\n"
    assert main(["train", str(recipe), "--set", "data.seq_len=0"]) == 2
    assert capsys.readouterr().err == ("heron train: error: --set data.seq_len=0: must be greater than 0\n"
                                       "train.steps: Input should be greater than 0 (got -1)\n")


def test_explain_refuses_a_target_of_two_tokens_before_the_model_runs(checkpoint, tmp_path: Path, capsys,
                                                                        monkeypatch) -> None:
    """It was refused while the report was written, after the forward pass and its cache."""
    def ran(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(explain_module, "run_with_cache", ran)
    n_tokens = len(load_tokenizer(checkpoint).encode("two tokens"))
    argv = ["explain", str(checkpoint), "--prompt", "def ", "--target", "two tokens", "--out", str(tmp_path / "report")]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"heron explain: error: --target: 'two tokens' is {n_tokens} tokens; give text "
                                       "that is exactly one token\n")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("argv, option", [(["compress", "prune", "a", "b", "--nm", "-1:4"], "--nm"),
                                          (["generate", "a", "--prompt", "x", "--stop", "---"], "--stop")])
def test_a_value_that_begins_with_a_dash_gets_a_hint(argv: list[str], option: str, capsys) -> None:
    """argparse reads "-1:4" and "---" as options and said only "expected one argument"."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: argument {option}: expected one argument (if its value begins "
                                            f"with '-', join the two with '=': {option}=VALUE)\n")
