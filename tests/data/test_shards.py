import json
import os

import numpy as np
import pytest

from heron.data import Corpus, ShardedTokens, check_shards_fit, load_shards, prepare_shards
from heron.data.shards import split_value, token_dtype, validation_keys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from heron.tokenizer import HeronTokenizer, PretrainedTokenizer, load_tokenizer, train_tokenizer
from heron.tokenizer.bpe import cuts_exact


def write_docs(root, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        body = "".join(f"    x{j} = {i * j} + value_{i % 5}\n" for j in range(i % 9 + 1))
        (root / f"mod_{i:03d}.py").write_text(f"def f{i}():\n{body}    return <|eos|> 'é'\n", encoding="utf-8")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> HeronTokenizer:
    root = tmp_path_factory.mktemp("tok")
    write_docs(root, 30)
    return train_tokenizer(Corpus([root]), vocab_size=320, progress=False)


def direct_streams(corpus: Corpus, tok: HeronTokenizer, val: set[str]) -> dict[str, list[int]]:
    """The reference: each document encoded on its own, eos appended, joined per split in order."""
    streams = {"train": [], "val": []}
    for key, text in corpus.items():
        streams["val" if key in val else "train"] += tok.encode(text, allow_special=False) + [tok.eos_id]
    return streams


def test_shards_equal_direct_encoding(tmp_path, tok) -> None:
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 40)
    corpus = Corpus([tmp_path / "src"])
    shards = prepare_shards(corpus, tok, tmp_path / "out", val_fraction=0.2, shard_tokens=500, progress=False)
    expected = direct_streams(corpus, tok, validation_keys(corpus.keys, 0.2, seed=0))
    assert 0 < len(expected["val"]) < len(expected["train"])
    for split in ("train", "val"):
        tokens = getattr(shards, split)
        assert np.array_equal(np.asarray(tokens), expected[split])
        assert shards.meta[split]["tokens"] == len(expected[split])
    assert len(shards.train.shards) == -(-len(expected["train"]) // 500)  # ceil: several shards of 500
    assert shards.meta["train"]["documents"] + shards.meta["val"]["documents"] == 40
    assert shards.meta["dtype"] == "uint16" and shards.train.dtype == np.uint16
    assert shards.meta["tokenizer_sha256"] == tok.fingerprint()
    assert shards.meta["corpus_fingerprint"] == corpus.fingerprint()
    assert not shards.reused
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.endswith(".bin")) == ["meta.json", "tokenizer.json"]


def test_a_long_document_is_encoded_in_pieces_to_the_same_tokens(tmp_path, tok, monkeypatch) -> None:
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 12)
    long_doc = "".join((tmp_path / "src" / f"mod_{i:03d}.py").read_text(encoding="utf-8") for i in range(12)) * 3
    (tmp_path / "src" / "long.py").write_text(long_doc, encoding="utf-8")
    corpus = Corpus([tmp_path / "src"])
    pieces = []
    monkeypatch.setattr("heron.data.shards._PIECE_CHARS", 64)
    monkeypatch.setattr("heron.data.shards._ENCODE_BATCH_CHARS", 200)
    monkeypatch.setattr(HeronTokenizer, "encode_batch", lambda self, texts, allow_special=True: (
        pieces.extend(texts) or [self.encode(t, allow_special=allow_special) for t in texts]))
    shards = prepare_shards(corpus, tok, tmp_path / "out", val_fraction=0.3, progress=False)
    assert len(pieces) > 13 and max(map(len, pieces)) < len(long_doc) / 4  # the long document went in pieces
    expected = direct_streams(corpus, tok, validation_keys(corpus.keys, 0.3, seed=0))
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(getattr(shards, split)), expected[split])
    assert shards.meta["train"]["documents"] + shards.meta["val"]["documents"] == 13


def test_sharded_tokens_slice_across_shards() -> None:
    parts = [np.arange(0, 5), np.arange(5, 7), np.arange(7, 20)]
    tokens = ShardedTokens(parts)
    whole = np.arange(20)
    assert len(tokens) == 20
    for a, b in [(0, 20), (3, 9), (4, 5), (5, 7), (6, 18), (19, 20), (10, 10), (-3, None)]:
        assert np.array_equal(tokens[a:b], whole[a:b])
    assert tokens[7] == 7 and tokens[-1] == 19
    with pytest.raises(IndexError):
        tokens[20]
    with pytest.raises(ValueError, match=r"^step: ShardedTokens supports contiguous slices only \(step 1\), got 2$"):
        tokens[0:10:2]


def test_split_is_deterministic_and_stable_when_files_are_added() -> None:
    keys = [f"pkg/mod_{i}.py" for i in range(200)]
    val = validation_keys(keys, 0.1, seed=0)
    assert val == validation_keys(list(reversed(keys)), 0.1, seed=0)
    assert 5 < len(val) < 40
    grown = validation_keys(keys + [f"new_{i}.py" for i in range(50)], 0.1, seed=0)
    assert grown & set(keys) == val  # old documents keep their split
    assert validation_keys(keys, 0.1, seed=1) != val  # the seed picks another split
    assert split_value("a.py", 0) == split_value("a.py", 0)


def test_tiny_corpus_still_gets_one_validation_document() -> None:
    keys = ["a.py", "b.py", "c.py"]
    val = validation_keys(keys, 1e-9, seed=0)
    assert val == {min(keys, key=lambda k: split_value(k, 0))}
    assert validation_keys(keys, 0.0, seed=0) == set()


def test_split_on_disk_is_stable_when_a_file_is_added(tmp_path, tok) -> None:
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 30)
    first = prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out", val_fraction=0.2, progress=False)
    val_before = np.asarray(first.val).copy()
    # Add one file that hashes into train: validation must not change by a single token.
    start = next(i for i in range(500, 600) if split_value(f"mod_{i:03d}.py", 0) >= 0.2)
    write_docs(tmp_path / "src", 1, start=start)
    second = prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out", val_fraction=0.2, progress=False)
    assert not second.reused
    assert second.meta["train"]["documents"] == first.meta["train"]["documents"] + 1
    assert np.array_equal(np.asarray(second.val), val_before)


def test_rerun_reuses_matching_shards_and_rebuild_drops_stale_ones(tmp_path, tok) -> None:
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 20)
    corpus = Corpus([tmp_path / "src"])
    first = prepare_shards(corpus, tok, tmp_path / "out", shard_tokens=200, progress=False)
    stamp = (tmp_path / "out" / "train_000000.bin").stat().st_mtime_ns
    again = prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out", shard_tokens=200, progress=False)
    assert again.reused and again.meta == first.meta
    assert (tmp_path / "out" / "train_000000.bin").stat().st_mtime_ns == stamp
    rebuilt = prepare_shards(corpus, tok, tmp_path / "out", shard_tokens=10**6, progress=False)
    assert not rebuilt.reused
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == ["train_000000.bin", "val_000000.bin"]
    assert np.array_equal(np.asarray(rebuilt.train), np.asarray(first.train))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda meta: meta | {"dtype": "O"}, "dtype 'O' is not one of uint16, uint32"),
    (lambda meta: meta["train"]["shards"][0].update(file="../victim.txt") or meta, "'../victim.txt' is not a file name"),
    (lambda meta: meta["val"]["shards"][0].update(file="/abs/victim.txt") or meta, "'/abs/victim.txt' is not a file name"),
    (lambda meta: meta["val"]["shards"][0].update(tokens=-3) or meta, "tokens -3 is not a count"),
])
def test_crafted_metadata_is_refused_and_names_no_file_outside_the_folder(tmp_path, tok, edit, message) -> None:
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 20)
    out = tmp_path / "shards" / "out"
    prepare_shards(Corpus([tmp_path / "src"]), tok, out, val_fraction=0.2, progress=False)
    victim = tmp_path / "shards" / "victim.txt"
    victim.write_text("keep me")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(edit(meta)))
    with pytest.raises(ValueError, match=message):
        load_shards(out)
    with pytest.raises(FileExistsError, match="not Heron's to write over"):  # and deletes nothing
        prepare_shards(Corpus([tmp_path / "src"]), tok, out, progress=False)
    assert victim.read_text() == "keep me"


def test_load_errors(tmp_path, tok) -> None:
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_shards(tmp_path)
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 5)
    prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out", progress=False)
    shard = tmp_path / "out" / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="train_000000.bin"):
        load_shards(tmp_path / "out")
    (tmp_path / "out" / "meta.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid shard metadata"):
        load_shards(tmp_path / "out")


def test_token_dtype_boundary() -> None:
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32


def test_meta_is_plain_json(tmp_path, tok) -> None:
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 3)
    prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out", progress=False)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["split"]["val_fraction"] == 0.02 and meta["split"]["seed"] == 0
    assert meta["vocab_size"] == tok.vocab_size and meta["eos_id"] == tok.eos_id


def test_the_folder_carries_the_tokenizer_that_made_it(tmp_path, tok) -> None:
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 5)
    first = prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out", progress=False)
    carried = HeronTokenizer.load(tmp_path / "out")
    assert carried.fingerprint() == tok.fingerprint() == first.meta["tokenizer_sha256"]
    (tmp_path / "out" / "tokenizer.json").unlink()  # shards written before folders carried their tokenizer
    again = prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out", progress=False)
    assert again.reused and HeronTokenizer.load(tmp_path / "out").fingerprint() == tok.fingerprint()


def test_an_output_folder_inside_the_corpus_is_no_part_of_it(tmp_path, tok) -> None:
    """Else each rerun takes in its own shards and meta.json and never reuses them."""
    write_docs(tmp_path, 12)
    first = prepare_shards(Corpus([tmp_path]), tok, tmp_path / "shards", progress=False)
    again = prepare_shards(Corpus([tmp_path]), tok, tmp_path / "shards", progress=False)
    assert again.reused and len(again.train) == len(first.train) and again.meta["skipped_files"] == []
    alone = prepare_shards(Corpus(sorted(str(p) for p in tmp_path.glob("*.py"))), tok, tmp_path / "elsewhere",
                           progress=False)
    assert alone.meta["corpus_fingerprint"] == first.meta["corpus_fingerprint"]


def test_a_corpus_of_no_utf8_text_is_refused(tmp_path, tok) -> None:
    for i in range(3):
        (tmp_path / f"latin{i}.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="no file of the corpus is UTF-8 text: all 3 were skipped"):
        prepare_shards(Corpus([tmp_path]), tok, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_a_bad_val_fraction_is_refused_before_the_output_folder_is_made(tmp_path, tok) -> None:
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 3)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 2"):
        prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out" / "shards", val_fraction=2, progress=False)
    assert not (tmp_path / "out").exists()  # not an empty folder left behind


def test_a_reuse_puts_back_the_folders_tokenizer_when_another_was_written_over_it(tmp_path, tok) -> None:
    """Else the folder's copy names another tokenizer than meta.json, and training refuses it."""
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 12)
    prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out", progress=False)
    other = train_tokenizer(["completely different text " * 50], vocab_size=280, progress=False)
    other.save(tmp_path / "out")
    again = prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out", progress=False)
    assert again.reused and HeronTokenizer.load(tmp_path / "out").fingerprint() == tok.fingerprint()


def test_a_users_tokenizer_in_the_out_folder_makes_the_shards_and_another_is_refused_not_written_over_it(
        tmp_path, tok) -> None:
    """`--tokenizer F/tokenizer.json --out F`: the shards are made with the user's file, which stays as it was.
    Another tokenizer would be installed over it, so it is refused naming both files: before the shards (the
    file alone in the folder) and after (the file marked as the user's beside them)."""
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 12)
    other = train_tokenizer(["completely different text " * 50], vocab_size=280, progress=False)
    other.save(tmp_path / "other")
    mine = tok.save(tmp_path / "out")
    saved = mine.read_bytes()
    for _ in range(2):
        with pytest.raises(FileExistsError) as caught:
            prepare_shards(Corpus([tmp_path / "src"]), other, tmp_path / "out", progress=False,
                           tokenizer_source=tmp_path / "other")
        assert str(caught.value).startswith(f"{mine}: your own tokenizer, not {tmp_path / 'other' / 'tokenizer.json'};")
        assert mine.read_bytes() == saved
        assert prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out", progress=False,
                              tokenizer_source=mine).meta["tokenizer_sha256"] == tok.fingerprint()
        assert mine.read_bytes() == saved


def test_what_a_killed_preparation_left_is_swept_by_the_next(tmp_path, tok) -> None:
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 12)
    (tmp_path / "out" / ".shards-killed").mkdir(parents=True)
    (tmp_path / "out" / ".shards-killed" / "train_000000.bin").write_bytes(b"\0" * 64)
    prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob(".shards-*"))


def test_a_folder_holding_other_files_is_refused_and_left_as_it_was(tmp_path, tok) -> None:
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 12)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_notes.bin").write_bytes(b"mine")  # named like shards, but the user's
    (out / "meta.json").write_text('{"mine": true}')
    with pytest.raises(FileExistsError, match="meta.json is not valid shard metadata.*not Heron's to write over"):
        prepare_shards(Corpus([tmp_path / "src"]), tok, out, progress=False)
    assert (out / "meta.json").read_text() == '{"mine": true}'
    (out / "meta.json").unlink()
    with pytest.raises(FileExistsError, match="train_notes.bin"):
        prepare_shards(Corpus([tmp_path / "src"]), tok, out, progress=False)
    assert (out / "train_notes.bin").read_bytes() == b"mine"
    (out / "train_notes.bin").unlink()
    (out / "meta.json").write_text("[1, 2")  # a meta.json that is not Heron's is not written over
    with pytest.raises(FileExistsError, match="not Heron's to write over"):
        prepare_shards(Corpus([tmp_path / "src"]), tok, out, progress=False)
    assert (out / "meta.json").read_text() == "[1, 2"


def test_a_rebuild_replaces_only_the_files_of_the_previous_set(tmp_path, tok) -> None:
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 20)
    out = tmp_path / "out"
    prepare_shards(Corpus([tmp_path / "src"]), tok, out, shard_tokens=200, progress=False)
    assert (out / "train_000003.bin").is_file()
    rebuilt = prepare_shards(Corpus([tmp_path / "src"]), tok, out, shard_tokens=10**6, progress=False)
    shard_set = ["meta.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"]
    assert sorted(p.name for p in out.iterdir()) == shard_set
    (out / "extra.txt").write_text("mine")  # added after: the next rebuild refuses rather than run beside it
    with pytest.raises(FileExistsError, match="extra.txt"):
        prepare_shards(Corpus([tmp_path / "src"]), tok, out, shard_tokens=300, progress=False)
    assert load_shards(out).meta == rebuilt.meta


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_a_set_whose_install_was_killed_is_rebuilt_by_the_next_preparation(tmp_path, tok, monkeypatch) -> None:
    """The install removes meta.json and the old shards, then moves the new ones in: a kill in
    between leaves shard files with no meta.json, which the next preparation replaces."""
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 20)
    out = tmp_path / "out"
    prepare_shards(Corpus([tmp_path / "src"]), tok, out, shard_tokens=200, progress=False)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == "train_000001.bin":  # after the first new shard is in
            raise Killed
        return real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            prepare_shards(Corpus([tmp_path / "src"]), tok, out, seed=1, shard_tokens=200, progress=False)
    assert (out / "train_000000.bin").is_file() and not (out / "meta.json").exists()
    (out / "val_000007.bin").write_bytes(b"\0" * 6)  # a shard of some older, larger set
    rebuilt = prepare_shards(Corpus([tmp_path / "src"]), tok, out, seed=1, shard_tokens=10**6, progress=False)
    assert not rebuilt.reused and rebuilt.meta["split"]["seed"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train_000000.bin",
                                                     "val_000000.bin"]


def test_the_fallback_validation_document_is_a_decodable_one(tmp_path, tok) -> None:
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 3)
    keys = ["mod_000.py", "mod_001.py", "mod_002.py"]
    smallest = min(keys, key=lambda k: split_value(k, 0))
    (tmp_path / "src" / smallest).write_bytes("café".encode("latin-1"))
    corpus = Corpus([tmp_path / "src"])
    assert validation_keys(corpus.keys, 0.02, seed=0) == {smallest}  # no key under 0.02: the smallest value
    chosen = validation_keys(corpus.keys, 0.02, seed=0, decodes=corpus.decodes)
    runner_up = min(set(keys) - {smallest}, key=lambda k: split_value(k, 0))
    assert chosen == {runner_up}
    shards = prepare_shards(corpus, tok, tmp_path / "out", val_fraction=0.02, progress=False)
    assert shards.meta["val"]["documents"] == 1 and shards.meta["train"]["documents"] == 1
    assert shards.meta["skipped_files"] == [smallest]  # its key


def test_a_running_preparations_temporary_folder_is_left_alone(tmp_path, tok) -> None:
    """Only what a dead process left is stale: a live one (here this process) is still writing there."""
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 12)
    live = tmp_path / "out" / f".shards-{os.getpid()}-live"
    live.mkdir(parents=True)
    dead = tmp_path / "out" / ".shards-999999999-dead"  # past any pid_max
    dead.mkdir()
    prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out", progress=False)
    assert live.is_dir() and not dead.exists()


def imported_tokenizer(folder) -> PretrainedTokenizer:
    """A Hugging Face tokenizer as a LLaMA-style model folder holds it: no Heron special tokens,
    a post-processor that puts <s> first, eos_token named in tokenizer_config.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"def f{i}(x):\n    return x + {i}\n" for i in range(50)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return PretrainedTokenizer.load(folder)


def test_an_imported_models_tokenizer_makes_shards_and_carries_over(tmp_path, tok) -> None:
    """Shards in an imported model's own ids: each document without the post-processor's <s>, then
    </s>; the folder keeps tokenizer.json and tokenizer_config.json, and a rerun reuses them."""
    imported = imported_tokenizer(tmp_path / "llama")
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 20)
    corpus = Corpus([tmp_path / "src"])
    shards = prepare_shards(corpus, imported, tmp_path / "out", val_fraction=0.2, progress=False)
    expected = {"train": [], "val": []}
    val = validation_keys(corpus.keys, 0.2, seed=0)
    for key, text in corpus.items():
        ids = imported.encode(text, add_special_tokens=False, allow_special=False) + [imported.eos_id]
        expected["val" if key in val else "train"] += ids
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(getattr(shards, split)), expected[split])
    carried = load_tokenizer(tmp_path / "out")
    assert isinstance(carried, PretrainedTokenizer) and carried.fingerprint() == imported.fingerprint()
    assert prepare_shards(Corpus([tmp_path / "src"]), imported, tmp_path / "out", val_fraction=0.2,
                          progress=False).reused
    check_shards_fit(shards, "llama", vocab_size=imported.vocab_size, tokenizer=imported)
    other = prepare_shards(corpus, tok, tmp_path / "heron", progress=False)
    with pytest.raises(ValueError, match="made with another tokenizer than llama's"):
        check_shards_fit(other, "llama", vocab_size=imported.vocab_size, tokenizer=imported)


def test_an_imported_tokenizer_asks_once_whether_it_may_cut_texts(tmp_path, monkeypatch) -> None:
    """cuts_exact parses the whole tokenizer.json (~0.15 s for a 150k vocabulary): asked per
    document, it made preparation cost that per file, however small."""
    imported = imported_tokenizer(tmp_path / "llama")
    calls = []
    real = cuts_exact
    monkeypatch.setattr("heron.tokenizer.pretrained.cuts_exact", lambda tokenizer: calls.append(1) or real(tokenizer))
    (tmp_path / "src").mkdir()
    write_docs(tmp_path / "src", 20)
    prepare_shards(Corpus([tmp_path / "src"]), imported, tmp_path / "out", progress=False)
    assert len(calls) == 1


CRLF_FILES = {"crlf.txt": b"line one\r\nline two\rthree\r\n", "lf.txt": b"other file\n"}


def test_line_endings_reach_the_shards_as_the_file_has_them(tmp_path, tok) -> None:
    """The tokenizer is byte-level: "\\r\\n" and a lone "\\r" are tokens of the file, not "\\n"."""
    (tmp_path / "src").mkdir()
    for name, data in CRLF_FILES.items():
        (tmp_path / "src" / name).write_bytes(data)
    shards = prepare_shards(Corpus([tmp_path / "src"]), tok, tmp_path / "out", val_fraction=0, progress=False)
    eos = tok.decode([tok.eos_id], skip_special=False)
    texts = [data.decode("utf-8") for data in CRLF_FILES.values()]
    assert tok.decode(np.asarray(shards.train).tolist(), skip_special=False) == "".join(t + eos for t in texts)
    assert shards.meta["text"] == "UTF-8, a leading BOM dropped, line endings kept as in the file"


def test_a_set_made_before_line_endings_were_kept_is_rebuilt_only_for_a_corpus_with_carriage_returns(
        tmp_path, tok) -> None:
    """Such a set read "\\r\\n" and "\\r" as "\\n", and its meta.json names no text rule: its tokens are
    this code's for a corpus without "\\r" (the default stdlib corpus), not for one with."""
    (tmp_path / "crlf").mkdir()
    for name, data in CRLF_FILES.items():
        (tmp_path / "crlf" / name).write_bytes(data)
    (tmp_path / "lf").mkdir()
    write_docs(tmp_path / "lf", 5)
    for name in ("crlf", "lf"):
        first = prepare_shards(Corpus([tmp_path / name]), tok, tmp_path / f"out_{name}", progress=False)
        meta_file = tmp_path / f"out_{name}" / "meta.json"
        meta = json.loads(meta_file.read_text())
        del meta["text"]  # as the earlier code wrote it
        meta_file.write_text(json.dumps(meta))
        again = prepare_shards(Corpus([tmp_path / name]), tok, tmp_path / f"out_{name}", progress=False)
        assert again.reused == (name == "lf")
        assert np.array_equal(np.asarray(again.train), np.asarray(first.train))
    meta = json.loads(meta_file.read_text()) | {"text": "another rule"}
    meta_file.write_text(json.dumps(meta))
    assert not prepare_shards(Corpus([tmp_path / "lf"]), tok, tmp_path / "out_lf", progress=False).reused


def test_meta_names_skipped_files_by_key_whatever_the_working_directory(tmp_path, tok, monkeypatch) -> None:
    (tmp_path / "c" / "d0").mkdir(parents=True)
    write_docs(tmp_path / "c" / "d0", 6)
    (tmp_path / "c" / "d0" / "zbad.txt").write_bytes(b"\xff\xfe bad")
    monkeypatch.chdir(tmp_path)
    above = prepare_shards(Corpus(["c"]), tok, tmp_path / "above", val_fraction=0.2, progress=False)
    monkeypatch.chdir(tmp_path / "c")
    prepare_shards(Corpus(["."]), tok, tmp_path / "inside", val_fraction=0.2, progress=False)
    assert above.meta["skipped_files"] == ["d0/zbad.txt"]
    assert (tmp_path / "above" / "meta.json").read_bytes() == (tmp_path / "inside" / "meta.json").read_bytes()


def write_shard_folder(folder, vocab_size: object, train: list[list[int]], val: list[int]):
    """A shard folder made by hand, as load_shards reads it: `train` over several files, `val` in one;
    no vocab_size in meta.json when it is None."""
    folder.mkdir()
    meta = {"format": 1, "dtype": "uint16", **({} if vocab_size is None else {"vocab_size": vocab_size})}
    for split, files in (("train", train), ("val", [val])):
        meta[split] = {"shards": []}
        for i, ids in enumerate(files):
            np.array(ids, dtype="<u2").tofile(folder / f"{split}_{i:06d}.bin")
            meta[split]["shards"].append({"file": f"{split}_{i:06d}.bin", "tokens": len(ids)})
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_a_shard_holding_an_id_past_the_vocabulary_is_refused_at_load_naming_file_id_and_size(tmp_path) -> None:
    """Else training fails deep in the embedding lookup ("index out of range in self"), or reads stray
    memory on some backends. The id equal to vocab_size is the first one past it."""
    bad = write_shard_folder(tmp_path / "bad", 50, [[1, 2, 3], [4, 50, 7, 9]], [5, 6])
    with pytest.raises(ValueError, match=r"shard .*bad/train_000001\.bin holds token id 50, but meta\.json gives its "
                       r"tokenizer a vocabulary of 50 .*heron data prepare"):
        load_shards(bad)
    good = load_shards(write_shard_folder(tmp_path / "good", 50, [[1, 2, 3], [4, 49, 7, 9]], [5, 0]))
    assert np.asarray(good.train).tolist() == [1, 2, 3, 4, 49, 7, 9] and len(good.val) == 2


def test_a_vocab_size_in_meta_that_is_no_count_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="vocab_size '50' is not a count of tokens"):
        load_shards(write_shard_folder(tmp_path / "out", "50", [[1, 2]], [3]))


def test_without_a_vocab_size_in_meta_the_ids_are_checked_against_the_models(tmp_path) -> None:
    """A hand-made folder records no vocabulary: check_shards_fit reads the ids themselves."""
    shards = load_shards(write_shard_folder(tmp_path / "out", None, [[1, 2, 3]], [40, 63]))
    check_shards_fit(shards, "tiny", vocab_size=64)
    with pytest.raises(ValueError, match=r"shard .*out/val_000000\.bin holds token id 63, but tiny has a "
                       r"vocabulary of 63 .*--tokenizer MODEL_FOLDER"):
        check_shards_fit(shards, "tiny", vocab_size=63)
