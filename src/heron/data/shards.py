"""Tokenised corpora on disk: flat token files plus a meta.json, memory-mapped for training.

Layout of a shard folder:

    meta.json            what made the shards (tokenizer and corpus hashes, split and text rules) and token counts
    tokenizer.json       the tokenizer that made them, so training on the folder can ship it
    train_000000.bin     raw token ids, little-endian uint16 (uint32 if the vocabulary exceeds 65536)
    val_000000.bin       ...

Documents are joined into one stream per split, each followed by `<|eos|>`.
meta.json is written last, so a folder with a meta.json holds complete shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from heron.data.corpus import Corpus
from heron.store.atomic import process_alive
from heron.tokenizer import Tokenizer, load_tokenizer
from heron.tokenizer.bpe import TOKENIZER_FILE
from heron.tokenizer.pretrained import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from heron.tokenizer.pretrained import GENERATION_CONFIG_FILE

logger = logging.getLogger(__name__)

SHARD_FORMAT = 1
META_FILE = "meta.json"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE)  # what a tokenizer's save writes
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.02  # ~15 files / ~250k tokens of the default stdlib corpus
DEFAULT_SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MB as uint16, well under any file-size limit
_ENCODE_BATCH_CHARS = 4 << 20  # text handed to the Rust encoder per call: bounds memory, keeps all cores busy
_PIECE_CHARS = 1 << 20  # a longer document goes to the encoder in pieces of about this size, several per batch
_TMP_PREFIX = ".shards-"  # the temporary folder a preparation writes in, inside the shard folder: .shards-{pid}-...
# The fingerprint of the user's own tokenizer.json in a shard folder (`users_tokenizer`): written before shards
# are made with it and kept beside them, so no later preparation (nor a killed one's rerun) takes it for Heron's.
USERS_TOKENIZER = ".users-tokenizer"
# A "document" is a file that decodes (others are skipped). The text is stored in meta.json and
# compared on reuse: rewording it would rebuild every shard set.
SPLIT_RULE = (
    "val if int.from_bytes(sha256(f'{seed}:{key}').digest()[:8], 'big') / 2**64 < val_fraction, "
    "key = document path relative to its corpus source; if no document qualifies, "
    "the one with the smallest value"
)
# How a document's text is read (corpus._read_text): stored in meta.json and compared on reuse,
# as SPLIT_RULE is. Sets made before it was recorded are reused for a corpus without "\r" only.
TEXT_RULE = "UTF-8, a leading BOM dropped, line endings kept as in the file"


_TOKEN_DTYPES = ("uint16", "uint32")
_SHARD_NAME = re.compile(rf"(?:{'|'.join(SPLITS)})_\d{{6,}}\.bin")  # what _ShardWriter names its files


def is_shard_file(name: str) -> bool:
    """Whether `name` is one a preparation gives its shard files (`train_000000.bin`, ...): with no
    meta.json beside it, such a file is what a preparation killed while installing its shards
    left, which the next one replaces rather than refuse the folder over."""
    return _SHARD_NAME.fullmatch(name) is not None


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id in [0, vocab_size)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ----- the split ---------------------------------------------------------------


def split_value(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key) alone: adding files never moves others."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def validation_keys(
    keys: Iterable[str], val_fraction: float, seed: int, decodes: Callable[[str], bool] = lambda key: True
) -> set[str]:
    """The document keys that go to validation under SPLIT_RULE.

    `decodes` says whether a key's document is text; it is asked lazily, in
    order of value, so only the few documents near the front are read.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    values = {key: split_value(key, seed) for key in keys}
    chosen = {key for key, value in values.items() if value < val_fraction}
    if val_fraction == 0 or any(decodes(key) for key in chosen):
        return chosen
    # A small corpus may have no decodable key under the threshold; keep a validation set anyway,
    # if one decodable document is left for training.
    usable = (key for key in sorted(values, key=values.__getitem__) if decodes(key))
    first, second = next(usable, None), next(usable, None)
    return chosen if second is None else chosen | {first}


# ----- reading ---------------------------------------------------------------


class ShardedTokens:
    """One token stream read across several memory-mapped shards: len(), [i] and [a:b]."""

    def __init__(self, shards: list[np.ndarray]) -> None:
        self.shards = shards
        self._starts = np.cumsum([0] + [len(s) for s in shards])  # (n_shards + 1,)
        self.dtype = shards[0].dtype if shards else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int | slice) -> np.ndarray | np.integer:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError(f"step: ShardedTokens supports contiguous slices only (step 1), got {step}")
            return self._slice(start, max(start, stop))
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self):
            raise IndexError(f"token index {index} out of range for {len(self)} tokens")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.shards[shard][i - self._starts[shard]]

    def _slice(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        for s in range(max(first, 0), len(self.shards)):
            lo, hi = self._starts[s], self._starts[s + 1]
            if lo >= stop:
                break
            pieces.append(self.shards[s][max(start, lo) - lo : min(stop, hi) - lo])
        if len(pieces) == 1:
            return pieces[0]  # a view into the memmap: no copy
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self)} tokens in {len(self.shards)} shards, {self.dtype})"


@dataclass(frozen=True)
class ShardSet:
    path: Path
    train: ShardedTokens
    val: ShardedTokens
    meta: dict
    reused: bool = False  # True when prepare_shards found matching shards and did no work


def check_val_scorable(shards: ShardSet) -> None:
    """ValueError naming the folder when its validation split holds too few tokens to score one."""
    if len(shards.val) < 2:
        raise ValueError(f"{shards.path}: the validation split holds {len(shards.val)} tokens; nothing to score "
                         "(prepare the shards with more files, or a larger --val-fraction)")


def check_shards_fit(shards: ShardSet, model: str, *, vocab_size: int, tokenizer: object | None = None) -> None:
    """Refuse shards that are not in `model`'s token ids: made with another tokenizer (where
    both record which: `tokenizer.fingerprint()` against the shards' metadata), or holding
    ids past its vocabulary of `vocab_size`. Otherwise perplexity, calibration or
    distillation would run on the wrong text, silently."""
    made_with = shards.meta.get("tokenizer_sha256")
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if made_with and fingerprint is not None and fingerprint() != made_with:
        raise ValueError(f"{shards.path}: made with another tokenizer than {model}'s; tokenise the corpus with "
                         "the tokenizer in the model's folder (heron data prepare SOURCES --tokenizer MODEL_FOLDER)")
    shard_vocab = shards.meta.get("vocab_size")  # absent from a hand-made folder
    if shard_vocab is not None and int(shard_vocab) > vocab_size:
        raise ValueError(f"{shards.path}: its tokenizer has {shard_vocab} tokens, but {model} has a vocabulary "
                         f"of {vocab_size}")
    if shard_vocab is None:  # else load_shards checked the ids against it
        check_ids_below(shards, vocab_size, f"{model} has")


def check_ids_below(shards: ShardSet, vocab_size: int, owner: str, tokenizer: str = "MODEL_FOLDER") -> None:
    """ValueError naming the first shard file holding a token id >= `vocab_size`, its largest id, and
    whose vocabulary it is (`owner`: "tiny has"), with the command that makes the shards with
    `tokenizer`. Read once at load, not per batch: past the vocabulary, an id fails deep in the
    embedding lookup ("index out of range in self"), or reads stray memory on some backends. A
    max over a memmap streams its pages and copies nothing, whatever the byte order."""
    for split in SPLITS:
        for shard, tokens in zip(shards.meta[split]["shards"], getattr(shards, split).shards):
            largest = int(tokens.max()) if len(tokens) else -1
            if largest >= vocab_size:
                raise ValueError(f"shard {shards.path / shard['file']} holds token id {largest}, but {owner} a "
                                 f"vocabulary of {vocab_size} (ids below it); make the shards with the model's "
                                 f"tokenizer: heron data prepare SOURCES --tokenizer {tokenizer} --out NEW_FOLDER")


def load_shards(path: str | os.PathLike[str]) -> ShardSet:
    """Memory-map the shards in a folder written by prepare_shards."""
    folder = Path(path)
    meta = _read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"no shard metadata at {folder / META_FILE}; make the shards with "
                                "`heron data prepare` (prepare_shards)")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")  # files are little-endian on every host
    splits = {}
    for split in SPLITS:
        arrays = []
        for shard in meta[split]["shards"]:
            file = folder / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not file.is_file() or file.stat().st_size != expected:
                raise ValueError(f"shard {file} is missing or not {expected} bytes as {META_FILE} says")
            arrays.append(np.memmap(file, dtype=dtype, mode="r"))
        splits[split] = ShardedTokens(arrays)
    shards = ShardSet(path=folder, train=splits["train"], val=splits["val"], meta=meta)
    if meta.get("vocab_size") is not None:  # a file past it is another set's, or damaged: models are sized to it
        check_ids_below(shards, meta["vocab_size"], f"{META_FILE} gives its tokenizer")
    return shards


def _read_meta(folder: Path) -> dict | None:
    file = folder / META_FILE
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        if meta.get("format") != SHARD_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {SHARD_FORMAT}")
        _check_layout(meta)
        return meta
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        raise ValueError(f"{file} is not valid shard metadata: {exc}") from exc


def _check_layout(meta: dict) -> None:
    """Refuse metadata that would have Heron read tokens as another type (`"O"`: Python objects,
    read from the file's bytes as pointers) or read, or delete on the next preparation, a
    file outside the folder: a shard's name must be a bare file name. A vocab_size, where
    given, must be a count: load_shards checks every id against it."""
    if meta.get("dtype") not in _TOKEN_DTYPES:
        raise ValueError(f"dtype {meta.get('dtype')!r} is not one of {', '.join(_TOKEN_DTYPES)}")
    vocab_size = meta.get("vocab_size")  # absent from a hand-made folder; else the bound on every id
    if vocab_size is not None and (type(vocab_size) is not int or vocab_size < 1):
        raise ValueError(f"vocab_size {vocab_size!r} is not a count of tokens")
    for split in SPLITS:
        for shard in meta[split]["shards"]:
            name, tokens = shard["file"], shard["tokens"]
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"{split} shard file {name!r} is not a file name in the folder")
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
                raise ValueError(f"{split} shard {name}: tokens {tokens!r} is not a count")


# ----- writing ---------------------------------------------------------------


class _ShardWriter:
    """Appends token arrays to `{split}_000000.bin`, `{split}_000001.bin`, ... of at most shard_tokens each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens"} per shard, in order
        self.documents = 0
        self._file = None

    def write(self, ids: np.ndarray, ends_document: bool = True) -> None:
        self.documents += ends_document
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self._file.write(ids[:room].astype("<" + self.dtype.str[1:], copy=False).tobytes())
            self.shards[-1]["tokens"] += len(ids[:room])
            ids = ids[room:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self._file = open(self.folder / name, "wb")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict:
        tokens = sum(s["tokens"] for s in self.shards)
        return {"tokens": tokens, "documents": self.documents, "shards": self.shards}


def prepare_shards(
    corpus: Corpus,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike[str],
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    note: dict | None = None,
    tokenizer_source: str | os.PathLike[str] | None = None,
) -> ShardSet:
    """Tokenise a corpus into train/val shard files in out_dir; reuse them if inputs are unchanged.

    Files under out_dir are no part of the corpus (an out_dir inside a corpus folder would
    otherwise take in its own shards and metadata on the next run). `note` adds keys to
    meta.json (what the caller asked for, to check later); shards are reused only if they match.
    The tokenizer goes beside the shards, unless out_dir holds the user's own (`users_tokenizer`;
    or `tokenizer_source`, where the tokenizer was read from, is that file): that one is kept and
    marked, and a preparation with another tokenizer is refused rather than written over it.

    Parallelism: documents go to the Rust batch encoder (`encode_batch`),
    which spreads them over all cores with Rayon (cap it with the
    RAYON_NUM_THREADS environment variable). Measured on the stdlib corpus it
    is as fast as a process pool that re-loads the tokenizer in each worker,
    without the start-up and the pickling of id lists back to the parent.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos token to end each document with (tokenizer_config.json: eos_token)")
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder}: a file; shards go in a folder")
    corpus = corpus.excluding(folder)
    dtype = token_dtype(tokenizer.vocab_size)
    inputs = (note or {}) | {
        "format": SHARD_FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer_sha256": tokenizer.fingerprint(),
        "corpus_fingerprint": corpus.fingerprint(),
        "split": {"rule": SPLIT_RULE, "val_fraction": val_fraction, "seed": seed},
        "text": TEXT_RULE,
        "shard_tokens": shard_tokens,
    }
    users = _keep_users_tokenizer(folder, tokenizer, tokenizer_source)
    reusable = _reusable(folder, inputs, corpus)
    if reusable is not None:
        logger.info("reusing shards in %s: %s matches this corpus and tokenizer", folder, META_FILE)
        _mark_users_tokenizer(folder, users)
        if users is None and _fingerprint_of(folder) != inputs["tokenizer_sha256"]:  # missing in old sets, or damaged
            tokenizer.save(folder)
        return reusable
    val_keys = validation_keys(corpus.keys, val_fraction, seed, corpus.decodes)  # checks val_fraction: before mkdir
    old_files = _replaceable_files(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(folder)
    _mark_users_tokenizer(folder, users)  # before any shard goes in
    with tempfile.TemporaryDirectory(dir=folder, prefix=f"{_TMP_PREFIX}{os.getpid()}-") as tmp:
        writers = {s: _ShardWriter(Path(tmp), s, dtype, shard_tokens) for s in SPLITS}
        bar = tqdm(total=len(corpus), unit="doc", desc="tokenising", disable=not progress)
        for batch in _piece_batches(corpus.items(), tokenizer, _PIECE_CHARS, _ENCODE_BATCH_CHARS):
            texts = [piece.text for piece in batch]
            for piece, ids in zip(batch, tokenizer.encode_batch(texts, allow_special=False)):
                split = "val" if piece.key in val_keys else "train"
                writers[split].write(np.array(ids + [tokenizer.eos_id] * piece.last, dtype=dtype), piece.last)
            bar.update(sum(piece.last for piece in batch))
        bar.close()
        corpus.check_decodable()
        for writer in writers.values():
            writer.close()
        meta = inputs | {s: writers[s].summary() for s in SPLITS}
        keys = {doc.path: doc.key for doc in corpus.documents}  # a path as spelled depends on the working directory
        meta["skipped_files"] = [keys[p] for p in corpus.skipped]
        if users is None:
            tokenizer.save(Path(tmp))
        _install(Path(tmp), folder, meta, old_files, with_tokenizer=users is None)
    if corpus.skipped:
        logger.warning("skipped %d undecodable (non-UTF-8) files", len(corpus.skipped))
    return load_shards(folder)


@dataclass(frozen=True)
class _Piece:
    key: str  # the document's
    text: str
    last: bool  # the document's last piece: its <|eos|> follows


def _piece_batches(items: Iterator[tuple[str, str]], tokenizer: Tokenizer, piece_chars: int,
                   batch_chars: int) -> Iterator[list[_Piece]]:
    """Documents in batches of about `batch_chars` characters for the encoder, one longer than
    `piece_chars` cut into pieces that encode exactly as it would whole
    (`HeronTokenizer.plain_pieces`), so memory stays bounded by the batch, not by the largest
    document, and one long document still keeps every core busy."""
    batch: list[_Piece] = []
    size = 0
    for key, text in items:
        bounds = tokenizer.plain_pieces(text, piece_chars)
        for i, (start, stop) in enumerate(bounds):
            batch.append(_Piece(key, text[start:stop], last=i == len(bounds) - 1))
            size += stop - start
            if size >= batch_chars:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _fingerprint_of(folder: Path) -> str | None:
    try:
        return load_tokenizer(folder).fingerprint()
    except (OSError, ValueError):
        return None


def users_tokenizer(folder: Path) -> str | None:
    """The fingerprint of `folder`'s tokenizer.json if it is the user's own, None if there is none or it is
    the one a preparation installed beside its shards (which the next one replaces with its shards).

    It is the user's when nothing a preparation makes lies beside it (an install moves the shards in
    before their tokenizer), or when the mark (`USERS_TOKENIZER`) names it: one written over a marked
    one since is not. A ValueError, naming the file, if it is the user's and not a tokenizer Heron can read."""
    if not (folder / TOKENIZER_FILE).is_file():
        return None
    if not (folder / META_FILE).is_file() and not any(is_shard_file(p.name) for p in folder.iterdir()):
        return load_tokenizer(folder).fingerprint()
    mark = folder / USERS_TOKENIZER
    if not mark.is_file():
        return None
    found = load_tokenizer(folder).fingerprint()
    return found if mark.read_text(encoding="utf-8").strip() == found else None


def _mark_users_tokenizer(folder: Path, fingerprint: str | None) -> None:
    """Mark `folder`'s tokenizer.json as the user's (its `fingerprint`), or with None remove a mark of one removed
    since. Beside shard files an unmarked one would read as a killed install's, and be replaced by the next."""
    if fingerprint is not None:
        (folder / USERS_TOKENIZER).write_text(fingerprint + "\n", encoding="utf-8")
    else:
        (folder / USERS_TOKENIZER).unlink(missing_ok=True)


def _keep_users_tokenizer(folder: Path, tokenizer: Tokenizer, source: str | os.PathLike[str] | None) -> str | None:
    """The fingerprint to mark `folder`'s tokenizer.json with if it is the user's own (`users_tokenizer`, or
    the `source` the tokenizer was read from), which the shards are then made with and which stays as it is;
    None if it is not. Refused, naming both files, when it is another tokenizer than `tokenizer`: installing
    that one beside the shards would replace it."""
    file = folder / TOKENIZER_FILE
    named = None if source is None else Path(source)
    if named is not None and named.is_dir():  # a folder holding the tokenizer, as load_tokenizer reads it
        named = named / TOKENIZER_FILE
    if named is not None and file.is_file() and named.resolve() == file.resolve():
        return _fingerprint_of(folder) or tokenizer.fingerprint()  # as `users_tokenizer` reads it back
    users = users_tokenizer(folder)
    if users is not None and users != tokenizer.fingerprint():
        given = "the tokenizer given" if named is None else str(named)
        raise FileExistsError(f"{file}: your own tokenizer, not {given}; making shards in {folder} with that one "
                              f"would replace yours with it: prepare them in another folder, or move {file} out "
                              "of it first")
    return users


def read_as_now(meta: dict[str, Any], corpus: Corpus) -> bool:
    """Whether shards with this meta.json hold `corpus`'s text as it is read now (`TEXT_RULE`). A set
    made before the rule was recorded read "\r\n" and "\r" as "\n": the same text, if no file holds "\r"."""
    return meta.get("text") == TEXT_RULE or ("text" not in meta and not corpus.holds_carriage_returns())


def _reusable(folder: Path, inputs: dict, corpus: Corpus) -> ShardSet | None:
    """The existing shards if their meta.json was made from exactly these inputs, else None."""
    try:
        meta = _read_meta(folder)
    except ValueError:
        return None  # unreadable metadata: rebuild over it
    if meta is None or any(meta.get(k) != v for k, v in inputs.items() if k != "text"):
        return None
    if not read_as_now(meta, corpus):
        return None
    try:
        shards = load_shards(folder)
    except ValueError:
        return None
    return ShardSet(path=shards.path, train=shards.train, val=shards.val, meta=shards.meta, reused=True)


def _replaceable_files(folder: Path) -> list[Path]:
    """The shard files of the Heron shard set in `folder`, which a new preparation replaces.

    Any other file there is the user's: refused by name rather than written over or deleted.
    Hidden entries (our temporary folders) and the tokenizer (the README's
    `--tokenizer FOLDER/tokenizer.json --out FOLDER`) are allowed. With no meta.json, files
    named as shards are a set whose install was killed (`_install` removes meta.json first).
    """
    if not folder.is_dir():
        return []
    try:
        meta = _read_meta(folder)
    except ValueError as exc:
        raise FileExistsError(f"{exc}; it is not Heron's to write over: prepare the shards in a new or "
                              "empty folder") from None
    if meta is None:
        ours = [p for p in folder.iterdir() if is_shard_file(p.name) and p.is_file()]
    else:
        ours = [folder / shard["file"] for split in SPLITS for shard in meta[split]["shards"]]
    allowed = {META_FILE, *TOKENIZER_FILES, *(p.name for p in ours)}
    others = sorted(p.name for p in folder.iterdir() if p.name not in allowed and not p.name.startswith("."))
    if others:
        raise FileExistsError(f"{folder} holds files that are not a Heron shard set's ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}); prepare the shards in a new or empty folder")
    return ours


def _sweep_stale_temps(folder: Path) -> None:
    """Remove what killed preparations left: temporary folders whose process is gone, never
    those of a preparation still running in the same folder."""
    for leftover in folder.glob(f"{_TMP_PREFIX}*"):
        pid = leftover.name[len(_TMP_PREFIX):].split("-")[0]
        if not (pid.isdigit() and process_alive(int(pid))):
            shutil.rmtree(leftover, ignore_errors=True)


def _install(tmp: Path, folder: Path, meta: dict, old_files: list[Path], *, with_tokenizer: bool = True) -> None:
    """Move new shards and their tokenizer (unless `with_tokenizer` is False: the user's is there) into place,
    deleting the old set's shard files (only those).

    meta.json goes first-out and last-in, so it never describes half a set. The new shards go in
    (over the old ones of the same name) before the old set's others go, so until meta.json is back
    shard files lie beside any tokenizer.json an install put here: alone, after a kill, it would
    read as the user's own (`users_tokenizer`) and make the next set.
    """
    (folder / META_FILE).unlink(missing_ok=True)
    new_files = [shard["file"] for split in SPLITS for shard in meta[split]["shards"]]
    for name in new_files:
        os.replace(tmp / name, folder / name)
    for old in old_files:
        if old.name not in new_files:
            old.unlink(missing_ok=True)
    for name in TOKENIZER_FILES if with_tokenizer else ():  # an imported tokenizer writes its config too
        if (tmp / name).is_file():
            os.replace(tmp / name, folder / name)
        else:
            (folder / name).unlink(missing_ok=True)  # an imported tokenizer's, left by an earlier set
    meta_tmp = tmp / META_FILE
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(meta_tmp, folder / META_FILE)

