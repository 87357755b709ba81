"""The audit log's tables (`heron.store.audit`): what an append asks of the database.

Counted in SQLite virtual-machine instructions (the `sqlite_steps` fixture), not timed.
"""
from __future__ import annotations

from pathlib import Path

from heron.govern.audit import AuditLog


def test_the_last_checkpoint_is_the_first_written_of_the_largest_size(tmp_path: Path) -> None:
    """As the largest of every checkpoint read back (`max` keeps the first of equals), in any order written."""
    log = AuditLog.open(tmp_path / "a.db", checkpoint_every=0)
    assert log.store.last_checkpoint() is None
    for size in (3, 5, 1, 5, 2, 0):
        log.store.add_checkpoint({"size": size, "root": "ab" * 32, "time": f"t{size}", "frontier": "[]"})
        expected = max(log.store.checkpoints(), key=lambda row: row["size"])
        assert log.store.last_checkpoint() == expected, size
    assert log.store.last_checkpoint()["id"] == 2


def test_an_append_asks_the_same_of_the_database_however_long_the_log(tmp_path: Path, sqlite_steps) -> None:
    """With a checkpoint after every record (the default), an append read every checkpoint to extend
    the largest: work that grew with the log, quadratic over its life. It reads that one only."""
    log = AuditLog.open(tmp_path / "a.db")
    work = {}
    for size in (8, 128):
        while log.store.count() < size:
            log.append("event", actor="alice", parameters={"i": log.store.count()})
        work[size] = sqlite_steps(log.store.engine, lambda: log.append("event", actor="alice", parameters={"i": -1}))
    assert work[128] - work[8] < 128 - 8, work  # not even one instruction more per record
    assert log.verify().ok
