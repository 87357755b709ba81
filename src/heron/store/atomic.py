"""Files written whole or not at all: the one atomic write every layer uses.

A write goes to a temporary sibling `.<name>.<12 hex digits>.partial`, made
fresh (and created exclusively) for each write, so two processes writing the
same file never write into one temp. When the writer is done the temp takes
the permission bits of the file it replaces (if any), is fsynced, renamed onto
the target (rename is atomic on POSIX) and the folder is fsynced, so that the
rename itself survives a power cut (see "Ensuring data reaches disk",
https://lwn.net/Articles/457667/). A write that fails removes
its temp; one that is killed leaves it, under a name `is_partial_write`
recognises, and a reader of the target never sees half a file.
"""
from __future__ import annotations

import os
import re
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TextIO

PathLike = str | os.PathLike[str]
PARTIAL_SUFFIX = ".partial"
_TOKEN = re.compile(r"[0-9a-f]{12}")


def partial_path(path: PathLike) -> Path:
    """A fresh name, beside `path`, for the temp of one write of it."""
    target = Path(path)
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}")


def is_partial_write(path: PathLike, name: str) -> bool:
    """Whether `path` is a file that a write of its sibling `name`, killed before its
    rename, left (never read; safe to delete once no write of `name` is running)."""
    found = Path(path)
    prefix = f".{name}."
    stem = found.name.removeprefix(prefix).removesuffix(PARTIAL_SUFFIX)
    return (found.name.startswith(prefix) and found.name.endswith(PARTIAL_SUFFIX) and bool(_TOKEN.fullmatch(stem))
            and found.is_file() and not found.is_symlink())


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine: a temp named with its writer's pid is left alone
    while that writer may still be writing it."""
    try:
        os.kill(pid, 0)  # signal 0: checks the process exists, sends nothing
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # it runs, as another user
    return True


def fsync_path(path: PathLike) -> None:
    """Flush a file's or a folder's contents to disk (a folder's: its names, so a rename lasts)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp path for a writer that opens its file by name (gguf, matplotlib); when
    the block ends without an error, the temp replaces `path` as the module docstring says,
    else it is removed. Parent folders are made; a folder at `path` is refused."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target}: is a folder; name a file to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve(target)
    try:
        yield tmp
        _keep_mode(target, tmp)
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _keep_mode(target: Path, tmp: Path) -> None:
    """Give the temp the permission bits of the file it replaces, as writing the file in place
    would keep them: a file its owner had made private (0600) came back readable by everyone."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return  # a new file: the temp's own mode, 0666 less the umask
    os.chmod(tmp, mode)


def _reserve(target: Path) -> Path:
    """A fresh temp path for `target`, created empty (mode 0666 less the umask, as any file)."""
    while True:
        tmp = partial_path(target)
        try:
            open(tmp, "x").close()
            return tmp
        except FileExistsError:  # 48 random bits met another write's: draw again
            continue


def write_file_atomic(path: PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Replace `path` atomically with what `write(binary file)` writes; returns `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Replace `path` atomically with `data`; returns `path`."""
    return write_file_atomic(path, lambda f: f.write(data))


@contextmanager
def atomic_writer(path: PathLike, newline: str | None = None) -> Iterator[TextIO]:
    """A UTF-8 text file that replaces `path` atomically when the block ends without an
    error. `newline` as in `open` ("" for the csv module)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline=newline) as f:
        yield f


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Replace `path` atomically with `text` (UTF-8); returns `path`."""
    with atomic_writer(path) as f:
        f.write(text)
    return Path(path)


__all__ = [
    "PARTIAL_SUFFIX", "atomic_path", "atomic_writer", "fsync_path", "is_partial_write", "partial_path",
    "process_alive", "write_bytes_atomic", "write_file_atomic", "write_text_atomic",
]
