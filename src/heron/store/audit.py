"""The audit log's tables: records appended in order, and Merkle checkpoints.

Rows only: what a record means, how it is hashed and how the log is verified
live in `heron.govern.audit`, which hands `AuditStore.append` a function that
builds the next row from the sequence number and hash it follows. The store
takes that number and hash inside the transaction that inserts the row, and
the primary key refuses a second row with the same number, so two processes
appending at once cannot both extend the same record: the loser retries
against the new end of the log.

Every chained field is stored as text exactly as it was hashed (JSON fields in
canonical form), so verification recomputes hashes from the stored bytes.
Content and its salt sit outside the chain: `erase_content` clears them and
leaves every hash in place.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from heron.store.database import EngineStore
from heron.store.schema import NAMING

GENESIS = "0" * 64  # the `prev_hash` of record 0
APPEND_ATTEMPTS = 20  # a lost race for the next sequence number is retried this often

Row = dict[str, Any]

metadata = sa.MetaData(naming_convention=NAMING)

audit_records = sa.Table(
    "audit_records", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),  # 0, 1, 2, ...: the Merkle leaf index
    # chained: each of these is hashed into `hash`, exactly as stored
    sa.Column("time", sa.Text, nullable=False),  # UTC ISO 8601
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("event", sa.Text, nullable=False, index=True),
    sa.Column("subject", sa.Text, nullable=True, index=True),  # whose data the content is, for erasure
    sa.Column("inputs", sa.Text, nullable=False),  # JSON {role: {path, sha256, kind}}
    sa.Column("outputs", sa.Text, nullable=False),  # JSON, as inputs
    sa.Column("model_hash", sa.Text, nullable=True),
    sa.Column("parameters", sa.Text, nullable=False),  # JSON object
    sa.Column("content_ref", sa.Text, nullable=True),  # JSON {sha256, stored}, or NULL: no content
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),
    # not chained: erasable
    sa.Column("content", sa.Text, nullable=True),
    sa.Column("content_salt", sa.String(32), nullable=True),
)

audit_checkpoints = sa.Table(
    "audit_checkpoints", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("size", sa.Integer, nullable=False, index=True),  # records 0 .. size-1
    sa.Column("root", sa.String(64), nullable=False),  # RFC 6962 Merkle tree hash of their hashes
    sa.Column("time", sa.Text, nullable=False),
    sa.Column("signature", sa.Text, nullable=True),  # Ed25519, hex; NULL when unsigned
    sa.Column("frontier", sa.Text, nullable=False),  # JSON: roots of the perfect subtrees, to extend the tree
)

RECORD_COLUMNS = tuple(audit_records.c.keys())
CHECKPOINT_COLUMNS = tuple(audit_checkpoints.c.keys())


class AuditStore(EngineStore):
    """An audit log's rows in one database; appends are transactions."""

    what = "audit log"
    schema = metadata

    # ----- writing ------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as conn:
            yield conn

    def append(self, make_row: Callable[[int, str], Row], conn: sa.Connection | None = None) -> Row:
        """Insert `make_row(seq, prev_hash)` at the end of the log and return it.

        Inside a caller's transaction (`conn`) there is one attempt; on its own
        a lost race (another process took `seq`) is retried."""
        if conn is not None:
            return _append(conn, make_row)
        for _ in range(APPEND_ATTEMPTS - 1):
            try:
                with self.engine.begin() as own:
                    return _append(own, make_row)
            except sa.exc.IntegrityError:
                continue
        with self.engine.begin() as own:
            return _append(own, make_row)

    def add_checkpoint(self, row: Row) -> int:
        with self.engine.begin() as conn:
            return conn.execute(sa.insert(audit_checkpoints).values(**row)).inserted_primary_key[0]

    def erase_content(self, seqs: list[int], conn: sa.Connection) -> None:
        """Clear content and salt of these records (in the caller's transaction); hashes stay."""
        if seqs:
            conn.execute(sa.update(audit_records).where(audit_records.c.seq.in_(seqs))
                         .values(content=None, content_salt=None))

    # ----- reading ------------------------------------------------------------------------------

    def records(self, *, event: str | None = None, subject: str | None = None, outputs_containing: str | None = None,
                conn: sa.Connection | None = None) -> Iterator[Row]:
        """Rows in sequence order: all, or those of one event type, one subject, or whose
        outputs' JSON text contains a string (a hash)."""
        query = sa.select(audit_records).order_by(audit_records.c.seq)
        if event is not None:
            query = query.where(audit_records.c.event == event)
        if subject is not None:
            query = query.where(audit_records.c.subject == subject)
        if outputs_containing is not None:
            query = query.where(audit_records.c.outputs.contains(outputs_containing, autoescape=True))
        if conn is not None:
            yield from (dict(row._mapping) for row in conn.execute(query))
            return
        with self.engine.connect() as own:
            yield from (dict(row._mapping) for row in own.execute(query))

    def records_spooled(self) -> Iterator[Row]:
        """Every row in sequence order, as one read saw the log: the rows are read in one query
        into a temporary file, then handed out from it. One query: rows read in pages could mix
        states (a record's content on one page, the audit.erase that cleared it on a later one).
        Spooled: no read stays open while the caller works on a row (writes it to a pipe a pager
        holds, say), which on SQLite would keep every writer waiting, and failing after
        SQLITE_BUSY_SECONDS."""
        with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
            for row in self.records():  # the read writes to a local file only: it is never held up
                spool.write(json.dumps(row) + "\n")
            spool.seek(0)
            yield from (json.loads(line) for line in spool)

    def hashes(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The `hash` column of records start .. stop-1, in order."""
        query = sa.select(audit_records.c.hash).where(audit_records.c.seq >= start).order_by(audit_records.c.seq)
        if stop is not None:
            query = query.where(audit_records.c.seq < stop)
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(audit_records)).scalar_one()

    def checkpoints(self) -> list[Row]:
        """Checkpoints in the order written."""
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(sa.select(audit_checkpoints)
                                                                .order_by(audit_checkpoints.c.id))]

    def last_checkpoint(self) -> Row | None:
        """The checkpoint of the most records (the first written of that size), or None: one row
        through the index on `size`, so appending stays constant-time however many there are."""
        query = (sa.select(audit_checkpoints)
                 .order_by(audit_checkpoints.c.size.desc(), audit_checkpoints.c.id).limit(1))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else dict(row._mapping)

    def checkpoints_by_size(self, conn: sa.Connection) -> Iterator[Row]:
        """Checkpoints by size (ties in the order written), one row at a time and without their
        frontiers, which verification does not need; in the caller's connection, to be read
        alongside `records(conn=conn)`."""
        query = (sa.select(*(c for c in audit_checkpoints.c if c.name != "frontier"))
                 .order_by(audit_checkpoints.c.size, audit_checkpoints.c.id))
        yield from (dict(row._mapping) for row in conn.execute(query))


def _append(conn: sa.Connection, make_row: Callable[[int, str], Row]) -> Row:
    last = conn.execute(sa.select(audit_records.c.seq, audit_records.c.hash)
                        .order_by(audit_records.c.seq.desc()).limit(1)).first()
    seq, prev = (0, GENESIS) if last is None else (last.seq + 1, last.hash)
    row = make_row(seq, prev)
    conn.execute(sa.insert(audit_records).values(**row))
    return row


__all__ = ["AuditStore", "CHECKPOINT_COLUMNS", "GENESIS", "RECORD_COLUMNS", "audit_checkpoints", "audit_records"]
