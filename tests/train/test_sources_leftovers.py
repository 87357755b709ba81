"""What a killed automatic data preparation leaves: the next `heron train` redoes it, and reuses
a tokenizer it trained only for the same request, so meta.json names the tokenizer in use."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from heron.cli.main import main
from heron.data import Corpus
from heron.data import corpus as corpus_module
from heron.tokenizer import load_tokenizer, train_tokenizer
from heron.train import sources
from heron.train.recipe import DataSection, recipe_from_dict
from heron.train.sources import resolve_data
from train_helpers import SMALL_MODEL

_REPLACE = os.replace  # the real one, before any test patches it


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even `except Exception` handlers."""


def killed_moving(name: str):
    """An os.replace that is killed (raises Killed) when it would move a file named `name` into place."""
    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise Killed
        return _REPLACE(src, dst, *args, **kwargs)
    return replace


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Varied enough that the BPE reaches 300 tokens: a 300- and a 280-token tokenizer differ."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {i * j} + {j}\n"
                                                 for j in range(40)))
    return folder


def section(tmp_path: Path, corpus: Path, vocab_size: int) -> DataSection:
    raw = {"out_dir": str(tmp_path / "run"), "model": {"preset": "test", "overrides": SMALL_MODEL},
           "data": {"shards": str(tmp_path / "shards"), "corpus": [str(corpus)], "vocab_size": vocab_size,
                    "seq_len": 16}}
    return recipe_from_dict(raw, world_size=1).data


def test_a_tokenizer_left_by_a_killed_preparation_is_reused_only_for_the_same_request(tmp_path, corpus,
                                                                                      monkeypatch) -> None:
    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:  # killed after training its tokenizer, before the shards
        patch.setattr(sources, "prepare_shards", killed)
        with pytest.raises(Killed):
            resolve_data(section(tmp_path, corpus, 300))
    data = resolve_data(section(tmp_path, corpus, 280))
    expected = train_tokenizer(Corpus([corpus]), 280, progress=False)
    assert data.tokenizer.fingerprint() == expected.fingerprint() == data.meta["tokenizer_sha256"]
    assert data.vocab_size == data.meta["tokenizer_vocab_requested"] == 280
    assert load_tokenizer(tmp_path / "shards").fingerprint() == expected.fingerprint()
    assert not list((tmp_path / "shards").glob(".tokenizer-*"))  # the kept tokenizers go once the shards are in


def test_the_same_request_after_a_kill_skips_training_the_tokenizer_again(tmp_path, corpus, monkeypatch) -> None:
    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(sources, "prepare_shards", killed)
        with pytest.raises(Killed):
            resolve_data(section(tmp_path, corpus, 300))
    trained = []
    monkeypatch.setattr(sources, "train_tokenizer", lambda *args, **kwargs: trained.append(args))
    assert resolve_data(section(tmp_path, corpus, 300)).meta["tokenizer_vocab_requested"] == 300
    assert trained == []


def test_a_preparation_killed_while_installing_its_shards_is_redone(tmp_path, corpus, monkeypatch) -> None:
    """prepare_shards' install removes meta.json, then moves shards and tokenizer in: killed before
    meta.json is back, the folder holds shard files and a tokenizer.json of an unknown request."""
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_moving("meta.json"))
        with pytest.raises(Killed):
            resolve_data(section(tmp_path, corpus, 300))
    assert (tmp_path / "shards" / "train_000000.bin").is_file() and not (tmp_path / "shards" / "meta.json").exists()
    data = resolve_data(section(tmp_path, corpus, 280))
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["tokenizer_vocab_requested"] == meta["vocab_size"] == data.vocab_size == 280
    assert data.tokenizer.fingerprint() == meta["tokenizer_sha256"]
    assert len(data.train) == meta["train"]["tokens"] > 0


def test_a_users_own_tokenizer_in_the_shard_folder_is_used_not_replaced(tmp_path, corpus) -> None:
    """DataSection: the tokenizer defaults to <shards>/tokenizer.json (the README trains one there first);
    with no shard files beside it, no killed install left it, so the shards are made with it."""
    mine = train_tokenizer(Corpus([corpus]), 280, progress=False)
    mine.save(tmp_path / "shards")
    saved = (tmp_path / "shards" / "tokenizer.json").read_bytes()
    data = resolve_data(section(tmp_path, corpus, 300))
    assert (tmp_path / "shards" / "tokenizer.json").read_bytes() == saved
    assert data.tokenizer.fingerprint() == mine.fingerprint() == data.meta["tokenizer_sha256"]
    assert "tokenizer_vocab_requested" not in data.meta  # as for a tokenizer the recipe names


def test_a_tokenizer_an_older_heron_kept_under_another_text_rule_is_trained_again(tmp_path, corpus,
                                                                                 monkeypatch) -> None:
    """An older Heron read "\\r\\n" as "\\n" (read_text) and kept its tokenizer as .tokenizer-{vocab}-{corpus}.json:
    the corpus's bytes, hence that name, are unchanged, but the text it learnt from is not the text read now."""
    for i in range(12):
        (corpus / f"m{i}.py").write_bytes((corpus / f"m{i}.py").read_bytes().replace(b"\n", b"\r\n"))
    with monkeypatch.context() as patch:  # the older Heron's reading
        patch.setattr(corpus_module, "_read_text", lambda path: path.read_text(encoding="utf-8-sig"))
        older = train_tokenizer(Corpus([corpus]), 300, progress=False)
    (tmp_path / "shards").mkdir()
    older.save(tmp_path / "shards" / f".tokenizer-300-{Corpus([corpus]).fingerprint()[:16]}.json")
    data = resolve_data(section(tmp_path, corpus, 300))
    expected = train_tokenizer(Corpus([corpus]), 300, progress=False)
    assert expected.fingerprint() != older.fingerprint()  # "\r\n" is text the older one never saw
    assert data.tokenizer.fingerprint() == expected.fingerprint() == data.meta["tokenizer_sha256"]
    assert not list((tmp_path / "shards").glob(".tokenizer-*"))  # the older Heron's kept one goes too


def test_a_rerun_killed_before_its_shards_are_in_leaves_no_tokenizer_that_reads_as_the_users(tmp_path, corpus,
                                                                                           monkeypatch) -> None:
    """A kill in a rerun's install, before its first shard is moved in, must not leave the killed
    preparation's tokenizer.json alone in the folder: the next run would take it for the user's own,
    make the shards with it and record no request (a 300-token tokenizer for a recipe asking 280)."""
    for vocab_size, killed_at in ((300, "meta.json"), (280, "train_000000.bin")):
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", killed_moving(killed_at))
            with pytest.raises(Killed):
                resolve_data(section(tmp_path, corpus, vocab_size))
    assert any(sources.is_shard_file(p.name) for p in (tmp_path / "shards").iterdir())
    data = resolve_data(section(tmp_path, corpus, 280))
    expected = train_tokenizer(Corpus([corpus]), 280, progress=False)
    assert data.tokenizer.fingerprint() == expected.fingerprint() == data.meta["tokenizer_sha256"]
    assert data.vocab_size == data.meta["tokenizer_vocab_requested"] == 280


@pytest.mark.parametrize("named", [False, True])
def test_a_users_tokenizer_in_the_shard_folder_survives_a_kill_in_the_install(tmp_path, corpus, monkeypatch,
                                                                              named) -> None:
    """Killed after the shards are moved in, before meta.json: the user's tokenizer.json then lies beside
    shard files, as a killed install of Heron's own would leave it. The rerun (data.tokenizer unset) must
    still take it for the user's (a hidden mark names it) and make the shards with it, not train one over
    it; so too when the killed run's data.tokenizer named that file. The mark stays, for the runs after."""
    mine = train_tokenizer(Corpus([corpus]), 280, progress=False)
    mine.save(tmp_path / "shards")
    saved = (tmp_path / "shards" / "tokenizer.json").read_bytes()
    first = section(tmp_path, corpus, 300)
    if named:
        first = first.model_copy(update={"tokenizer": str(tmp_path / "shards" / "tokenizer.json")})
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_moving("meta.json"))
        with pytest.raises(Killed):
            resolve_data(first)
    assert (tmp_path / "shards" / "train_000000.bin").is_file() and not (tmp_path / "shards" / "meta.json").exists()
    data = resolve_data(section(tmp_path, corpus, 300))
    assert (tmp_path / "shards" / "tokenizer.json").read_bytes() == saved
    assert data.tokenizer.fingerprint() == mine.fingerprint() == data.meta["tokenizer_sha256"]
    assert "tokenizer_vocab_requested" not in data.meta
    assert [p.name for p in (tmp_path / "shards").iterdir() if p.name.startswith(".")] == [".users-tokenizer"]
    assert (tmp_path / "shards" / ".users-tokenizer").read_text().strip() == mine.fingerprint()


def test_a_tokenizer_heron_installed_over_a_marked_users_one_does_not_read_as_the_users(tmp_path, corpus,
                                                                                      monkeypatch) -> None:
    """The mark names the user's tokenizer by fingerprint: the user deletes it after a kill, and a preparation
    of Heron's own (300 tokens) is killed in its install too. Its tokenizer.json, beside the old mark, is not the
    user's: the next run asking 280 trains one of 280, and the mark goes with the kept tokenizers."""
    train_tokenizer(Corpus([corpus]), 270, progress=False).save(tmp_path / "shards")
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_moving("meta.json"))
        with pytest.raises(Killed):
            resolve_data(section(tmp_path, corpus, 300))  # with the user's
        (tmp_path / "shards" / "tokenizer.json").unlink()
        with pytest.raises(Killed):
            resolve_data(section(tmp_path, corpus, 300))  # with one trained here
    assert load_tokenizer(tmp_path / "shards").vocab_size > 280
    data = resolve_data(section(tmp_path, corpus, 280))
    expected = train_tokenizer(Corpus([corpus]), 280, progress=False)
    assert data.tokenizer.fingerprint() == expected.fingerprint() == data.meta["tokenizer_sha256"]
    assert data.vocab_size == data.meta["tokenizer_vocab_requested"] == 280
    assert [p.name for p in (tmp_path / "shards").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("killed", [False, True])
def test_a_data_tokenizer_other_than_the_users_in_the_shard_folder_is_refused_not_installed_over_it(
        tmp_path, corpus, monkeypatch, killed) -> None:
    """The user's tokenizer.json in the shard folder (alone, or marked beside the shards of a preparation with
    it that was killed) and data.tokenizer naming another: the shards made with that one would install it over
    the user's, so the preparation is refused, naming both files, and the user's stays as it was."""
    mine = train_tokenizer(Corpus([corpus]), 280, progress=False)
    mine.save(tmp_path / "shards")
    saved = (tmp_path / "shards" / "tokenizer.json").read_bytes()
    if killed:
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", killed_moving("meta.json"))
            with pytest.raises(Killed):
                resolve_data(section(tmp_path, corpus, 300))  # with the user's
    train_tokenizer(Corpus([corpus]), 300, progress=False).save(tmp_path / "other.json")
    named = section(tmp_path, corpus, 300).model_copy(update={"tokenizer": str(tmp_path / "other.json")})
    with pytest.raises(FileExistsError) as caught:
        resolve_data(named)
    assert str(caught.value).startswith(f"{tmp_path / 'shards' / 'tokenizer.json'}: your own tokenizer, not "
                                        f"{tmp_path / 'other.json'}; ")
    assert (tmp_path / "shards" / "tokenizer.json").read_bytes() == saved


def test_a_users_tokenizer_survives_a_kill_in_heron_data_prepare_into_its_own_folder(tmp_path, corpus,
                                                                                    monkeypatch) -> None:
    """`heron data prepare SOURCES --tokenizer F/tokenizer.json --out F` killed in its install leaves shard files
    beside the user's tokenizer.json, as a killed install of Heron's own would: marked as the user's, a recipe on F
    (data.tokenizer unset, asking 300 tokens) makes the shards with it, not with a tokenizer trained over it."""
    mine = train_tokenizer(Corpus([corpus]), 280, progress=False)
    mine.save(tmp_path / "shards")
    saved = (tmp_path / "shards" / "tokenizer.json").read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_moving("meta.json"))
        with pytest.raises(Killed):
            main(["data", "prepare", str(corpus), "--tokenizer", str(tmp_path / "shards" / "tokenizer.json"),
                  "--out", str(tmp_path / "shards")])
    assert (tmp_path / "shards" / "train_000000.bin").is_file() and not (tmp_path / "shards" / "meta.json").exists()
    data = resolve_data(section(tmp_path, corpus, 300))
    assert (tmp_path / "shards" / "tokenizer.json").read_bytes() == saved
    assert data.tokenizer.fingerprint() == mine.fingerprint() == data.meta["tokenizer_sha256"]
