"""The consent registry against known histories: grants, withdrawals, expiry and renewals at known
times (an injected clock), checked at every moment that matters; nothing recorded ever changes.

Runs on an SQLite file and an in-memory SQLite database; set HERON_TEST_POSTGRES_URL to a PostgreSQL
database that the tests may empty (its consent table is dropped) to run every test there too.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from heron.govern.consent import (
    PURPOSES, SCHEMA_VERSION, ConsentError, ConsentRegistry, events_from_export,
)
from heron.store.consent import consent_events, consent_metadata, latest_query

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
HOUR, DAY = timedelta(hours=1), timedelta(days=1)
POSTGRES_URL = os.environ.get("HERON_TEST_POSTGRES_URL")
BACKENDS = ["sqlite-file", "sqlite-memory"] + (["postgresql"] if POSTGRES_URL else [])


class Clock:
    """Now, as the test says."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T0 + 10 * DAY)


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path: Path) -> str:
    if request.param == "sqlite-file":
        return str(tmp_path / "consent.db")
    if request.param == "sqlite-memory":
        return ":memory:"
    engine = sa.create_engine(POSTGRES_URL)
    consent_metadata.drop_all(engine)
    engine.dispose()
    return POSTGRES_URL


@pytest.fixture
def registry(db: str, clock: Clock):
    with ConsentRegistry.open(db, controller="Acme Ltd", clock=clock) as opened:
        yield opened


def test_grant_then_check(registry):
    assert not registry.has_consent("alice", "training")
    given = registry.grant("alice", "training", source="web-form", notice="privacy v3", at=T0,
                           pii_categories=["conversations"])
    assert registry.has_consent("alice", "training")
    assert registry.require_consent("alice", "training") == given
    assert (given.event, given.source, given.notice, given.controller, given.pii_categories) == (
        "given", "web-form", "privacy v3", "Acme Ltd", ("conversations",))
    assert not registry.has_consent("alice", "training", at=T0 - HOUR)  # not before it was given


def test_withdraw_then_check_keeps_both_events(registry):
    given = registry.grant("alice", "training", source="web-form", at=T0)
    withdrawn = registry.withdraw("alice", "training", source="settings page", at=T0 + DAY)
    assert not registry.has_consent("alice", "training")
    assert registry.has_consent("alice", "training", at=T0 + HOUR)  # what held then can still be shown
    assert registry.history("alice") == [given, withdrawn]
    assert withdrawn.record_id == given.record_id and withdrawn.event == "withdrawn"
    assert registry.status("alice", "training").state == "withdrawn"
    with pytest.raises(ValueError, match="no consent in force for purpose 'training' to withdraw"):
        registry.withdraw("alice", "training", source="again")


def test_the_database_refuses_to_rewrite_an_event(registry):
    registry.grant("alice", "training", source="web-form", at=T0)
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        with registry.store.engine.begin() as conn:
            conn.execute(sa.update(consent_events).values(event="withdrawn"))
    assert registry.has_consent("alice", "training")


def test_expiry(registry, clock):
    registry.grant("alice", "analytics", source="banner", at=T0, expires_at=T0 + DAY)
    assert registry.has_consent("alice", "analytics", at=T0 + 23 * HOUR)
    assert not registry.has_consent("alice", "analytics", at=T0 + DAY)  # expiry is exclusive
    status = registry.status("alice", "analytics")
    assert status.state == "expired" and status.event.expires_at == T0 + DAY
    with pytest.raises(ConsentError, match="expired at 2025-03-02T12:00:00"):
        registry.require_consent("alice", "analytics")
    (record,) = registry.export("alice")["records"]
    assert record["status"] == "expired"
    assert record["events"][-1] == {"state": "expired", "time": (T0 + DAY).isoformat(), "derived": True}
    with pytest.raises(ValueError, match="expires_at: .* is not after the grant"):
        registry.grant("bob", "analytics", source="banner", at=T0, expires_at=T0)


def test_purposes_are_independent(registry):
    registry.grant("alice", "training", source="web-form", at=T0)
    assert not registry.has_consent("alice", "analytics")
    with pytest.raises(ValueError, match="purpose 'analytics' to withdraw: never given"):
        registry.withdraw("alice", "analytics", source="settings")
    registry.grant("alice", "personalisation", source="web-form", at=T0)
    registry.withdraw("alice", "personalisation", source="settings", at=T0 + HOUR)
    assert registry.has_consent("alice", "training") and not registry.has_consent("alice", "personalisation")
    assert not registry.has_consent("bob", "training")  # and users are
    assert set(PURPOSES) == {"personalisation", "training", "analytics"}
    registry.grant("alice", "eval.red-team", source="web-form", at=T0)  # the vocabulary is open
    with pytest.raises(ValueError, match="'purpose' 'Training Data': use lower-case"):
        registry.grant("alice", "Training Data", source="web-form")


def test_require_consent_error_names_user_and_purpose(registry):
    with pytest.raises(ConsentError) as caught:
        registry.require_consent("bob", "training")
    assert (caught.value.user_id, caught.value.purpose) == ("bob", "training")
    assert str(caught.value).startswith("no consent in force from user 'bob' for purpose 'training': never given")


def test_export_round_trips_through_json(registry, clock):
    registry.grant("alice", "training", source="web-form", notice="v1", at=T0, pii_categories=["chats"])
    registry.grant("alice", "training", source="web-form", notice="v2", at=T0 + DAY)  # renewed: a new record
    registry.grant("alice", "analytics", source="banner", at=T0, expires_at=T0 + 2 * DAY)
    registry.withdraw("alice", "training", source="email", at=T0 + 2 * DAY)
    registry.grant("bob", "training", source="web-form", at=T0)
    exported = json.loads(json.dumps(registry.export("alice")))
    assert events_from_export(exported) == registry.history("alice")
    assert exported["schema_version"] == SCHEMA_VERSION and exported["pii_principal_id"] == "alice"
    v1, v2, analytics = exported["records"]
    assert [v1["status"], v2["status"], analytics["status"]] == ["superseded", "withdrawn", "expired"]
    assert v1["events"][-1]["by_record_id"] == v2["record_id"]
    assert v1["purposes"] == [{"purpose": "training", "lawful_basis": "consent",
                               "legal_reference": "GDPR Art. 6(1)(a); Art. 9(2)(a) for special categories"}]
    assert (v1["notice"], v1["collection_method"], v1["pii_controller"], v1["pii_categories"]) == (
        "v1", "web-form", "Acme Ltd", ["chats"])
    assert [e["state"] for e in v2["events"]] == ["given", "withdrawn"]
    assert events_from_export(registry.export("alice", purpose="analytics")) == registry.history("alice",
                                                                                                  "analytics")
    with pytest.raises(ValueError, match="not a consent export"):
        events_from_export({"records": [{"events": [{"state": "given"}]}]})


def test_timestamps_are_utc(registry):
    local = datetime(2025, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    given = registry.grant("alice", "training", source="web-form", at=local.isoformat(),
                           expires_at="2025-06-01T00:00:00-05:00")
    for stored in (given, *registry.history("alice")):
        assert stored.at == T0 and stored.at.utcoffset() == timedelta(0)
        assert stored.expires_at == datetime(2025, 6, 1, 5, tzinfo=timezone.utc)
        assert stored.recorded_at.tzinfo == timezone.utc
    record = registry.export("alice")["records"][0]
    assert record["events"][0]["time"] == "2025-03-01T12:00:00+00:00"
    with pytest.raises(ValueError, match="has no timezone"):
        registry.grant("alice", "training", source="web-form", at="2025-03-01T12:00:00")


def test_events_keep_time_order(registry, clock):
    registry.grant("alice", "training", source="web-form", at=T0)
    with pytest.raises(ValueError, match="is before the latest event for user 'alice' and purpose 'training'"):
        registry.grant("alice", "training", source="web-form", at=T0 - HOUR)
    with pytest.raises(ValueError, match="is in the future"):
        registry.withdraw("alice", "training", source="email", at=clock.now + HOUR)
    assert len(registry.history("alice")) == 1


def test_sqlite_file_persists(tmp_path, clock):
    with ConsentRegistry.open(tmp_path / "c.db", clock=clock) as registry:
        registry.grant("alice", "training", source="web-form", at=T0)
    with ConsentRegistry.open(tmp_path / "c.db", create=False, clock=clock) as registry:
        assert registry.has_consent("alice", "training")
    with pytest.raises(FileNotFoundError, match="no consent registry at"):
        ConsentRegistry.open(tmp_path / "missing.db", create=False)


def test_the_check_is_one_index_lookup(tmp_path):
    with ConsentRegistry.open(tmp_path / "c.db") as registry:
        engine = registry.store.engine
        compiled = latest_query("alice", "training").compile(engine)
        with engine.connect() as conn:
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + str(compiled), tuple(compiled.params[k] for k in compiled.positiontup)))
    assert "USING INDEX ix_consent_events_user_id_purpose_at_id" in plan and "TEMP B-TREE" not in plan


def test_two_processes_writing_at_once_keep_one_order(tmp_path):
    """A grant dated "now" whose write is slow, and a withdrawal begun meanwhile from another
    connection: the withdrawal waits for the grant's write lock, then reads the grant and ends
    it, so the history reads in one order and the export agrees with the check."""
    import threading
    import time

    from heron.store.records import utc_now

    slow_started = threading.Event()

    def slow_clock() -> datetime:  # read under the write lock: the other writer must wait it out
        now = utc_now()
        slow_started.set()
        time.sleep(0.3)
        return now

    db = tmp_path / "consent.db"
    with ConsentRegistry.open(db) as setup:
        setup.grant("alice", "training", source="web-form", at=utc_now() - HOUR)
    with ConsentRegistry.open(db, clock=slow_clock) as slow, ConsentRegistry.open(db) as fast:
        granting = threading.Thread(target=lambda: slow.grant("alice", "training", source="renewal"))
        granting.start()
        while not slow_started.wait(1):  # the renewal holds the lock first, however long a loaded machine takes
            assert granting.is_alive(), "the renewal ended before it read its clock"
        withdrawal = fast.withdraw("alice", "training", source="email")  # waits for the renewal's lock
        granting.join()
        events = fast.history("alice", "training")
        assert [e.event for e in events] == ["given", "given", "withdrawn"]
        assert [e.at for e in events] == sorted(e.at for e in events)
        assert withdrawal.record_id == events[1].record_id  # it ended the renewal, the grant then in force
        assert not fast.has_consent("alice", "training")
        statuses = [record["status"] for record in fast.export("alice")["records"]]
        assert "given" not in statuses


def test_two_processes_making_a_new_registry_at_once_both_open_it_whole(tmp_path):
    """The first opener makes the tables under the write lock; a second one that looked meanwhile
    and saw none waits for it, looks again and makes nothing. Without the lock the second made the
    tables in the first one's gap, the first's CREATE failed, and (when the index came first) the
    append-only trigger was never made."""
    import threading

    db, paused, errors = tmp_path / "consent.db", threading.Event(), []

    def pause_the_first(*_args, **_kwargs) -> None:
        if threading.current_thread().name == "first":
            paused.set()
            threading.Event().wait(0.5)  # long enough for the second opener to look and try

    def open_registry() -> None:
        try:
            ConsentRegistry.open(db).close()
        except Exception as err:  # noqa: BLE001 - any failure is the finding
            errors.append(err)

    sa.event.listen(consent_events, "before_create", pause_the_first)
    try:
        first = threading.Thread(target=open_registry, name="first")
        first.start()
        paused.wait(5)
        open_registry()  # the second opener, while the first is making the tables
        first.join()
    finally:
        sa.event.remove(consent_events, "before_create", pause_the_first)
    assert errors == []
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        triggers = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'").scalars().all()
    engine.dispose()
    assert triggers == ["consent_events_append_only"]


def test_lookups_read_keys_as_grants_write_them(registry):
    registry.grant(" alice ", "training", source="web-form", at=T0)
    assert registry.has_consent("alice ", "training") and len(registry.history(" alice")) == 1
    assert registry.export(" alice ")["records"]
    with pytest.raises(ValueError, match="'purpose' 'Training': use lower-case"):
        registry.status("alice", "Training")


def test_a_registry_left_without_its_append_only_trigger_gets_it_back(tmp_path):
    """Two first opens at once could leave the table without its trigger (before tables were made
    under a lock): opened to write, the registry makes it again; opened to read, it warns."""
    db = tmp_path / "consent.db"
    ConsentRegistry.open(db).close()
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER consent_events_append_only")
    with pytest.warns(UserWarning, match="consent_events has no append-only trigger"):
        ConsentRegistry.open(db, create=False).close()
    with ConsentRegistry.open(db) as registry:
        registry.grant("alice", "training", source="web-form")
    with pytest.raises(sa.exc.DatabaseError, match="consent_events is append-only"), engine.begin() as conn:
        conn.exec_driver_sql("UPDATE consent_events SET event = 'given'")
    engine.dispose()
