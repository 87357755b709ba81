"""Fixtures for the store tests."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa


@pytest.fixture
def sqlite_steps() -> Callable[[sa.Engine, Callable[[], object]], int]:
    """`steps(engine, action)`: the SQLite virtual-machine instructions that `action` runs on the
    engine's database, counted by a progress handler called on every one
    (https://sqlite.org/c3ref/progress_handler.html). Rows scanned show up as instructions, so
    work that grows with a table shows as a count that grows with it, on any machine."""

    def steps(engine: sa.Engine, action: Callable[[], object]) -> int:
        count = 0

        def tick() -> int:
            nonlocal count
            count += 1
            return 0  # go on

        def install(dbapi_connection, _record) -> None:
            dbapi_connection.set_progress_handler(tick, 1)

        sa.event.listen(engine, "connect", install)
        engine.dispose()  # the pool's connections are made again, each with the handler
        try:
            action()
        finally:
            sa.event.remove(engine, "connect", install)
            engine.dispose()
        return count

    return steps
