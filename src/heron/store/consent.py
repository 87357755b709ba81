"""The consent registry's storage: one append-only table of consent events.

    store = ConsentStore.open("runs/consent.db")             # or "sqlite:///...", "postgresql://..."
    store.append(EventInput(user_id="alice", purpose="training", event="given", at=..., source="web-form"))
    store.latest("alice", "training", at=now)                 # the event in force at `now`, or None

Each row is one event, a consent given or withdrawn, and rows are only ever
added: a withdrawal is a new row beside the grant it ends, so the state at
any past moment can still be shown (GDPR Art. 7(1): the controller must be
able to demonstrate consent). The database itself refuses an UPDATE of an
event (a trigger on SQLite and PostgreSQL). What the events mean (which is in
force, expiry, the ISO/IEC TS 27560 record shape) is `govern/consent.py`'s.

The question every other layer asks, "the latest event for this user and
purpose at time t", is one lookup on the index (user_id, purpose, at, id).
"""
from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa

from heron.store.database import EngineStore
from heron.store.records import check_time, utc_now
from heron.store.schema import NAMING, UTCDateTime

EVENTS = ("given", "withdrawn")
MAX_ID = 255  # user ids and purposes: short keys, indexable on every backend

consent_metadata = sa.MetaData(naming_convention=NAMING)

consent_events = sa.Table(
    "consent_events", consent_metadata,
    sa.Column("id", sa.Integer, primary_key=True),  # the order in which events were recorded
    sa.Column("record_id", sa.String(36), nullable=False, index=True),  # the grant this event belongs to
    sa.Column("user_id", sa.String(MAX_ID), nullable=False),
    sa.Column("purpose", sa.String(MAX_ID), nullable=False),
    sa.Column("event", sa.String(16), nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),  # when it happened
    sa.Column("recorded_at", UTCDateTime, nullable=False),  # when the store wrote it
    sa.Column("source", sa.Text, nullable=False),  # how it was collected or received
    sa.Column("notice", sa.Text, nullable=True),  # the version of the notice shown (given)
    sa.Column("expires_at", UTCDateTime, nullable=True),  # given: when it lapses
    sa.Column("controller", sa.Text, nullable=True),  # who the consent was given to
    sa.Column("pii_categories", sa.Text, nullable=False),  # JSON list of strings
    sa.Index(None, "user_id", "purpose", "at", "id"),
    sa.CheckConstraint("event IN ('given', 'withdrawn')", name="event_kind"),
    sa.CheckConstraint("event = 'given' OR (expires_at IS NULL AND notice IS NULL)", name="given_only_fields"),
    sa.CheckConstraint("expires_at IS NULL OR expires_at > at", name="expires_after_given"),
    *(sa.CheckConstraint(f"{c} <> ''", name=f"{c}_not_empty") for c in ("user_id", "purpose", "source")),
)

# Append-only in the database too: an UPDATE would rewrite history. One statement per DDL
# (drivers differ on several in one execute); the trigger is made with its table.
_REFUSE = "consent_events is append-only: record a new event instead"
_NO_UPDATE = {
    "sqlite": [f"CREATE TRIGGER consent_events_append_only BEFORE UPDATE ON consent_events "
               f"BEGIN SELECT RAISE(ABORT, '{_REFUSE}'); END"],
    "postgresql": [f"CREATE OR REPLACE FUNCTION consent_events_append_only() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN RAISE EXCEPTION '{_REFUSE}'; END; $$",
                   "CREATE TRIGGER consent_events_append_only BEFORE UPDATE ON consent_events "
                   "FOR EACH ROW EXECUTE FUNCTION consent_events_append_only()"],
}
for _dialect, _statements in _NO_UPDATE.items():
    for _sql in _statements:
        sa.event.listen(consent_events, "after_create", sa.DDL(_sql).execute_if(dialect=_dialect))


def _has_append_only_trigger(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = "
                                    "'consent_events_append_only'").first() is not None


@dataclass(frozen=True)
class ConsentEvent:
    """One stored event: a consent given, or withdrawn, by a user for a purpose."""

    id: int  # increases in the order of recording
    record_id: str  # the consent record (one grant and what ended it) the event belongs to
    user_id: str  # the PII principal
    purpose: str
    event: str  # "given" or "withdrawn"
    at: datetime  # when it happened (UTC)
    recorded_at: datetime  # when the store wrote it (UTC)
    source: str  # how it was collected or received: "web-form", "cli", "support-ticket 4711", ...
    notice: str | None = None  # the version of the notice the user saw (given events)
    expires_at: datetime | None = None  # when the consent lapses (given events)
    controller: str | None = None  # who the consent was given to
    pii_categories: tuple[str, ...] = ()  # the kinds of personal data it covers


@dataclass(frozen=True)
class EventInput:
    """An event to append; `record_id` is made for a grant and names the grant a withdrawal ends."""

    user_id: str
    purpose: str
    event: str
    at: datetime | None  # None: now, as the store's clock reads under its write lock
    source: str
    record_id: str | None = None
    notice: str | None = None
    expires_at: datetime | None = None
    controller: str | None = None
    pii_categories: tuple[str, ...] = field(default=())


class ConsentStore(EngineStore):
    """Consent events in one database; every append is one transaction."""

    what = "consent registry"
    schema = consent_metadata  # the table, and its trigger

    @classmethod
    def open(cls, url_or_path: str | os.PathLike[str], *, create: bool = True) -> ConsentStore:
        """As EngineStore.open; on SQLite an append-only trigger found missing is made again (with
        `create`), else warned of: before tables were made under a lock, two first opens at once
        could leave the table without it, so history could be rewritten unseen."""
        store = super().open(url_or_path, create=create)
        if store.engine.dialect.name == "sqlite" and not _has_append_only_trigger(store.engine):
            if create:
                again = _NO_UPDATE["sqlite"][0].replace("CREATE TRIGGER", "CREATE TRIGGER IF NOT EXISTS")
                with store.write_transaction() as conn:
                    conn.exec_driver_sql(again)
            else:
                warnings.warn(f"{store.url}: consent_events has no append-only trigger, so its history can be "
                              "rewritten; open it once with create to make it", stacklevel=2)
        return store

    def append(self, event: EventInput, *, clock: Callable[[], datetime] = utc_now,
               decide: Callable[[ConsentEvent | None, datetime], EventInput] | None = None) -> ConsentEvent:
        """Add an event, in one transaction that holds the write lock from its start. It may not
        be dated before the latest event of its user and purpose, so the history reads in one
        order whether sorted by time or by recording; `event.at` None dates it by `clock` under
        the lock, so that two events recorded "now" at once cannot break that order. `decide`,
        given that latest event and the time, returns the event to write or raises: a write
        that depends on the state (a withdrawal ends the grant in force) reads it under the lock."""
        with self.write_transaction(consent_events) as conn:
            at = clock() if event.at is None else check_time(event.at, "at")
            last = _latest(conn, event.user_id, event.purpose, None)
            if last is not None and at < last.at:
                raise ValueError(f"at: {at.isoformat()} is before the latest event for user {event.user_id!r} "
                                 f"and purpose {event.purpose!r} ({last.event} at {last.at.isoformat()})")
            if decide is not None:
                event = decide(last, at)
            values = {"record_id": event.record_id or str(uuid.uuid4()), "user_id": event.user_id,
                      "purpose": event.purpose, "event": event.event, "at": at, "recorded_at": utc_now(),
                      "source": event.source, "notice": event.notice, "expires_at": event.expires_at,
                      "controller": event.controller, "pii_categories": json.dumps(list(event.pii_categories))}
            new_id = conn.execute(sa.insert(consent_events).values(**values)).inserted_primary_key[0]
            return _event(conn.execute(sa.select(consent_events).where(consent_events.c.id == new_id)).one())

    def latest(self, user_id: str, purpose: str, at: datetime | None = None) -> ConsentEvent | None:
        """The last event for this user and purpose at or before `at` (default: the last of all)."""
        with self.engine.connect() as conn:
            return _latest(conn, user_id, purpose, at)

    def events(self, user_id: str, purpose: str | None = None) -> list[ConsentEvent]:
        """Every event of a user (for one purpose, or all), in the order recorded."""
        query = sa.select(consent_events).where(consent_events.c.user_id == user_id).order_by(consent_events.c.id)
        if purpose is not None:
            query = query.where(consent_events.c.purpose == purpose)
        with self.engine.connect() as conn:
            return [_event(row) for row in conn.execute(query)]


def latest_query(user_id: str, purpose: str, at: datetime | None = None) -> sa.Select:
    """The newest event for a user and purpose (at or before `at`): a walk down the index
    (user_id, purpose, at, id) that stops at its first row, with no sort."""
    c = consent_events.c
    query = (sa.select(consent_events).where(c.user_id == user_id, c.purpose == purpose)
             .order_by(c.at.desc(), c.id.desc()).limit(1))
    return query if at is None else query.where(c.at <= at)


def _latest(conn: sa.Connection, user_id: str, purpose: str, at: datetime | None) -> ConsentEvent | None:
    row = conn.execute(latest_query(user_id, purpose, at)).first()
    return None if row is None else _event(row)


def _event(row: sa.Row) -> ConsentEvent:
    values = dict(row._mapping)
    values["pii_categories"] = tuple(json.loads(values["pii_categories"]))
    return ConsentEvent(**values)


__all__ = ["EVENTS", "MAX_ID", "ConsentEvent", "ConsentStore", "EventInput", "consent_events", "consent_metadata",
           "latest_query"]
