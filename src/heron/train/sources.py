"""Token streams for a recipe's `data` section: shards on disk or synthetic.

Shards come from the data layer (`prepare_shards` / `load_shards`); when the
recipe names a corpus and the shard folder is new or empty, they are prepared here
first (tokenizer included), so `heron train tiny` runs on a
fresh machine. Synthetic streams have a known answer and need no disk.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from heron.data.batches import TokenStream
from heron.data.corpus import Corpus, default_corpus
from heron.data.shards import (META_FILE, SPLITS, TEXT_RULE, TOKENIZER_FILES, ShardSet, check_ids_below,
                               is_shard_file, load_shards, prepare_shards, read_as_now, users_tokenizer)
from heron.tokenizer import Tokenizer, load_tokenizer
from heron.tokenizer.bpe import TOKENIZER_FILE, HeronTokenizer, train_tokenizer
from heron.train.recipe import DataSection, RecipeError, SyntheticData

VOCAB_REQUESTED = "tokenizer_vocab_requested"  # meta.json key: the vocab_size the recipe asked for
# A tokenizer trained here, until its shards are in, named for what it learnt from: the vocab size asked for,
# the corpus's bytes and the text rule they were read under (the bytes alone do not fix the text).
_KEPT_TOKENIZER = ".tokenizer-{vocab_size}-{corpus}-{text}.json"
_KEPT_TOKENIZERS = ".tokenizer-*.json"  # every kept tokenizer: older Herons' names, without the text rule, too


@dataclass(frozen=True)
class TrainData:
    """What the loop trains on, and what lineage records about it."""

    train: TokenStream
    val: TokenStream
    vocab_size: int  # ids are < vocab_size
    tokenizer: Tokenizer | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def resolve_data(section: DataSection, *, is_main: bool = True,
                 share: Callable[[str | None], str | None] = lambda failure: failure) -> TrainData:
    """Load (preparing first if needed, on the main process only) the recipe's data. `share`
    hands the main process's failure (None: it succeeded) to every process, which waits
    for it: a process then fails with the main one's error, not a broken connection.

    With `data.corpus` set, the shards must be that corpus's: a folder holding shards of
    another corpus, or made with a tokenizer of another `data.vocab_size`, is refused rather
    than trained on (the lineage would name a corpus the model never saw), and shards are
    prepared only into a new or empty folder."""
    if section.synthetic is not None:
        return synthetic_data(section.synthetic)
    if section.shards is None:
        raise RecipeError("data.shards: set data.shards (a shard folder) or data.synthetic, or pass the token "
                          "streams to train(data=...)")
    folder = Path(section.shards)
    failure = None
    if is_main and section.corpus is not None:
        try:
            if (folder / META_FILE).is_file():
                _check_made_from(section, folder)
            else:
                _check_room(folder)
                _prepare(section, folder)
        except Exception as err:  # noqa: BLE001 - told to the other processes, then raised
            failure = err
    shared = share(None if failure is None else str(failure))  # the others wait for the main one
    if failure is not None:
        raise failure
    if shared is not None:
        raise RecipeError(f"data: the main process could not prepare the data: {shared}")
    return _load(section, folder)


def given_data(data: TrainData) -> TrainData:
    """Token streams handed to `train(data=...)` from Python, checked and identified: ids
    must lie below vocab_size, and unless the caller described them (meta), their hash
    is what lineage records, so that resuming on other arrays is caught."""
    for split, tokens in (("train", data.train), ("val", data.val)):
        ids = np.asarray(tokens)
        if ids.size and (ids.min() < 0 or ids.max() >= data.vocab_size):
            bad = int(ids.max()) if ids.max() >= data.vocab_size else int(ids.min())
            raise RecipeError(f"data: {split} holds token id {bad}, outside vocab_size {data.vocab_size}")
    if data.meta:
        return data
    digest = hashlib.sha256()
    for tokens in (data.train, data.val):
        digest.update(np.ascontiguousarray(np.asarray(tokens, dtype=np.int64)).tobytes())
    meta = {"source": "python", "sha256": digest.hexdigest(), "train_tokens": len(data.train),
            "val_tokens": len(data.val)}
    return dataclasses.replace(data, meta=meta)


def synthetic_data(spec: SyntheticData) -> TrainData:
    """A fixed random permutation of the vocabulary, repeated (kind="permutation").

    Every token has exactly one successor, so the achievable loss is ~0: a
    known answer for "the loop learns". Validation is the same cycle from a
    different starting token.
    """
    perm = np.random.default_rng(spec.seed).permutation(spec.vocab_size).astype(np.int64)
    train = np.resize(perm, spec.n_tokens)
    val = np.resize(np.roll(perm, spec.vocab_size // 2), max(spec.n_tokens // 8, 2 * spec.vocab_size))
    digest = hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()
    meta = {"source": "synthetic", **spec.model_dump(), "sha256": digest}
    return TrainData(train=train, val=val, vocab_size=spec.vocab_size, meta=meta)


def _load(section: DataSection, folder: Path) -> TrainData:
    try:
        shards = load_shards(folder)
    except (FileNotFoundError, ValueError) as err:
        raise RecipeError(f"data.shards: {err}") from None
    tokenizer = _tokenizer(section, folder)
    if tokenizer is None:
        raise RecipeError(f"data.tokenizer: {folder} holds no {TOKENIZER_FILE}, so the checkpoints could not turn ids "
                          "into text; set data.tokenizer to the tokenizer these shards were made with")
    if tokenizer.fingerprint() != shards.meta.get("tokenizer_sha256"):
        raise RecipeError(f"data.tokenizer: {_tokenizer_path(section, folder)} is not the tokenizer these shards were made with")
    meta = {"source": "shards", "path": str(folder), **{k: v for k, v in shards.meta.items() if k not in ("train", "val")},
            "train_tokens": len(shards.train), "val_tokens": len(shards.val)}
    vocab_size = _vocab_size(shards, tokenizer, _tokenizer_path(section, folder))
    return TrainData(train=shards.train, val=shards.val, vocab_size=vocab_size, tokenizer=tokenizer, meta=meta)


def _vocab_size(shards: ShardSet, tokenizer: Tokenizer, named: Path) -> int:
    """The bound on the shards' ids, which sizes the model's embedding: meta.json's vocab_size (load_shards
    checked every id against it), else, in a hand-made folder, the tokenizer's, checked here once: an id past
    it would fail deep in the embedding lookup instead."""
    if shards.meta.get("vocab_size") is not None:
        return int(shards.meta["vocab_size"])
    try:
        check_ids_below(shards, tokenizer.vocab_size, f"the tokenizer {named} has", tokenizer=str(named))
    except ValueError as err:
        raise RecipeError(f"data.shards: {err}") from None
    return tokenizer.vocab_size


def _corpus(section: DataSection) -> Corpus:
    try:
        return default_corpus() if section.corpus == "default" else Corpus(list(section.corpus))
    except FileNotFoundError as err:
        raise RecipeError(f"data.corpus: {err}") from None


def _prepare(section: DataSection, folder: Path) -> None:
    """Tokenise the named corpus into `folder` with data.tokenizer, or with a tokenizer trained here.

    prepare_shards installs the tokenizer beside the shards. Until then a trained one is kept
    under a hidden name that records what it was trained for (vocab size, corpus fingerprint, text rule),
    so a rerun after a kill skips the training only for the same request: a tokenizer.json a
    killed install left (shard files lie beside it) says neither, and meta.json must name the
    request that made it. A tokenizer.json of the user's own in the folder (`users_tokenizer`) is used;
    prepare_shards marks it as the user's and refuses a data.tokenizer naming another, which would replace it.
    """
    corpus = _corpus(section).excluding(folder)
    if section.tokenizer is not None or _users_tokenizer(folder):
        tokenizer = _tokenizer(section, folder)
        prepare_shards(corpus, tokenizer, folder, seed=section.split_seed,
                       tokenizer_source=_tokenizer_path(section, folder))
        return
    kept = _kept_tokenizer(folder, section.vocab_size, corpus)
    if kept.is_file():
        tokenizer = HeronTokenizer.load(kept)
    else:
        tokenizer = train_tokenizer(corpus, section.vocab_size)
        tokenizer.save(kept)
    # A small corpus can stop the BPE short of vocab_size: the request is kept to check against.
    prepare_shards(corpus, tokenizer, folder, seed=section.split_seed, note={VOCAB_REQUESTED: section.vocab_size})
    for leftover in folder.glob(_KEPT_TOKENIZERS):  # (a stale mark of a user's tokenizer: prepare_shards removed it)
        leftover.unlink(missing_ok=True)


def _kept_tokenizer(folder: Path, vocab_size: int, corpus: Corpus) -> Path:
    r"""Where a tokenizer trained in `folder` for this request is kept until its shards are in. The name
    holds the text rule (`TEXT_RULE`): one an older Heron kept, which read "\r\n" and "\r" as "\n" from
    the same bytes, has another name, so it is trained again rather than reused."""
    text = hashlib.sha256(TEXT_RULE.encode("utf-8")).hexdigest()[:8]
    return folder / _KEPT_TOKENIZER.format(vocab_size=vocab_size, corpus=corpus.fingerprint()[:16], text=text)


def _users_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer.json of the user's own (`users_tokenizer`), not one a killed install
    of a tokenizer Heron trained left; a RecipeError if that file is not a tokenizer."""
    try:
        return users_tokenizer(folder) is not None
    except ValueError as err:
        raise RecipeError(f"data.tokenizer: {err}") from None


def _check_made_from(section: DataSection, folder: Path) -> None:
    """Refuse shards in `folder` that this recipe's corpus and vocabulary did not make."""
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    fix = (f"set data.shards to another folder (they are prepared there), delete {folder} to prepare it "
           "again, or set data.corpus to null to train on these shards as they are")
    corpus = _corpus(section).excluding(folder)
    command = _rebuild_command(section, folder, meta)  # for shards that are not the corpus as read now
    rebuild = "" if command is None else f"to rebuild them from the corpus as it is now, run {command}; or "
    if meta.get("corpus_fingerprint") != corpus.fingerprint():
        raise RecipeError(f"data.corpus: {folder} holds shards of another corpus than {section.corpus!r}"
                          f"{_corpus_change(meta, corpus)}; {rebuild}{fix}")
    if not read_as_now(meta, corpus):
        raise RecipeError(f"data.corpus: {folder} holds shards an older Heron made from this corpus, reading its "
                          f"'\\r\\n' and '\\r' line endings as '\\n' (they are kept now); {rebuild}{fix}")
    made_with = meta.get(VOCAB_REQUESTED, meta.get("vocab_size"))
    if section.tokenizer is None and made_with != section.vocab_size:
        raise RecipeError(f"data.vocab_size: {folder} holds shards made with a {made_with}-token tokenizer, "
                          f"not {section.vocab_size}; {fix}")


def _corpus_change(meta: dict[str, Any], corpus: Corpus) -> str:
    """What shards' meta.json can tell of how `corpus` differs from the one they were made from: it
    records how many files that one had (documents per split, and undecodable ones skipped), not which."""
    try:
        then = sum(int(meta[split]["documents"]) for split in SPLITS) + len(meta.get("skipped_files", []))
    except (KeyError, TypeError, ValueError):
        return ""  # a meta.json Heron did not write
    if then == len(corpus):
        return (f": they were made from {then} files, as many as it holds now, so files were renamed, replaced or "
                "changed (or an older Heron keyed them otherwise)")
    linked = len(corpus.in_linked_folders()) if len(corpus) > then else 0
    note = (f", {linked} of them in linked folders (an older Heron did not follow links to folders in a corpus "
            "folder)") if linked else ""
    return f": they were made from {then} files, it holds {len(corpus)} now{note}"


def _rebuild_command(section: DataSection, folder: Path, meta: dict[str, Any]) -> str | None:
    """The `heron data prepare` that rebuilds `folder` from the recipe's corpus with the tokenizer `_load` takes
    (data.tokenizer, else the folder's); None if there is none, or if its size (meta.json's) is not data.vocab_size:
    train would refuse the new shards too."""
    if not _tokenizer_path(section, folder).is_file():
        return None
    if section.tokenizer is None and meta.get("vocab_size") != section.vocab_size:
        return None
    sources = [] if section.corpus == "default" else list(section.corpus)
    seed = [] if section.split_seed == 0 else ["--seed", str(section.split_seed)]
    return shlex.join(["heron", "data", "prepare", *sources, "--tokenizer", section.tokenizer or str(folder), *seed,
                       "--out", str(folder)])


def _check_room(folder: Path) -> None:
    """Shards are prepared into a new or empty folder (a tokenizer, or what a killed
    preparation left: shard files, hidden temporaries, may be there), never among other files."""
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"data.shards: {folder} is a file; name a folder for the shards")
    if not folder.is_dir():
        return
    others = sorted(p.name for p in folder.iterdir()
                    if p.name not in TOKENIZER_FILES and not is_shard_file(p.name) and not p.name.startswith("."))
    if others:
        raise RecipeError(f"data.shards: {folder} holds no shards ({META_FILE}) but other files ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}); name a new or empty folder to prepare them in")


def _tokenizer(section: DataSection, folder: Path) -> Tokenizer | None:
    """The shards' tokenizer: data.tokenizer (a tokenizer.json, or a folder holding one), else the
    one the shard folder carries, Heron's or an imported model's (with its tokenizer_config.json)."""
    path = _tokenizer_path(section, folder)
    if not path.is_file():
        if section.tokenizer is not None:
            raise RecipeError(f"data.tokenizer: no tokenizer file at {path}")
        return None
    try:
        return load_tokenizer(path.parent) if path.name == TOKENIZER_FILE else HeronTokenizer.load(path)
    except ValueError as err:
        raise RecipeError(f"data.tokenizer: {err}") from None


def _tokenizer_path(section: DataSection, folder: Path) -> Path:
    named = None if section.tokenizer is None else Path(section.tokenizer)
    if named is not None and named.is_dir():
        return named / TOKENIZER_FILE
    return named if named is not None else folder / TOKENIZER_FILE


__all__ = ["TrainData", "given_data", "resolve_data", "synthetic_data"]
