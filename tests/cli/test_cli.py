"""The CLI end to end on a generated corpus: tokenizer, shards, training,
generation and evaluation, each through `heron <verb>`."""
import io
import re
from pathlib import Path

import pytest
import torch

from heron.cli.commands import sampling_params
from heron.cli.main import build_parser, main
from heron.tokenizer import HeronTokenizer

CODE = '''def add_{i}(a, b):
    """Return the sum of a and b."""
    return a + b + {i}


class Counter{i}:
    def __init__(self):
        self.count = {i}
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (folder / f"mod_{i}.py").write_text(CODE.format(i=i))
    (folder / "notes.txt").write_text("not python")
    return folder


def tokenizer_shards_and_checkpoint(corpus: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(shards, checkpoint) made by `heron tokenizer train`, `data prepare` and `train`."""
    tok, shards, run = tmp_path / "tok.json", tmp_path / "shards", tmp_path / "run"
    assert main(["tokenizer", "train", str(corpus), "--ext", ".py", "--vocab-size", "300", "--out", str(tok)]) == 0
    assert tok.is_file()
    assert main(["data", "prepare", str(corpus), "--ext", ".py", "--tokenizer", str(tok), "--out", str(shards)]) == 0
    assert main(["train", "test", "--set", f"out_dir={run}", "--set", f"data.shards={shards}",
                 "--set", f"data.tokenizer={tok}", "--set", "data.synthetic=null", "--set", "train.steps=30",
                 "--set", "schedule.warmup_steps=5", "--set", "train.eval_every=10", "--set", "train.progress=false",
                 "--set", "train.device=cpu"]) == 0
    checkpoint = run / "checkpoints" / "latest"
    assert (checkpoint / "tokenizer.json").is_file()
    return shards, checkpoint


def generated_and_perplexity(shards: Path, checkpoint: Path, device: str, capsys) -> tuple[str, float]:
    capsys.readouterr()
    assert main(["generate", str(checkpoint), "--prompt", "def ", "--max-new-tokens", "6", "--temperature", "0",
                 "--device", device]) == 0
    text = capsys.readouterr().out
    assert main(["eval", str(checkpoint), "--shards", str(shards), "--seq-len", "32", "--batch-size", "2",
                 "--device", device]) == 0
    return text, float(capsys.readouterr().out.strip().rsplit(" ", 1)[-1])


def test_tokenizer_data_train_generate_eval(corpus: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    shards, checkpoint = tokenizer_shards_and_checkpoint(corpus, tmp_path)
    capsys.readouterr()
    assert main(["data", "prepare", str(corpus), "--ext", ".py", "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(shards)]) == 0
    assert "; reused: the corpus and tokenizer are those that made them" in capsys.readouterr().out
    assert main(["generate", str(checkpoint), "--prompt", "def ", "--max-new-tokens", "6", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["generate", str(checkpoint), "--prompt", "def ", "--prompt", "class ", "--no-stream",
                 "--max-new-tokens", "4"]) == 0
    first, second = capsys.readouterr().out.split("\n" + "-" * 40 + "\n")  # a rule between completions only
    assert first.startswith("def ") and second.startswith("class ") and not second.rstrip("\n").endswith("-")
    # The test preset's context is 64 tokens: the default of 128 new tokens shrinks to fit; asking for it fails
    # before the prompt is echoed.
    assert main(["generate", str(checkpoint), "--prompt", "def ", "--seed", "0", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    for flag, value in (("--top-p", "0"), ("--temperature", "-1"), ("--repetition-penalty", "0")):
        assert main(["generate", str(checkpoint), "--prompt", "def ", flag, value]) == 2
        assert f"heron generate: error: {flag}: must be" in capsys.readouterr().err  # the flag, not top_p
    prompt_len = len(HeronTokenizer.load(tmp_path / "tok.json").encode("def "))
    assert main(["generate", str(checkpoint), "--prompt", "def ", "--max-new-tokens", "128"]) == 2
    out, err = capsys.readouterr()
    room = 64 + 1 - prompt_len  # the last new token is never fed back through the 64-token context
    assert out == "" and (f"heron generate: error: --max-new-tokens: at most {room} after a {prompt_len}-token "
                          "prompt (the model's context is 64 tokens), got 128") in err
    assert main(["generate", str(checkpoint), "--prompt", "def ", "--max-new-tokens", str(room), "--no-stream"]) == 0
    capsys.readouterr()
    for given in ([], ["--max-new-tokens", "3"]):  # too long a prompt is the prompt's fault, not --max-new-tokens'
        assert main(["generate", str(checkpoint), "--prompt", "def f(): pass\n" * 40, *given]) == 2
        err = capsys.readouterr().err
        assert "heron generate: error: prompt: " in err and "more than the model's context of 64; shorten it" in err
    # --chat builds the template's control tokens itself: the prompt text alone cannot (see test_engine).
    assert main(["generate", str(checkpoint), "--chat", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("<|bos|><|user|>\nhi<|end|>\n<|assistant|>\n")
    assert main(["generate", str(checkpoint), "--chat", "--system", "Be brief.", "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n")
    assert main(["generate", str(checkpoint), "--system", "Be brief.", "--prompt", "hi"]) == 2
    assert "--system: a system turn belongs to a chat; add --chat" in capsys.readouterr().err
    assert main(["eval", str(checkpoint), "--shards", str(shards), "--seq-len", "65"]) == 2
    assert "heron eval: error: --seq-len: at most the model's max_seq_len 64, got 65" in capsys.readouterr().err
    text, ppl = generated_and_perplexity(shards, checkpoint, "cpu", capsys)
    assert text.startswith("def ")
    # A prompt piped in (`echo "def " | heron generate ...`) loses the newline echo adds: the same text.
    monkeypatch.setattr("sys.stdin", io.StringIO("def \n"))
    assert main(["generate", str(checkpoint), "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == text
    # 40 near-identical files: 30 steps take the model far below chance (300).
    assert 1.0 < ppl < 30


def test_shards_of_another_tokenizer_are_refused_even_at_the_same_vocabulary_size(corpus: Path, tmp_path: Path,
                                                                                 capsys) -> None:
    shards, checkpoint = tokenizer_shards_and_checkpoint(corpus, tmp_path)
    other_corpus = tmp_path / "other"
    other_corpus.mkdir()
    for i in range(40):
        (other_corpus / f"t_{i}.py").write_text(f"while x_{i} > 0:\n    x_{i} -= {i} * y\n" * 3)
    tok, other = tmp_path / "other.json", tmp_path / "other-shards"
    assert main(["tokenizer", "train", str(other_corpus), "--vocab-size", "300", "--out", str(tok)]) == 0
    assert main(["data", "prepare", str(other_corpus), "--tokenizer", str(tok), "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--shards", str(other)]) == 2
    assert f"{other}: made with another tokenizer than {checkpoint}'s" in capsys.readouterr().err
    assert main(["compress", "quantize", str(checkpoint), str(tmp_path / "q"), "--method", "gptq",
                 "--calib-shards", str(other)]) == 2
    assert "made with another tokenizer" in capsys.readouterr().err and not (tmp_path / "q").exists()
    assert main(["compress", "quantize", str(checkpoint), str(tmp_path / "q8")]) == 0
    assert main(["compress", "prune", str(tmp_path / "q8"), str(tmp_path / "p"), "--sparsity", "0.5",
                 "--method", "magnitude"]) == 2
    assert "q8: quantised; prune the full-precision model, then quantise the pruned one" in capsys.readouterr().err
    assert main(["convert", "to-hf", str(tmp_path / "q8"), str(tmp_path / "hf")]) == 2
    assert "q8: quantised; Hugging Face folders hold full-precision weights" in capsys.readouterr().err
    one_file = tmp_path / "one"
    one_file.mkdir()
    (one_file / "a.py").write_text((corpus / "mod_0.py").read_text())
    assert main(["data", "prepare", str(one_file), "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(tmp_path / "one-shards")]) == 0
    assert "heron data: warning: the validation split is empty: training needs both, `heron eval` the validation one" \
        in capsys.readouterr().err
    assert main(["eval", str(checkpoint), "--shards", str(tmp_path / "one-shards")]) == 2
    assert "one-shards: the validation split holds 0 tokens; nothing to score" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_and_eval_on_the_gpu_equal_the_cpu(corpus: Path, tmp_path: Path, capsys) -> None:
    shards, checkpoint = tokenizer_shards_and_checkpoint(corpus, tmp_path)
    on_cpu, on_gpu = (generated_and_perplexity(shards, checkpoint, device, capsys) for device in ("cpu", "cuda"))
    assert on_gpu[0] == on_cpu[0]  # greedy
    assert on_gpu[1] == pytest.approx(on_cpu[1], rel=1e-4)


@pytest.mark.parametrize("device, complaint", [
    ("tpu", "'tpu' is not a device"),
    ("cuda:99", "'cuda:99': torch sees"),
    *([] if torch.cuda.is_available() else [("cuda", "'cuda': torch sees no CUDA device")]),
])
def test_a_device_torch_cannot_use_is_refused_before_loading(tmp_path: Path, capsys, device, complaint) -> None:
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x", "--device", device]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and complaint in err and "nope" not in err


def test_bad_recipe_field_is_named_and_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["train", "test", "--set", "train.stepz=3", "--set", f"out_dir={tmp_path}"]) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_a_diverging_run_exits_2_naming_the_step(tmp_path: Path, capsys) -> None:
    assert main(["train", "test", "--set", "optim.lr=1e39", "--set", "train.steps=3", "--set", "train.progress=false",
                 "--set", "schedule.warmup_steps=0", "--set", f"out_dir={tmp_path}", "--set", "train.device=cpu"]) == 2
    assert re.search(r"heron train: error: step \d+: .*(is (nan|inf)|NaN or infinite).*lower the learning rate", capsys.readouterr().err)


def test_a_warning_prints_as_one_line_naming_the_verb(tmp_path: Path, capsys) -> None:
    assert main(["train", "test", "--set", "train.steps=2", "--set", "train.progress=false",
                 "--set", f"out_dir={tmp_path}", "--set", "train.device=cpu"]) == 0
    assert ("heron train: warning: schedule.warmup_steps 10 is not below train.steps 2: the learning rate climbs "
            "for the whole run and never reaches optim.lr 0.003\n") in capsys.readouterr().err


def test_tokenizer_train_says_what_it_skipped_and_what_it_could_not_reach(tmp_path: Path, capsys) -> None:
    latin = tmp_path / "latin"
    latin.mkdir()
    for i in range(3):
        (latin / f"f{i}.txt").write_bytes(f"café {i}".encode("latin-1"))
    assert main(["tokenizer", "train", str(latin), "--vocab-size", "300", "--out", str(tmp_path / "t.json")]) == 2
    assert "no file of the corpus is UTF-8 text: all 3 were skipped" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()
    (latin / "ok.py").write_text("def f(x):\n    return x + 1\n" * 20)
    assert main(["tokenizer", "train", str(latin), "--vocab-size", "5000", "--out", str(tmp_path / "t.json")]) == 0
    err = capsys.readouterr().err
    assert "warning: skipped 3 undecodable (non-UTF-8) files" in err and "not the 5000 asked for" in err


def test_unknown_recipe_lists_the_shipped_ones(capsys) -> None:
    assert main(["train", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert "no-such-recipe" in err and "tiny" in err


def test_generate_from_a_missing_checkpoint_fails_clearly(tmp_path: Path, capsys) -> None:
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope" in capsys.readouterr().err


def test_the_demo_takes_no_resume_as_fresh_as_trainings_warnings_suggest() -> None:
    # train's "nothing to train" warning, shown by a demo rerun, names --no-resume
    assert build_parser().parse_args(["demo", "--no-resume"]).fresh
    assert build_parser().parse_args(["demo", "--fresh"]).fresh
    assert not build_parser().parse_args(["demo"]).fresh


@pytest.mark.parametrize("flags, complaint", [
    (["--watermark-gamma", "1.5"], "--watermark-gamma: the green fraction must lie in (0, 1), got 1.5"),
    (["--watermark-key", ""], "--watermark-key: must not be empty"),
    (["--watermark-delta", "nan"], "--watermark-delta: expected a finite number, got nan"),
])
def test_a_bad_watermark_setting_is_named_by_its_flag(flags, complaint) -> None:
    args = build_parser().parse_args(["generate", "ckpt", "--watermark-key", "k", *flags])
    with pytest.raises(ValueError) as caught:
        sampling_params(args)
    assert str(caught.value) == complaint  # not the Watermark's field (gamma, key, delta)


@pytest.mark.parametrize("argv, flag", [
    (["generate", "ckpt", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "ckpt", "--shards", "s", "--batch-size", "-2"], "--batch-size"),
    (["explain", "ckpt", "--prompt", "p", "--out", "o", "--ig-steps", "0"], "--ig-steps"),
    (["compress", "report", "ckpt", "--shards", "s", "--out", "o", "--new-tokens", "0"], "--new-tokens"),
])
def test_a_count_below_one_is_refused_by_its_flag(argv, flag, capsys) -> None:
    with pytest.raises(SystemExit):
        main(argv)
    assert f"argument {flag}: must be above 0, got" in capsys.readouterr().err



def test_a_database_another_process_holds_is_one_line_not_a_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    """Two `heron feedback import`s at once: the one SQLite makes wait too long says so in one line."""
    import sqlite3

    import sqlalchemy as sa

    from heron.store.feedback import FeedbackStore

    def locked(*args, **kwargs):
        raise sa.exc.OperationalError("INSERT INTO ...", {}, sqlite3.OperationalError("database is locked"))

    (tmp_path / "in.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    monkeypatch.setattr(FeedbackStore, "import_rows", locked)
    assert main(["feedback", "import", str(tmp_path / "in.jsonl"), "--db", str(tmp_path / "fb.db"),
                 "--annotator", "a"]) == 2
    assert "heron feedback: error: the database is busy" in capsys.readouterr().err


def test_ctrl_c_while_the_verbs_load_is_one_line(capsys, monkeypatch) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("heron.cli.main.build_parser", interrupted)
    assert main(["--help"]) == 130
    assert capsys.readouterr().err == "heron: interrupted\n"
