"""Data sources: real shards (prepared from a corpus on first use) and synthetic streams."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from heron.data import Corpus, prepare_shards
from heron.data import corpus as corpus_module
from heron.data.shards import TEXT_RULE
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from heron.cli.main import main
from heron.tokenizer import HeronTokenizer, PretrainedTokenizer, train_tokenizer
from heron.train import load_model_folder, train
from heron.train.recipe import DataSection, RecipeError, SyntheticData, recipe_from_dict
from heron.train.sources import resolve_data, synthetic_data
from train_helpers import SMALL_MODEL

CODE = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"m{i}.py").write_text(CODE.replace("add", f"add{i}") * 8)
    return folder


def shard_recipe(tmp_path: Path, corpus: Path, **train_section) -> dict:
    return {
        "out_dir": str(tmp_path / "run"),
        "model": {"preset": "test", "overrides": SMALL_MODEL},
        "data": {"shards": str(tmp_path / "shards"), "corpus": [str(corpus)], "vocab_size": 300, "seq_len": 16},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 0, "eval_batches": 1, "progress": False, **train_section},
    }


def test_prepares_shards_then_trains_and_ships_the_tokenizer(tmp_path: Path, corpus: Path) -> None:
    result = train(recipe_from_dict(shard_recipe(tmp_path, corpus), world_size=1))
    assert (tmp_path / "shards" / "meta.json").is_file() and (tmp_path / "shards" / "tokenizer.json").is_file()
    model, tokenizer = load_model_folder(result.out_dir)
    assert tokenizer is not None and model.config.vocab_size == tokenizer.vocab_size <= 300
    assert tokenizer.decode(tokenizer.encode(CODE)) == CODE
    lineage = (result.checkpoint / "lineage.json").read_text()
    assert "corpus_fingerprint" in lineage and "tokenizer_sha256" in lineage


def test_missing_shards_without_a_corpus_name_the_field(tmp_path: Path) -> None:
    raw = {"data": {"shards": str(tmp_path / "nowhere")}, "out_dir": str(tmp_path / "run"),
           "train": {"progress": False}}
    with pytest.raises(RecipeError, match="data.shards: no shard metadata"):
        train(recipe_from_dict(raw, world_size=1))


def test_synthetic_permutation_is_a_cycle() -> None:
    data = synthetic_data(SyntheticData(vocab_size=16, n_tokens=100, seed=3))
    successor = {int(a): int(b) for a, b in zip(data.train[:-1], data.train[1:])}
    assert len(successor) == 16 and sorted(successor.values()) == list(range(16))
    assert all(successor[int(a)] == int(b) for a, b in zip(data.val[:-1], data.val[1:]))
    assert np.array_equal(synthetic_data(SyntheticData(vocab_size=16, n_tokens=100, seed=3)).train, data.train)


def test_bf16_autocast_runs_and_keeps_fp32_weights(recipe_factory) -> None:
    result = train(recipe_factory(train={"steps": 2, "precision": "bf16"}))
    assert all(np.isfinite(result.losses))
    model, _ = load_model_folder(result.out_dir)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_shards_made_with_a_tokenizer_kept_elsewhere_ship_it(tmp_path: Path, corpus: Path) -> None:
    tokenizer = train_tokenizer(Corpus([corpus]), vocab_size=300, progress=False)
    tokenizer.save(tmp_path / "elsewhere" / "tokenizer.json")
    prepare_shards(Corpus([corpus]), HeronTokenizer.load(tmp_path / "elsewhere"), tmp_path / "shards", progress=False)
    raw = shard_recipe(tmp_path, corpus)
    del raw["data"]["corpus"]
    result = train(recipe_from_dict(raw, world_size=1))
    _, shipped = load_model_folder(result.out_dir)
    assert shipped is not None and shipped.fingerprint() == tokenizer.fingerprint()


def test_shards_without_their_tokenizer_fail_before_training(tmp_path: Path, corpus: Path) -> None:
    train(recipe_from_dict(shard_recipe(tmp_path, corpus), world_size=1))
    (tmp_path / "shards" / "tokenizer.json").unlink()
    raw = shard_recipe(tmp_path, corpus)
    raw["out_dir"] = str(tmp_path / "second")
    with pytest.raises(RecipeError, match="data.tokenizer: .* holds no tokenizer.json"):
        train(recipe_from_dict(raw, world_size=1))
    assert not (tmp_path / "second").exists()



def test_shards_of_another_corpus_or_vocabulary_are_refused_not_trained_on(tmp_path: Path, corpus: Path) -> None:
    """The lineage would otherwise name data.corpus and data.vocab_size the model never saw."""
    train(recipe_from_dict(shard_recipe(tmp_path, corpus), world_size=1))
    other = tmp_path / "other"
    other.mkdir()
    for i in range(12):
        (other / f"n{i}.py").write_text(CODE.replace("Point", f"Line{i}") * 5)
    raw = shard_recipe(tmp_path, other)
    raw["out_dir"] = str(tmp_path / "second")
    with pytest.raises(RecipeError, match=r"data.corpus: .*shards holds shards of another corpus .* or set "
                                          r"data.corpus to null"):
        train(recipe_from_dict(raw, world_size=1))
    raw = shard_recipe(tmp_path, corpus)
    raw["out_dir"], raw["data"]["vocab_size"] = str(tmp_path / "second"), 280
    with pytest.raises(RecipeError, match="data.vocab_size: .* made with a 300-token tokenizer, not 280"):
        train(recipe_from_dict(raw, world_size=1))
    assert not (tmp_path / "second").exists()
    raw["data"]["corpus"] = None  # these shards as they are
    assert train(recipe_from_dict(raw, world_size=1)).step == 2


def refusal_with_rebuild(tmp_path: Path, corpus: Path,
                         vocab_size: int) -> tuple[DataSection, pytest.ExceptionInfo, str]:
    """The data section of `shard_recipe` asking the tokenizer's own size (the BPE stops short of 300 on these
    corpora), the RecipeError `resolve_data` refuses it with, and the rebuild command that refusal should offer."""
    raw = shard_recipe(tmp_path, corpus)
    raw["data"]["vocab_size"] = vocab_size
    section = recipe_from_dict(raw, world_size=1).data
    with pytest.raises(RecipeError) as refused:
        resolve_data(section)
    shards = Path(section.shards)
    return section, refused, f"heron data prepare {corpus} --tokenizer {shards} --out {shards}"


def test_shards_made_before_a_corpus_took_in_its_linked_folders_are_refused_saying_what_differs(tmp_path: Path,
                                                                                              corpus: Path) -> None:
    """A link to a folder in a corpus folder is walked now (an older Heron left its files out): shards made
    without them are another corpus's. The refusal says what meta.json can tell, the file counts, and
    names the `heron data prepare` that rebuilds them so that training takes them."""
    linked = tmp_path / "linked"
    linked.mkdir()
    for i in range(4):
        (linked / f"n{i}.py").write_text(CODE.replace("Point", f"Line{i}") * 5)
    (corpus / "lib").symlink_to(linked, target_is_directory=True)
    older = Corpus([corpus], keep=lambda path: path.parent.name != "lib")  # what an older Heron read
    shards = tmp_path / "shards"
    tokenizer = train_tokenizer(older, 300, progress=False)
    prepare_shards(older, tokenizer, shards, progress=False)
    section, refused, command = refusal_with_rebuild(tmp_path, corpus, tokenizer.vocab_size)
    assert (f"holds shards of another corpus than {[str(corpus)]!r}: they were made from 12 files, it holds 16 "
            f"now, 4 of them in linked folders (an older Heron did not follow links to folders in a corpus folder); "
            f"to rebuild them from the corpus as it is now, run {command}; or set data.shards") in str(refused.value)
    assert main(shlex.split(command)[1:]) == 0
    assert resolve_data(section).meta["corpus_fingerprint"] == Corpus([corpus]).fingerprint()


def test_shards_of_as_many_files_as_the_corpus_are_refused_saying_files_changed(tmp_path: Path,
                                                                               corpus: Path) -> None:
    """The shards' tokenizer stopped at 297 tokens of the 300 asked for: rebuilt with it by `heron data
    prepare`, they would be refused for data.vocab_size, so that is not offered."""
    section = recipe_from_dict(shard_recipe(tmp_path, corpus), world_size=1).data
    assert resolve_data(section).vocab_size == 297
    (corpus / "m0.py").write_text(CODE)
    with pytest.raises(RecipeError, match=r"made from 12 files, as many as it holds now, so files were renamed, "
                                          r"replaced or changed \(or an older Heron keyed them otherwise\); "
                                          r"set data.shards to another folder") as refused:
        resolve_data(section)
    assert "heron data prepare" not in str(refused.value)


def test_shards_an_older_heron_made_from_a_corpus_with_carriage_returns_are_refused(tmp_path: Path,
                                                                                  corpus: Path) -> None:
    """Such shards (their meta.json names no text rule) read "\\r\\n" as "\\n": the corpus's fingerprint
    still matches, but their tokens are not its text as read now. Without "\\r" they stay usable."""
    (corpus / "m0.py").write_bytes(CODE.replace("\n", "\r\n").encode() * 8)
    train(recipe_from_dict(shard_recipe(tmp_path, corpus), world_size=1))
    meta_file = tmp_path / "shards" / "meta.json"
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items() if k != "text"}))
    raw = shard_recipe(tmp_path, corpus)
    raw["out_dir"] = str(tmp_path / "second")
    with pytest.raises(RecipeError, match=r"data.corpus: .*shards holds shards an older Heron made from this corpus, "
                                          r"reading its '\\r\\n' and '\\r' line endings as '\\n'"):
        train(recipe_from_dict(raw, world_size=1))
    assert not (tmp_path / "second").exists()


def test_shards_an_older_heron_made_from_a_corpus_with_carriage_returns_are_refused_offering_a_rebuild(
        tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal names the `heron data prepare` that remakes them with their tokenizer, reading the
    corpus as now, so that training takes them (as for shards of another corpus)."""
    (corpus / "m0.py").write_bytes(CODE.replace("\n", "\r\n").encode() * 8)
    shards = tmp_path / "shards"
    with monkeypatch.context() as patch:  # the older Heron's reading, and its meta.json without a text rule
        patch.setattr(corpus_module, "_read_text", lambda path: path.read_text(encoding="utf-8-sig"))
        tokenizer = train_tokenizer(Corpus([corpus]), 300, progress=False)
        prepare_shards(Corpus([corpus]), tokenizer, shards, progress=False)
    meta_file = shards / "meta.json"
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items() if k != "text"}))
    section, refused, command = refusal_with_rebuild(tmp_path, corpus, tokenizer.vocab_size)
    assert (f"reading its '\\r\\n' and '\\r' line endings as '\\n' (they are kept now); to rebuild them from "
            f"the corpus as it is now, run {command}; or set data.shards") in str(refused.value)
    assert main(shlex.split(command)[1:]) == 0
    data = resolve_data(section)
    assert data.meta["text"] == TEXT_RULE and data.tokenizer.fingerprint() == tokenizer.fingerprint()
    assert "\r\n" in "".join(data.tokenizer.decode(list(tokens[:])) for tokens in (data.train, data.val))


def test_shards_are_prepared_only_into_a_new_or_empty_folder(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match=r"data.shards: .*shards holds no shards \(meta.json\) but other files "
                                          r"\(notes.txt\)"):
        train(recipe_from_dict(shard_recipe(tmp_path, corpus), world_size=1))
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["notes.txt"]


def test_token_streams_from_python_need_no_data_section_and_are_identified(tmp_path: Path) -> None:
    """train(recipe, data=...) records the arrays' hash, so resuming on other arrays is refused."""
    from heron.train.sources import TrainData

    raw = {"out_dir": str(tmp_path / "run"), "model": {"preset": "test", "overrides": SMALL_MODEL},
           "data": {"seq_len": 8}, "train": {"steps": 2, "batch_size": 2, "eval_every": 0, "eval_batches": 1,
                                             "progress": False}}
    rng = np.random.default_rng(0)
    first = TrainData(train=rng.integers(0, 64, 400), val=rng.integers(0, 64, 100), vocab_size=64)
    result = train(recipe_from_dict(raw, world_size=1), data=first)
    lineage = (result.checkpoint / "lineage.json").read_text()
    assert '"source": "python"' in lineage and '"sha256"' in lineage
    other = TrainData(train=rng.integers(0, 64, 400), val=first.val, vocab_size=64)
    raw["train"]["steps"] = 3
    with pytest.raises(RecipeError, match=r"data: .* cannot continue \(data.sha256: "):
        train(recipe_from_dict(raw, world_size=1), data=other)
    with pytest.raises(RecipeError, match="data: train holds token id 64, outside vocab_size 64"):
        train(recipe_from_dict(raw, world_size=1), data=TrainData(train=np.full(400, 64), val=first.val,
                                                                  vocab_size=64))
    with pytest.raises(RecipeError, match=r"data.shards: set data.shards .* or pass the token streams"):
        train(recipe_from_dict(raw, world_size=1))


def test_every_process_learns_why_the_main_one_could_not_prepare_the_data(tmp_path: Path) -> None:
    """Under torchrun the main process prepares the shards while the others wait: when it
    fails, it tells them, and each fails with its error, not with a broken connection."""
    section = recipe_from_dict(shard_recipe(tmp_path, tmp_path / "missing-corpus"), world_size=1).data
    told = []
    with pytest.raises(RecipeError, match="missing-corpus") as main_error:
        resolve_data(section, is_main=True, share=lambda failure: told.append(failure) or failure)
    assert told == [str(main_error.value)]
    with pytest.raises(RecipeError, match="data: the main process could not prepare the data: .*missing-corpus"):
        resolve_data(section, is_main=False, share=lambda failure: told[0])


def test_shards_in_an_imported_models_ids_train_and_ship_its_tokenizer(tmp_path: Path, corpus: Path) -> None:
    """A model folder's tokenizer (no Heron special tokens; tokenizer_config.json names its eos)
    makes shards that a recipe trains on (distillation from that model reads them so), and the
    checkpoint carries that tokenizer."""
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator([CODE] * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                            show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "model").mkdir()
    hf.save(str(tmp_path / "model" / "tokenizer.json"))
    (tmp_path / "model" / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    imported = PretrainedTokenizer.load(tmp_path / "model")
    prepare_shards(Corpus([corpus]), imported, tmp_path / "shards", progress=False)
    raw = shard_recipe(tmp_path, corpus)
    del raw["data"]["corpus"]
    result = train(recipe_from_dict(raw, world_size=1))
    _, shipped = load_model_folder(result.out_dir)
    assert isinstance(shipped, PretrainedTokenizer) and shipped.fingerprint() == imported.fingerprint()


def test_an_empty_split_points_at_the_corpus_not_at_seq_len(tmp_path: Path) -> None:
    """A corpus of one file has no validation document: no data.seq_len would mend that."""
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "only.py").write_text(CODE * 8)
    raw = shard_recipe(tmp_path, folder)
    with pytest.raises(RecipeError, match=r"^data\.corpus: the validation split is empty: training needs both "
                       r"\(add files, .*a corpus of one file cannot be split\)$"):
        train(recipe_from_dict(raw, world_size=1))
    del raw["data"]["corpus"]  # the shards as they are: the folder is named
    with pytest.raises(RecipeError, match=r"^data\.shards: the validation split is empty"):
        train(recipe_from_dict(raw, world_size=1))


def put_id_in_a_shard(shards: Path, name: str, token_id: int) -> None:
    """Write `token_id` over the middle id of shard file `name`, as another set's file or damage would."""
    ids = np.fromfile(shards / name, dtype="<u2")
    ids[len(ids) // 2] = token_id
    ids.tofile(shards / name)


def test_shards_holding_an_id_past_their_vocabulary_fail_before_training_naming_file_id_and_size(
        tmp_path: Path, corpus: Path) -> None:
    """Else the embedding lookup fails mid-step with "index out of range in self" (or reads stray memory)."""
    raw = shard_recipe(tmp_path, corpus)
    assert resolve_data(recipe_from_dict(raw, world_size=1).data).vocab_size == 297  # prepares the shards
    put_id_in_a_shard(tmp_path / "shards", "val_000000.bin", 297)
    with pytest.raises(RecipeError, match=r"^data\.shards: shard .*shards/val_000000\.bin holds token id 297, but "
                                          r"meta\.json gives its tokenizer a vocabulary of 297 .*heron data prepare"):
        train(recipe_from_dict(raw, world_size=1))
    assert not (tmp_path / "run").exists()
    put_id_in_a_shard(tmp_path / "shards", "val_000000.bin", 296)  # the last id in the vocabulary trains
    assert train(recipe_from_dict(raw, world_size=1)).step == 2


def test_shards_whose_meta_gives_no_vocab_size_are_bounded_by_their_tokenizer(tmp_path: Path, corpus: Path) -> None:
    """A hand-made meta.json: the tokenizer's size bounds the ids (it was a KeyError), and sizes the model."""
    raw = shard_recipe(tmp_path, corpus)
    resolve_data(recipe_from_dict(raw, world_size=1).data)
    meta_file = tmp_path / "shards" / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["vocab_size"]
    meta_file.write_text(json.dumps(meta))
    section = recipe_from_dict(raw | {"data": raw["data"] | {"corpus": None}}, world_size=1).data
    assert resolve_data(section).vocab_size == 297
    put_id_in_a_shard(tmp_path / "shards", "train_000000.bin", 297)
    with pytest.raises(RecipeError, match=r"^data\.shards: shard .*shards/train_000000\.bin holds token id 297, but "
                                          r"the tokenizer .*tokenizer\.json has a vocabulary of 297 .*heron data prepare"):
        resolve_data(section)
