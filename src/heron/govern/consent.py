"""Consent: who agreed to what, when, how, and whether it still holds.

    registry = ConsentRegistry.open("runs/consent.db", controller="Acme Ltd")
    registry.grant("alice", "training", source="web-form", notice="privacy-notice v3")
    registry.require_consent("alice", "training")    # before storing or using her data; raises ConsentError
    registry.withdraw("alice", "training", source="settings page")
    registry.has_consent("alice", "training")        # False; both events stay in the history
    registry.export("alice")                         # her consent history as JSON (GDPR Arts. 15, 20)

Consent is per user and per purpose: granting "analytics" says nothing about
"training". Purposes are an open vocabulary of short lower-case keys;
`PURPOSES` lists the well-known ones. A consent is in force at time t when
the latest event for its user and purpose at or before t is a grant whose
expiry, if it has one, is after t. A withdrawal (GDPR Art. 7(3)) and a
renewal are new events; nothing recorded is changed (store/consent.py), so
what was in force at any past moment can be demonstrated (Art. 7(1)).

Records are shaped after ISO/IEC TS 27560:2023, "Privacy technologies —
Consent record information structure" (see also the W3C DPV guide,
https://w3id.org/dpv/guides/consent-27560). One record is one grant and what
ended it. Its fields, and the part of the TS each belongs to:

    record header     record_id             a UUID, made when consent is given
                      schema_version        SCHEMA_VERSION
                      pii_principal_id      user_id
                      notice                the version of the notice shown (notice)
    PII processing    purposes              [{purpose, lawful_basis: "consent", legal_reference}]
                      pii_categories        the kinds of personal data covered
    party             pii_controller        controller
    event             collection_method     source: how the consent was collected
                      events                the status history, each with its time, recorded_at
                                            and source: given, then withdrawn, expired or superseded
                      expires_at            the validity of the consent, when limited

"expired" (the expiry passed) and "superseded" (the user granted the same
purpose again, making a new record) are derived when the history is read:
nothing happens in the database when a consent lapses. The export marks
them "derived": true.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from heron.store.closing import Closing
from heron.store.consent import MAX_ID, ConsentEvent, ConsentStore, EventInput
from heron.store.records import check_time, utc_now

SCHEMA_VERSION = "heron.consent/1 (after ISO/IEC TS 27560:2023)"
LEGAL_REFERENCE = "GDPR Art. 6(1)(a); Art. 9(2)(a) for special categories"
# The purposes Heron's layers ask about; any other key is as valid.
PURPOSES = {
    "personalisation": "adapting replies, memory and adapters to the user",
    "training": "training or fine-tuning models on the user's conversations and feedback",
    "analytics": "measuring how the service is used",
}
KEY = re.compile(r"[a-z0-9][a-z0-9_.:-]*")


class ConsentError(PermissionError):
    """The user has no consent in force for the purpose; the message names both and says why."""

    def __init__(self, user_id: str, purpose: str, why: str) -> None:
        self.user_id, self.purpose, self.why = user_id, purpose, why
        super().__init__(f"no consent in force from user {user_id!r} for purpose {purpose!r}: {why}")


@dataclass(frozen=True)
class ConsentStatus:
    """What holds for a user and purpose at a moment, and the event that decides it."""

    user_id: str
    purpose: str
    at: datetime
    state: str  # "given", "withdrawn", "expired" or "none"
    event: ConsentEvent | None  # the latest event at `at`

    @property
    def in_force(self) -> bool:
        return self.state == "given"

    def why(self) -> str:
        """One line for people."""
        e = self.event
        if e is None:
            return f"never given (as of {self.at.isoformat()})"
        since = {"given": f"given at {e.at.isoformat()} via {e.source!r}" + (f", notice {e.notice!r}" if e.notice
                                                                              else ""),
                 "withdrawn": f"withdrawn at {e.at.isoformat()} via {e.source!r}",
                 "expired": f"expired at {e.expires_at.isoformat() if e.expires_at else ''}"}[self.state]
        return f"{since} (record {e.record_id})"


def check_key(value: object, field: str) -> str:
    """A user id or purpose: a non-empty string; purposes are lower-case keys."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{field}' must be a non-empty string, got {value!r}")
    value = value.strip()
    if len(value) > MAX_ID:
        raise ValueError(f"'{field}' is longer than {MAX_ID} characters")
    if field == "purpose" and not KEY.fullmatch(value):
        raise ValueError(f"'purpose' {value!r}: use lower-case letters, digits and . _ : - "
                         f"(well-known: {', '.join(PURPOSES)})")
    return value


class ConsentRegistry(Closing):
    """Per-user, per-purpose consent over a ConsentStore. `clock` gives "now" (injected in tests)."""

    def __init__(self, store: ConsentStore, *, controller: str | None = None,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.store, self.controller, self.clock = store, controller, clock

    @classmethod
    def open(cls, url_or_path: str | os.PathLike[str], *, create: bool = True, controller: str | None = None,
             clock: Callable[[], datetime] = utc_now) -> ConsentRegistry:
        """A registry in a database URL or SQLite path (":memory:" for one in memory)."""
        return cls(ConsentStore.open(url_or_path, create=create), controller=controller, clock=clock)

    def close(self) -> None:
        self.store.close()


    # ----- recording ----------------------------------------------------------------------------

    def grant(self, user_id: str, purpose: str, *, source: str, notice: str | None = None,
              expires_at: datetime | str | None = None, at: datetime | str | None = None,
              pii_categories: Iterable[str] = (), controller: str | None = None) -> ConsentEvent:
        """Record that the user gave consent for the purpose (a new record; an earlier one in force
        is superseded)."""
        user_id, purpose, source = check_key(user_id, "user_id"), check_key(purpose, "purpose"), _text(source, "source")
        when = self._when(at)
        expiry = None if expires_at is None else check_time(expires_at, "expires_at")
        if expiry is not None and expiry <= (given := when or self.clock()):  # a grant of now: dated under the lock
            raise ValueError(f"expires_at: {expiry.isoformat()} is not after the grant ({given.isoformat()})")
        categories = tuple(_text(c, "pii_categories") for c in pii_categories)
        return self.store.append(EventInput(user_id, purpose, "given", when, source, notice=_note(notice, "notice"),
                                            expires_at=expiry, controller=controller or self.controller,
                                            pii_categories=categories), clock=self.clock)

    def withdraw(self, user_id: str, purpose: str, *, source: str, at: datetime | str | None = None) -> ConsentEvent:
        """Record that the user withdrew the consent in force for the purpose (GDPR Art. 7(3)). What is
        in force is read under the store's write lock, so a grant recorded meanwhile is the one ended."""
        user_id, purpose, source = check_key(user_id, "user_id"), check_key(purpose, "purpose"), _text(source, "source")

        def end_the_grant_in_force(latest: ConsentEvent | None, when: datetime) -> EventInput:
            status = _status(user_id, purpose, when, latest)
            if not status.in_force:
                raise ValueError(f"user {user_id!r} has no consent in force for purpose {purpose!r} to withdraw: "
                                 f"{status.why()}")
            return EventInput(user_id, purpose, "withdrawn", when, source, record_id=status.event.record_id,
                              controller=status.event.controller)

        return self.store.append(EventInput(user_id, purpose, "withdrawn", self._when(at), source), clock=self.clock,
                                 decide=end_the_grant_in_force)

    def _when(self, at: datetime | str | None) -> datetime | None:
        """`at` checked (not in the future), or None for now: the store reads its clock under its write lock."""
        if at is None:
            return None
        when = check_time(at, "at")
        if when > self.clock():
            raise ValueError(f"at: {when.isoformat()} is in the future; record consent when it happens")
        return when

    # ----- checking -----------------------------------------------------------------------------

    def status(self, user_id: str, purpose: str, *, at: datetime | str | None = None) -> ConsentStatus:
        """What holds at `at` (default: now): one indexed lookup of the latest event."""
        user_id, purpose = check_key(user_id, "user_id"), check_key(purpose, "purpose")
        when = self.clock() if at is None else check_time(at, "at")
        return _status(user_id, purpose, when, self.store.latest(user_id, purpose, when))

    def has_consent(self, user_id: str, purpose: str, *, at: datetime | str | None = None) -> bool:
        """Whether the user's consent for the purpose is in force at `at` (default: now)."""
        return self.status(user_id, purpose, at=at).in_force

    def require_consent(self, user_id: str, purpose: str, *, at: datetime | str | None = None) -> ConsentEvent:
        """The grant in force for the user and purpose at `at` (default: now); ConsentError when there
        is none. Call it before storing or using the user's personal data for the purpose."""
        status = self.status(user_id, purpose, at=at)
        if not status.in_force:
            raise ConsentError(status.user_id, status.purpose, status.why())
        return status.event

    # ----- history ------------------------------------------------------------------------------

    def history(self, user_id: str, purpose: str | None = None) -> list[ConsentEvent]:
        """Every event of the user (for one purpose, or all), in the order recorded."""
        purpose = None if purpose is None else check_key(purpose, "purpose")
        return self.store.events(check_key(user_id, "user_id"), purpose)

    def export(self, user_id: str, *, purpose: str | None = None) -> dict[str, Any]:
        """The user's consent records as JSON-ready values (GDPR Art. 15 access, Art. 20 portability)."""
        now, user_id = self.clock(), check_key(user_id, "user_id")
        events = self.history(user_id, purpose)
        return {"schema_version": SCHEMA_VERSION, "pii_principal_id": user_id, "exported_at": now.isoformat(),
                "records": [_record(group, events, now) for group in _by_record(events)]}


def _status(user_id: str, purpose: str, when: datetime, latest: ConsentEvent | None) -> ConsentStatus:
    """What holds at `when`, given the latest event at or before it."""
    if latest is None:
        state = "none"
    elif latest.event == "withdrawn":
        state = "withdrawn"
    else:
        state = "expired" if latest.expires_at is not None and latest.expires_at <= when else "given"
    return ConsentStatus(user_id, purpose, when, state, latest)


def events_from_export(exported: dict[str, Any]) -> list[ConsentEvent]:
    """The stored events an export holds, in the order recorded: the inverse of `export` (derived
    states are left out). Raises ValueError naming what is missing."""
    try:
        found = [_event_from(record, e) for record in exported["records"] for e in record["events"]
                 if not e.get("derived")]
    except (KeyError, TypeError) as err:
        raise ValueError(f"not a consent export: missing {err}") from None
    return sorted(found, key=lambda e: e.id)


# ----- records ------------------------------------------------------------------------------------


def _by_record(events: list[ConsentEvent]) -> list[list[ConsentEvent]]:
    groups: dict[str, list[ConsentEvent]] = {}
    for event in events:
        groups.setdefault(event.record_id, []).append(event)
    return list(groups.values())


def _record(group: list[ConsentEvent], everything: list[ConsentEvent], now: datetime) -> dict[str, Any]:
    given = group[0]
    states = [_state(e) for e in group] + _derived(group, everything, now)
    return {
        "record_id": given.record_id, "schema_version": SCHEMA_VERSION, "pii_principal_id": given.user_id,
        "pii_controller": given.controller, "notice": given.notice,
        "purposes": [{"purpose": given.purpose, "lawful_basis": "consent", "legal_reference": LEGAL_REFERENCE}],
        "pii_categories": list(given.pii_categories), "collection_method": given.source,
        "expires_at": _iso(given.expires_at), "status": states[-1]["state"], "events": states,
    }


def _derived(group: list[ConsentEvent], everything: list[ConsentEvent], now: datetime) -> list[dict[str, Any]]:
    """The end of a record that no event wrote: a later grant for the purpose, or its expiry."""
    given = group[0]
    if len(group) > 1:
        return []  # withdrawn
    later = next((e for e in everything if e.purpose == given.purpose and e.event == "given" and e.id > given.id),
                 None)
    ends = [(given.expires_at, {"state": "expired"})] if given.expires_at else []
    if later is not None:
        ends.append((later.at, {"state": "superseded", "by_record_id": later.record_id}))
    past = sorted((end for end in ends if end[0] <= now), key=lambda end: end[0])
    return [{**past[0][1], "time": past[0][0].isoformat(), "derived": True}] if past else []


def _state(event: ConsentEvent) -> dict[str, Any]:
    return {"event_id": event.id, "state": event.event, "time": event.at.isoformat(),
            "recorded_at": event.recorded_at.isoformat(), "source": event.source}


def _event_from(record: dict[str, Any], state: dict[str, Any]) -> ConsentEvent:
    given = state["state"] == "given"
    return ConsentEvent(
        id=state["event_id"], record_id=record["record_id"], user_id=record["pii_principal_id"],
        purpose=record["purposes"][0]["purpose"], event=state["state"], at=check_time(state["time"], "time"),
        recorded_at=check_time(state["recorded_at"], "recorded_at"), source=state["source"],
        notice=record["notice"] if given else None,
        expires_at=check_time(record["expires_at"], "expires_at") if given and record["expires_at"] else None,
        controller=record["pii_controller"], pii_categories=tuple(record["pii_categories"]) if given else ())


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _text(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{field}' must be a non-empty string, got {value!r}")
    return value.strip()


def _note(value: object, field: str) -> str | None:
    return None if value is None else _text(value, field)


__all__ = ["LEGAL_REFERENCE", "PURPOSES", "SCHEMA_VERSION", "ConsentError", "ConsentRegistry", "ConsentStatus",
           "check_key", "events_from_export"]
