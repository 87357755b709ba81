"""The CLI end to end on a generated corpus: tokenizer, shards, training,
generation and evaluation, each through `heron <verb>`."""
from pathlib import Path

import pytest

from heron.cli.main import main

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


def test_tokenizer_data_train_generate_eval(corpus: Path, tmp_path: Path, capsys) -> None:
    tok, shards, run = tmp_path / "tok.json", tmp_path / "shards", tmp_path / "run"
    assert main(["tokenizer", "train", str(corpus), "--ext", ".py", "--vocab-size", "300", "--out", str(tok)]) == 0
    assert tok.is_file()
    assert main(["data", "prepare", str(corpus), "--ext", ".py", "--tokenizer", str(tok), "--out", str(shards)]) == 0
    assert main(["train", "test", "--set", f"out_dir={run}", "--set", f"data.shards={shards}",
                 "--set", f"data.tokenizer={tok}", "--set", "data.synthetic=null", "--set", "train.steps=30",
                 "--set", "schedule.warmup_steps=5", "--set", "train.eval_every=10", "--set", "train.progress=false"]) == 0
    checkpoint = run / "checkpoints" / "latest"
    assert (checkpoint / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["generate", str(checkpoint), "--prompt", "def ", "--max-new-tokens", "6", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["eval", str(checkpoint), "--shards", str(shards), "--seq-len", "32", "--batch-size", "2"]) == 0
    ppl = float(capsys.readouterr().out.strip().rsplit(" ", 1)[-1])
    # 40 near-identical files: 30 steps take the model far below chance (300).
    assert 1.0 < ppl < 30


def test_bad_recipe_field_is_named_and_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["train", "test", "--set", "train.stepz=3", "--set", f"out_dir={tmp_path}"]) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_unknown_recipe_lists_the_shipped_ones(capsys) -> None:
    assert main(["train", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert "no-such-recipe" in err and "tiny" in err


def test_generate_from_a_missing_checkpoint_fails_clearly(tmp_path: Path, capsys) -> None:
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope" in capsys.readouterr().err
