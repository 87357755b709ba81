"""`heron tokenizer train --out` checks its target before training: it replaces a Heron tokenizer,
never another file nor a model's own tokenizer.json."""
from pathlib import Path

import pytest

from heron.cli.main import main


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        (folder / f"f{i}.txt").write_text("the cat sat on the mat\n" * 20 + f"def f{i}(): return {i}\n")
    return folder


def train_into(corpus: Path, out: Path) -> int:
    return main(["tokenizer", "train", str(corpus), "--vocab-size", "280", "--out", str(out)])


def test_a_heron_tokenizer_is_replaced(corpus: Path, tmp_path: Path) -> None:
    assert train_into(corpus, tmp_path / "tok.json") == 0
    assert train_into(corpus, tmp_path / "tok.json") == 0
    assert train_into(corpus, tmp_path / "tok") == 0 and train_into(corpus, tmp_path / "tok") == 0


@pytest.mark.parametrize("name, text", [("settings.json", '{"my": "settings"}\n'),
                                        ("tokenizer.json", '{"model": {"type": "WordPiece"}}\n')])
def test_another_json_file_is_refused_before_training(corpus: Path, tmp_path: Path, capsys, name, text) -> None:
    target = tmp_path / name
    target.write_text(text)
    assert train_into(corpus, target) == 2
    out, err = capsys.readouterr()
    assert err == f"heron tokenizer: error: {target}: exists and is not a Heron tokenizer; write to a new file " \
                  "(only a Heron tokenizer is replaced)\n"
    assert "training" not in out and target.read_text() == text


@pytest.mark.parametrize("marker", ["lineage.json", "config.json"])
def test_a_model_folder_keeps_its_own_tokenizer(corpus: Path, tmp_path: Path, capsys, marker) -> None:
    assert train_into(corpus, tmp_path / "first") == 0
    model = tmp_path / "ck"
    model.mkdir()
    (model / marker).write_text("{}")
    (model / "tokenizer.json").write_bytes((tmp_path / "first" / "tokenizer.json").read_bytes())
    before = (model / "tokenizer.json").read_bytes()
    capsys.readouterr()
    for out in (model, model / "tokenizer.json"):
        assert train_into(corpus, out) == 2
        assert f"{model}: holds a model ({marker}), whose tokenizer.json is its own" in capsys.readouterr().err
    assert (model / "tokenizer.json").read_bytes() == before
    assert train_into(corpus, model / "another.json") == 0  # a file of another name is no file of the model's
    assert (model / "tokenizer.json").read_bytes() == before


def test_an_existing_file_that_is_not_a_folder_is_named(corpus: Path, tmp_path: Path, capsys) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert train_into(corpus, notes) == 2
    assert capsys.readouterr().err == (f"heron tokenizer: error: {notes}: exists and is not a folder; give a folder "
                                       "or a .json file\n")
    assert notes.read_text() == "mine"


def test_a_shard_folder_keeps_the_tokenizer_its_shards_were_made_with(corpus: Path, tmp_path: Path, capsys) -> None:
    """The README's own-corpus steps write the tokenizer into the shard folder; training another one into it
    afterwards would leave shards whose ids no longer match it, which training then refuses."""
    shards = tmp_path / "data"
    assert train_into(corpus, shards / "tokenizer.json") == 0
    assert main(["data", "prepare", str(corpus), "--tokenizer", str(shards / "tokenizer.json"),
                 "--out", str(shards)]) == 0
    before = (shards / "tokenizer.json").read_bytes()
    capsys.readouterr()
    for out in (shards, shards / "tokenizer.json"):
        assert train_into(corpus, out) == 2
        assert f"{shards}: holds shards (meta.json) made with its tokenizer.json" in capsys.readouterr().err
    assert (shards / "tokenizer.json").read_bytes() == before
    assert train_into(corpus, shards / "another.json") == 0  # another name leaves the shards' tokenizer alone
