"""Text corpora from files, folders and glob patterns on the local disk.

Every document has a *key*: its path relative to the source that named it
(a folder, a glob's fixed prefix, or just the file name). Keys, not absolute
paths, decide the train/validation split and enter the fingerprint, so a
corpus copied to another machine splits and hashes the same.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import logging
import os
import re
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")
# Folders in the standard library that are not the library itself.
_STDLIB_JUNK = frozenset({"site-packages", "dist-packages", "__pycache__"})
_STDLIB_TESTS = frozenset({"test", "tests", "idle_test"})
# What generators write at the top of their output: the keywords of StarCoder's
# auto-generated filter (Li et al. 2023, The Stack's preprocessing), and gencodec.py's
# line atop every character-mapping codec table in encodings/.
_GENERATED_MARKER = re.compile(r"auto-?generated|automatically generated|generated from .* with gencodec\.py", re.I)
GENERATED_HEAD_LINES = 5


@dataclass(frozen=True)
class Document:
    key: str  # posix path relative to its source; stable across machines
    path: Path


class Corpus:
    """An ordered set of text files, deduplicated by resolved path (not by content:
    two identical files are two documents, and may land in different splits).

    `sources` are files, folders (walked recursively, hidden entries skipped)
    and glob patterns (`**` allowed). `extensions` filters the files found by
    walking a folder (None keeps all); files named directly or by a glob are
    taken as named. `keep`, when given, is asked about every file found and
    leaves out those it answers False for. Undecodable (non-UTF-8) files are
    skipped while iterating; `skipped` lists those seen in the latest pass. A
    document's text is its bytes decoded (a leading BOM dropped), line endings
    as the file has them: the tokenizer is byte-level and the fingerprint hashes
    the bytes. Symlinks to files and to folders are followed; dangling ones, and
    a link to a folder that holds it (followed, it would loop), are left out with
    a warning. A file reached through two sources (or a symlink) keeps its
    shortest key, then the smallest, so the keys, hence the split and
    fingerprint, do not depend on the order of sources.
    """

    def __init__(
        self,
        sources: Sequence[str | os.PathLike[str]],
        extensions: Sequence[str] | None = None,
        exclude_dirs: Sequence[str] = (),
        keep: Callable[[Path], bool] | None = None,
    ) -> None:
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        if not sources:
            raise ValueError("a corpus needs at least one source path or pattern")
        self.extensions = None if extensions is None else tuple(e if e.startswith(".") else f".{e}" for e in extensions)
        self.exclude_dirs = frozenset(exclude_dirs)
        seen: dict[Path, Document] = {}
        for source in sources:
            for doc in self._expand(str(source)):
                other = seen.setdefault(doc.path.resolve(), doc)
                if _key_order(doc) < _key_order(other):
                    seen[doc.path.resolve()] = doc
        kept = [doc for doc in seen.values() if keep is None or keep(doc.path)]
        self.documents = sorted(kept, key=lambda d: (d.key, str(d.path)))
        self.skipped: list[Path] = []

    # ----- discovery --------------------------------------------------------

    def _expand(self, source: str) -> list[Document]:
        # An existing path is a path even when its name holds glob characters (`br[1]`).
        if Path(source).is_dir():
            found = self._walk(Path(source), Path(source))
        elif Path(source).is_file():
            found = [_document(Path(source), Path(source).parent)]
        elif _GLOB_CHARS & set(source):
            root = _glob_root(source)
            found = []
            for match in sorted(glob.glob(source, recursive=True)):
                path = Path(match)
                found += self._walk(path, root) if path.is_dir() else [_document(path, root)]
            found = [doc for doc in found if _readable_file(doc.path)]
        else:
            raise FileNotFoundError(f"corpus source {source!r} does not exist")
        if not found:
            wanted = f" with extensions {list(self.extensions)}" if self.extensions else ""
            raise FileNotFoundError(f"corpus source {source!r} matched no files{wanted}")
        return found

    def _walk(self, folder: Path, root: Path) -> list[Document]:
        found = []
        # The real folders on each walked folder's own path, itself included: a link to one of them
        # would loop. A folder reached twice otherwise (two links to it) is walked twice, and the
        # dedup by resolved path keeps each file's shortest key, as for two links to a file.
        on_path = {folder: frozenset({folder.resolve()})}
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            here = Path(dirpath)
            above = on_path.pop(here)
            # Pruning in place stops os.walk from descending; sorted for a stable walk.
            kept = []
            for name in sorted(d for d in dirnames if not d.startswith(".") and d not in self.exclude_dirs):
                real = (here / name).resolve()
                if real in above:
                    logger.warning("skipping %s: a link to %s, which holds it; followed, it would loop",
                                   here / name, real)
                    continue
                on_path[here / name] = above | {real}
                kept.append(name)
            dirnames[:] = kept
            for name in sorted(filenames):
                if name.startswith(".") or (self.extensions and not name.endswith(self.extensions)):
                    continue
                if _readable_file(Path(dirpath) / name):
                    found.append(_document(Path(dirpath) / name, root))
        return found

    def excluding(self, folder: str | os.PathLike[str]) -> Corpus:
        """This corpus without the documents under `folder` (itself, if none are)."""
        root = Path(folder).resolve()
        kept = [d for d in self.documents if not d.path.resolve().is_relative_to(root)]
        if len(kept) == len(self.documents):
            return self
        if not kept:
            raise FileNotFoundError(f"the corpus holds no files outside {folder}, where the output goes")
        corpus = copy.copy(self)
        corpus.documents, corpus.skipped = kept, []
        return corpus

    # ----- access -----------------------------------------------------------

    @property
    def paths(self) -> list[Path]:
        return [d.path for d in self.documents]

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.documents]

    def __len__(self) -> int:
        return len(self.documents)

    def items(self) -> Iterator[tuple[str, str]]:
        """(key, text) for every decodable document, in order."""
        self.skipped = []
        for doc in self.documents:
            text = _read_text(doc.path)
            if text is None:
                self.skipped.append(doc.path)
                continue
            yield doc.key, text

    def decodes(self, key: str) -> bool:
        """Whether the document(s) with this key are UTF-8 text (reads them)."""
        return any(_read_text(d.path) is not None for d in self.documents if d.key == key)

    def holds_carriage_returns(self) -> bool:
        r"""Whether any document's bytes hold a "\r": text read before line endings were kept
        (shards made then) turned "\r\n" and "\r" into "\n", so differs for such a corpus."""
        return any(b"\r" in doc.path.read_bytes() for doc in self.documents)

    def in_linked_folders(self) -> list[str]:
        """Keys of the documents reached through a link to a folder below their source (an older Heron's
        walk of a corpus folder did not follow such links)."""
        return [doc.key for doc in self.documents
                if any(doc.path.parents[i].is_symlink() for i in range(len(Path(doc.key).parts) - 1))]

    def check_decodable(self) -> None:
        """After a pass over the texts: a ValueError if every file was skipped as undecodable."""
        if self.documents and len(self.skipped) == len(self.documents):
            raise ValueError(f"no file of the corpus is UTF-8 text: all {len(self.documents)} were skipped as "
                             f"undecodable (first: {self.skipped[0]})")

    def __iter__(self) -> Iterator[str]:
        return (text for _, text in self.items())

    def fingerprint(self) -> str:
        """sha256 over every document's key, size and content bytes (streamed)."""
        digest = hashlib.sha256()
        for doc in self.documents:
            digest.update(f"{doc.key}\0{doc.path.stat().st_size}\0".encode("utf-8"))
            with open(doc.path, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"Corpus({len(self)} documents)"


def _document(path: Path, root: Path) -> Document:
    return Document(key=path.relative_to(root).as_posix(), path=path)


def _key_order(doc: Document) -> tuple[int, str]:
    return len(doc.key), doc.key


def _readable_file(path: Path) -> bool:
    """Whether `path` is (or links to) a regular file; False, with a warning naming it, for a symlink
    to nothing (or a loop) and for a pipe, socket or device, whose read would block or fail."""
    if path.is_file():
        return True
    what = "a special file (pipe, socket or device)" if path.exists() else "a dangling symlink (or a loop)"
    logger.warning("skipping %s: %s", path, what)
    return False


def _read_text(path: Path) -> str | None:
    r"""The file's text, None if it is not UTF-8. utf-8-sig: a BOM, as Windows editors write, is not text.
    Line endings stay as they are ("\r\n", "\r"): read_text would turn them into "\n"."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _glob_root(pattern: str) -> Path:
    """The fixed folder in front of a glob's first wildcard: keys are taken relative to it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def is_generated(path: Path) -> bool:
    """Whether a file says in its first lines that a program wrote it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = "".join(line for _, line in zip(range(GENERATED_HEAD_LINES), f))
    return _GENERATED_MARKER.search(head) is not None


def default_corpus(include_tests: bool = False) -> Corpus:
    """The running Python's standard library source (`.py` files), present on every machine.

    Installed packages are left out. The test suite (about 60% of the bytes)
    is left out by default: it holds deliberately mis-encoded and
    mis-formatted files, and the rest is ample for a small model. Generated
    files are left out too (`is_generated`; ~17% of the rest, in 3.11: 65
    codec tables and pydoc's topic texts, 6% on its own): lookup tables
    that a small model learns first and then recites, prompted with
    `import `, instead of code.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    exclude = _STDLIB_JUNK if include_tests else _STDLIB_JUNK | _STDLIB_TESTS
    return Corpus([stdlib], extensions=[".py"], exclude_dirs=sorted(exclude), keep=lambda p: not is_generated(p))
