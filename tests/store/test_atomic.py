"""Atomic writes: whole or not at all, a temp of its own per write, file and folder fsynced."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from heron.store import atomic
from heron.store.atomic import (
    atomic_path, atomic_writer, is_partial_write, partial_path, write_bytes_atomic, write_file_atomic,
    write_text_atomic,
)


def test_two_writers_of_one_file_never_share_a_temp(tmp_path: Path) -> None:
    """Both writes are held mid-write at once: each has its own temp, and the file ends whole."""
    target = tmp_path / "cache.bin"
    both_writing = threading.Barrier(2, timeout=30)
    temps: dict[int, tuple[str, bool]] = {}  # writer: (its temp, recognised as a partial write of target)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        def write(f) -> None:
            f.write(bytes([n]) * 1000)
            temps[n] = (f.name, is_partial_write(f.name, target.name))
            both_writing.wait()  # neither renames before both have written into their temps
            f.write(bytes([n]) * 1000)
        try:
            write_file_atomic(target, write)
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert temps[1][0] != temps[2][0] and temps[1][1] and temps[2][1]
    assert target.read_bytes() in (bytes([1]) * 2000, bytes([2]) * 2000)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_killed_write_leaves_the_old_file_and_a_temp_is_partial_write_knows(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    target.write_bytes(b"the last good state")
    kill_midway = ("import os, signal, sys\n"
                   "from heron.store.atomic import write_file_atomic\n"
                   "def write(f):\n"
                   "    f.write(b'half a state'); f.flush()\n"
                   "    os.kill(os.getpid(), signal.SIGKILL)\n"
                   "write_file_atomic(sys.argv[1], write)\n")
    done = subprocess.run([sys.executable, "-c", kill_midway, str(target)], capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr
    assert target.read_bytes() == b"the last good state"
    left = [p for p in tmp_path.iterdir() if p != target]
    assert len(left) == 1 and left[0].read_bytes() == b"half a state"
    assert is_partial_write(left[0], "state.pt")
    assert not is_partial_write(left[0], "state") and not is_partial_write(target, "state.pt")


def test_is_partial_write_knows_its_own_names_only(tmp_path: Path) -> None:
    ours = partial_path(tmp_path / "state.pt")
    ours.write_bytes(b"")
    assert ours.parent == tmp_path and is_partial_write(ours, "state.pt")
    for name in (".state.pt.backup.partial", ".state.pt.0123abcd.tmp", ".state.pt.0123456789AB.partial"):
        (tmp_path / name).write_bytes(b"")
        assert not is_partial_write(tmp_path / name, "state.pt"), name
    folder = partial_path(tmp_path / "model")
    folder.mkdir()
    assert not is_partial_write(folder, "model")  # a folder is no write's temp: never deleted as one
    assert not is_partial_write(partial_path(tmp_path / "gone"), "gone")  # nothing there


def test_the_file_and_then_its_folder_are_fsynced(tmp_path: Path, monkeypatch) -> None:
    synced: list[tuple[bool, int]] = []  # (a folder?, inode), in order
    real_fsync = os.fsync

    def record(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((stat.S_ISDIR(info.st_mode), info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", record)
    target = write_text_atomic(tmp_path / "sub" / "card.md", "text\n")
    assert synced == [(False, target.stat().st_ino), (True, target.parent.stat().st_ino)]  # rename keeps the inode


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")
    with pytest.raises(OSError, match="disk full"), atomic_writer(target) as f:
        f.write("new, half")
        raise OSError("disk full")
    with pytest.raises(RuntimeError, match="no"), atomic_path(target) as tmp:
        tmp.write_text("by name, half")
        raise RuntimeError("no")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_what_callers_rely_on(tmp_path: Path) -> None:
    """Parents are made, the path comes back, a folder is refused, the text is UTF-8 as given."""
    target = tmp_path / "a" / "b" / "note.txt"
    assert write_text_atomic(target, "café\n") == target and target.read_bytes() == "café\n".encode()
    assert write_bytes_atomic(target, b"\x00\x01") == target and target.read_bytes() == b"\x00\x01"
    with atomic_path(tmp_path / "named.bin") as tmp:
        tmp.write_bytes(b"written by name")  # as gguf's writer does
    assert (tmp_path / "named.bin").read_bytes() == b"written by name"
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_text_atomic(tmp_path / "a", "x")
    assert (tmp_path / "a" / "b").is_dir()
    made = tmp_path / "mode.bin"
    write_bytes_atomic(made, b"")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(made.stat().st_mode) == 0o666 & ~umask  # not mkstemp's owner-only 0600


def test_a_replaced_file_keeps_its_permissions(tmp_path: Path) -> None:
    """Written in place a file keeps its mode; replaced by a temp it took the temp's (0666 less the
    umask), so an export its owner had made private (0600) came back readable by everyone."""
    target = tmp_path / "consent-export.json"
    for mode in (0o600, 0o640, 0o755):
        target.write_text("old\n")
        target.chmod(mode)
        write_text_atomic(target, "new\n")
        assert target.read_text() == "new\n" and stat.S_IMODE(target.stat().st_mode) == mode, oct(mode)
    target.chmod(0o600)
    with atomic_path(target) as tmp:  # a writer that makes its own file by name (gguf, matplotlib)
        tmp.unlink()
        tmp.write_bytes(b"by name")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
