"""The audit log: an append-only, hash-chained record of what was done to which bytes.

    from heron.govern.audit import record_event
    record_event("compress.quantize", inputs={"source": ckpt}, outputs={"checkpoint": out},
                 parameters={"scheme": "int8"})          # one call; a no-op when the log is off

    log = AuditLog.open("runs/audit.db")
    log.verify().ok                                       # or verify(public_key=audit_keys.load_public_key(...))

A record holds its sequence number (0, 1, ...), UTC time, actor, event type,
an optional subject (whose data its content is), the SHA-256 of each input
and output by role (`heron.govern.digest`: files, folders, JSON descriptions),
the model's hash (its weights file's sha256), JSON parameters, a reference
to its content, `prev_hash` and `hash`:

    hash = SHA-256(canonical JSON of {v, seq, time, actor, event, subject, inputs,
                                      outputs, model_hash, parameters, content_ref, prev_hash})

Content (a request, a reply) is kept only when the log is opened with
`store_content=True`, after `redact` (a PII scrubber; identity by default).
The chain commits to `content_ref` = {sha256: SHA-256(salt || text), salt_sha256,
stored}, never to the text, and the text and its random salt sit outside the
chain: `erase(subject)` clears both and appends an `audit.erase` record naming
what it cleared, so the chain still verifies, the content is gone, and the
remaining hash cannot be tested against a guess (the salt went with it).
Hash-only (the default) keeps the salt so that whoever holds the original
text can show it was logged.

Every `checkpoint_every` records (and on demand) a checkpoint stores the
RFC 6962 Merkle tree hash of the records so far and the tree size (see
`heron.govern.merkle`), optionally signed with Ed25519. Inclusion proofs show
one record in a checkpoint's tree.

What `verify` detects, naming the first bad record by sequence number:

- a changed byte in any stored field of a record: its hash no longer matches
  its fields (a changed `hash` or `prev_hash` included), a JSON field that is
  no longer canonical, or content that no longer matches its content hash
  (a changed salt: it no longer matches `salt_sha256`);
- a deleted record (a gap in the sequence), records moved or swapped (a
  number out of place, or a hash that does not cover the number it holds),
  a record inserted (the record after it follows the one before it), and a
  record that does not follow the one before it;
- content removed other than by `erase` (no `audit.erase` record names it);
- truncation below a checkpoint: a checkpoint covers more records than the log holds;
- a rewrite that recomputed every hash from some record on: the records no
  longer match the Merkle root of a checkpoint taken before the rewrite
  (reported from the first record after the last checkpoint that matches;
  a damaged unsigned checkpoint reads the same way);
- with a public key: a checkpoint whose signature does not verify, or a log with no signed checkpoint.

What it cannot detect from the database alone:

- records removed from the tail after the last checkpoint (a shorter chain is
  a valid chain): at most `checkpoint_every - 1` records with the periodic
  checkpoints (none at the default of one checkpoint per record), none up to
  a checkpoint written with `heron audit checkpoint`;
- anything by someone who can write the database and rewrites both the
  records and every unsigned checkpoint (and, for truncation, deletes the
  checkpoint rows, signed or not). Signed checkpoints kept outside the
  database (`heron audit checkpoint --out FILE`, `verify --anchor FILE`)
  close this: records they cover cannot be changed or removed unseen without
  the private key;
- well-formed records appended by someone with write access: a log proves
  order and integrity of what it holds, not that each entry is true.
"""
from __future__ import annotations

import getpass
import hashlib
import heapq
import json
import os
import secrets
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heron.govern.audit_keys import load_signing_key, sign, signature_holds
from heron.govern.digest import Artifact, ArtifactLike, artifact, canonical_json, json_value
from heron.store.closing import Closing
from heron.store.inputs import existing_input
from heron.govern.merkle import EMPTY_ROOT, extend_frontier, frontier_root, inclusion_proof, verify_inclusion

if TYPE_CHECKING:  # the store (SQLAlchemy) and Ed25519 (cryptography) load on first use
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from heron.store.audit import AuditStore

LOG_ENV = "HERON_AUDIT_LOG"  # a path or database URL; "off" disables the log
CONTENT_ENV = "HERON_AUDIT_CONTENT"  # "1": keep content (redacted), not only its hash
SIGN_KEY_ENV = "HERON_AUDIT_SIGN_KEY"  # an Ed25519 private key file: sign the periodic checkpoints
DEFAULT_LOG = Path("runs") / "audit.db"  # relative to the working directory
# Events are rare (one per run, per conversion, ...), so a checkpoint after every record costs one
# small row each and leaves no tail that records could be cut from without a checkpoint noticing.
DEFAULT_CHECKPOINT_EVERY = 1

GENESIS = "0" * 64  # the prev_hash of record 0 (as heron.store.audit)
RECORD_VERSION = 1
EVENT_ERASE = "audit.erase"
CHAINED = ("seq", "time", "actor", "event", "subject", "inputs", "outputs", "model_hash", "parameters",
           "content_ref", "prev_hash")
JSON_FIELDS = ("inputs", "outputs", "parameters", "content_ref")
TEXT_FIELDS = ("time", "actor", "event", "subject", "model_hash", "prev_hash")
COLUMNS = (*CHAINED, "hash", "content", "content_salt")  # as heron.store.audit.RECORD_COLUMNS, in order
SIGNATURE_CONTEXT = b"heron audit checkpoint v1\n"  # signatures over these bytes sign nothing else

Row = dict[str, Any]  # one stored record: column -> value, JSON fields as canonical text
Problem = tuple[int, str | None, str]  # (first bad record, the checkpoint at fault or None, why)
Redactor = Callable[[str], str]


def identity(text: str) -> str:
    return text


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def default_actor() -> str:
    """The OS user running the process."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


# ----- records and the chain -----------------------------------------------------------------


@dataclass(frozen=True)
class ContentRef:
    sha256: str  # SHA-256(salt || text)
    salt_sha256: str  # SHA-256(salt): a changed salt shows; an erased one stays unknown
    stored: bool  # whether the (redacted) text was kept

    def to_json(self) -> dict[str, Any]:
        return {"salt_sha256": self.salt_sha256, "sha256": self.sha256, "stored": self.stored}


def content_sha256(salt: bytes, text: str) -> str:
    return hashlib.sha256(salt + text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Record:
    """One audit record, as read back (JSON fields parsed)."""

    seq: int
    time: str
    actor: str
    event: str
    subject: str | None
    inputs: dict[str, Artifact]
    outputs: dict[str, Artifact]
    model_hash: str | None
    parameters: dict[str, Any]
    content_ref: ContentRef | None
    prev_hash: str
    hash: str
    content: str | None = None  # the kept (redacted) text; None when hash-only or erased

    @classmethod
    def from_row(cls, row: Row) -> Record:
        fields = record_fields(row)
        ref = fields["content_ref"]
        return cls(
            seq=row["seq"], time=row["time"], actor=row["actor"], event=row["event"], subject=row["subject"],
            inputs={k: Artifact.from_json(v) for k, v in fields["inputs"].items()},
            outputs={k: Artifact.from_json(v) for k, v in fields["outputs"].items()},
            model_hash=row["model_hash"], parameters=fields["parameters"],
            content_ref=None if ref is None else ContentRef(**ref), prev_hash=row["prev_hash"], hash=row["hash"],
            content=row.get("content"),
        )


def record_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The chained fields of a stored row, JSON parsed: what `hash` covers.
    ValueError names a field that is not as the log writes it."""
    fields: dict[str, Any] = {"v": RECORD_VERSION}
    if type(row.get("seq")) is not int:
        raise ValueError(f"seq: {row.get('seq')!r} is not an integer")
    fields["seq"] = row["seq"]
    for name in TEXT_FIELDS:
        value = row.get(name)
        if not (isinstance(value, str) or (value is None and name in ("subject", "model_hash"))):
            raise ValueError(f"{name}: {value!r} is not text")
        fields[name] = value
    for name in JSON_FIELDS:
        text = row.get(name)
        if text is None and name == "content_ref":
            fields[name] = None
            continue
        try:
            value = json.loads(text)
            canonical = canonical_json(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: not JSON") from None
        if canonical != text:
            raise ValueError(f"{name}: not in canonical JSON form")
        fields[name] = value
    _check_shapes(fields)
    return fields


def _check_shapes(fields: Mapping[str, Any]) -> None:
    for name in ("inputs", "outputs"):
        entries = fields[name]
        if not isinstance(entries, dict) or not all(
                isinstance(a, dict) and set(a) == {"kind", "path", "sha256"} for a in entries.values()):
            raise ValueError(f"{name}: not a map of role -> {{kind, path, sha256}}")
    if not isinstance(fields["parameters"], dict):
        raise ValueError("parameters: not a JSON object")
    ref = fields["content_ref"]
    if ref is not None and (not isinstance(ref, dict) or set(ref) != {"sha256", "salt_sha256", "stored"}):
        raise ValueError("content_ref: not {sha256, salt_sha256, stored}")


def record_hash(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(dict(fields)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _Entry:
    """A record's fields before its place in the log (seq, prev_hash) is known."""

    values: Row  # time, actor, event, subject, inputs, outputs, model_hash, parameters, content_ref as stored
    content: str | None
    salt: str | None

    def row(self, seq: int, prev_hash: str) -> Row:
        row = {**self.values, "seq": seq, "prev_hash": prev_hash, "content": self.content, "content_salt": self.salt}
        row["hash"] = record_hash(record_fields(row))
        return row


def _artifacts(given: Mapping[str, ArtifactLike | None] | None) -> str:
    return canonical_json({role: artifact(value).to_json() for role, value in (given or {}).items()
                           if value is not None})


def _text(value: str | None, name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: expected non-empty text, got {value!r}")
    return value


# ----- checkpoints and signatures ------------------------------------------------------------


@dataclass(frozen=True)
class LogCheckpoint:
    """The Merkle tree hash of records 0 .. size-1 at a time, optionally signed."""

    size: int
    root: str  # hex
    time: str
    signature: str | None = None  # Ed25519 over `message()`, hex
    id: int | None = None  # its row in the log; None for one read from a file

    def message(self) -> bytes:
        return SIGNATURE_CONTEXT + canonical_json({"root": self.root, "size": self.size, "time": self.time}).encode()

    @property
    def label(self) -> str:
        where = f"checkpoint #{self.id}" if self.id is not None else "external checkpoint"
        return f"{where} (size {self.size}, {self.time})"

    def to_json(self) -> dict[str, Any]:
        return {"root": self.root, "signature": self.signature, "size": self.size, "time": self.time}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], id: int | None = None) -> LogCheckpoint:
        """DamagedCheckpoint when its size is no whole number ("1_0" reads as 10, as Python reads it)."""
        try:
            size = int(data["size"])
        except (TypeError, ValueError):
            where = f"checkpoint #{id}" if id is not None else "external checkpoint"
            raise DamagedCheckpoint(where, f"damaged: {where} has size {data['size']!r}, not a whole number of "
                                           "records") from None
        return cls(size=size, root=data["root"], time=data["time"], signature=data.get("signature"), id=id)


class DamagedCheckpoint(ValueError):
    """A stored checkpoint that cannot be read (`where` names it): verify reports the log not intact."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(reason)
        self.where = where


def sign_checkpoint(checkpoint: LogCheckpoint, key: Ed25519PrivateKey) -> LogCheckpoint:
    return replace(checkpoint, signature=sign(checkpoint.message(), key))


def signature_valid(checkpoint: LogCheckpoint, public_key: Ed25519PublicKey) -> bool:
    return checkpoint.signature is not None and signature_holds(checkpoint.message(), checkpoint.signature, public_key)


@dataclass(frozen=True)
class InclusionProof:
    """RFC 6962 audit path: record `seq` is leaf `seq` of the tree of the first `size` records."""

    seq: int
    size: int
    path: tuple[str, ...]  # sibling hashes (hex), leaf level first

    def to_json(self) -> dict[str, Any]:
        return {"path": list(self.path), "seq": self.seq, "size": self.size}


def verify_proof(record: Record, proof: InclusionProof, checkpoint: LogCheckpoint) -> bool:
    """Whether `record` (its hash recomputed from its fields) is leaf `proof.seq` of the checkpoint's tree."""
    row = record_row(record)
    try:
        genuine = record_hash(record_fields(row)) == record.hash
    except ValueError:
        return False
    return (genuine and proof.seq == record.seq and proof.size == checkpoint.size
            and verify_inclusion(bytes.fromhex(record.hash), proof.seq, proof.size,
                                 [bytes.fromhex(p) for p in proof.path], bytes.fromhex(checkpoint.root)))


def record_row(record: Record) -> Row:
    """A Record back as the row it was read from (salt aside)."""
    return {
        "seq": record.seq, "time": record.time, "actor": record.actor, "event": record.event,
        "subject": record.subject, "model_hash": record.model_hash, "prev_hash": record.prev_hash,
        "inputs": canonical_json({k: a.to_json() for k, a in record.inputs.items()}),
        "outputs": canonical_json({k: a.to_json() for k, a in record.outputs.items()}),
        "parameters": canonical_json(record.parameters),
        "content_ref": None if record.content_ref is None else canonical_json(record.content_ref.to_json()),
        "hash": record.hash, "content": record.content,
    }


# ----- verification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    records: int  # records checked (up to and including the first bad one)
    checkpoints: int
    signed: int  # checkpoints whose signature was checked and holds
    first_bad: int | None = None  # sequence number of the first bad record
    checkpoint: str | None = None  # the checkpoint at fault, when one is
    reason: str = ""

    def summary(self) -> str:
        if self.ok:
            signed = f", {self.signed} signature(s) valid" if self.signed else ""
            return f"audit log intact: {self.records} records, {self.checkpoints} checkpoint(s){signed}"
        where = f"record {self.first_bad}: " if self.first_bad is not None else ""
        return f"audit log NOT intact: {where}{self.reason}"


def erased_seqs(rows: Iterable[Row]) -> set[int]:
    """Records whose content an `audit.erase` record says it cleared."""
    found: set[int] = set()
    for row in rows:
        if row.get("event") == EVENT_ERASE:
            try:
                found.update(int(seq) for seq in json.loads(row["parameters"]).get("records", []))
            except (TypeError, ValueError, AttributeError):
                continue  # a damaged erase record is reported at its own place
    return found


def verify_log(rows: Iterable[Row], checkpoints: Iterable[LogCheckpoint] = (), *, erased: Collection[int] | None = None,
               public_key: Ed25519PublicKey | None = None) -> VerifyReport:
    """Check a log's rows (in stored order) against each other and against its checkpoints.

    `erased`: the records that audit.erase records name (read from `rows`,
    then held in memory, when not given)."""
    return _verify(rows, sorted(checkpoints, key=lambda c: c.size), erased, public_key)


def _verify(rows: Iterable[Row], checkpoints: Iterable[LogCheckpoint], erased: Collection[int] | None,
            public_key: Ed25519PublicKey | None) -> VerifyReport:
    """`_verify_walk`, with a stored checkpoint that cannot be read (its size no number: read as
    the walk reaches it) reported as the failure, not raised: a damaged log is not intact."""
    try:
        return _verify_walk(rows, checkpoints, erased, public_key)
    except DamagedCheckpoint as err:
        return VerifyReport(False, 0, 0, 0, checkpoint=err.where, reason=str(err))


def _verify_walk(rows: Iterable[Row], checkpoints: Iterable[LogCheckpoint], erased: Collection[int] | None,
                 public_key: Ed25519PublicKey | None) -> VerifyReport:
    """`verify_log` over checkpoints already in size order, taken one at a time as the records
    reach them (so a log's may stream from its database), each counted and its signature checked
    as it passes. A bad signature is still the failure reported, whatever the records hold."""
    if erased is None:
        rows = list(rows)
        erased = erased_seqs(rows)
    seals = _Seals(public_key)
    walk = _Walk(map(seals.check, checkpoints), erased)
    checked, problem = 0, None
    for position, row in enumerate(rows):
        checked, problem = position + 1, walk.add(position, row)
        if problem is not None or seals.bad is not None:
            break
    beyond = deque(walk.rest(), maxlen=1)  # drains the checkpoints (all counted and checked); keeps the largest
    failure = seals.failure()
    if failure is not None:
        return VerifyReport(False, 0, seals.count, seals.signed, checkpoint=failure[0], reason=failure[1])
    problem = walk.blame(problem)
    if problem is not None:
        first_bad, where, reason = problem
        return VerifyReport(False, checked, seals.count, seals.signed, first_bad, where, reason)
    if beyond:
        c = beyond[0]
        return VerifyReport(False, walk.size, seals.count, seals.signed, walk.size, c.label,
                            f"missing: the log ends after {walk.size} records but {c.label} covers {c.size}; "
                            f"records {walk.size}..{c.size - 1} were removed")
    return VerifyReport(True, walk.size, seals.count, seals.signed)


@dataclass
class _Seals:
    """The checkpoints' count and, with a public key, their signatures, checked as they pass in size
    order: the first that does not verify is the failure, and so is a log with none signed."""

    public_key: Ed25519PublicKey | None
    count: int = 0
    signed: int = 0  # signatures that hold, before any that does not
    bad: LogCheckpoint | None = None  # the first whose signature does not verify

    def check(self, c: LogCheckpoint) -> LogCheckpoint:
        self.count += 1
        if self.public_key is not None and self.bad is None and c.signature is not None:
            if signature_valid(c, self.public_key):
                self.signed += 1
            else:
                self.bad = c
        return c

    def failure(self) -> tuple[str | None, str] | None:
        """(checkpoint, reason) when the signatures fail, else None."""
        if self.bad is not None:
            return self.bad.label, f"{self.bad.label}: the signature does not verify with this public key"
        if self.public_key is not None and self.signed == 0:
            return None, "no checkpoint is signed, so nothing is checked against the public key"
        return None


@dataclass
class _Walk:
    """State of one pass over the records: the tree so far and the checkpoints still ahead."""

    checkpoints: Iterator[LogCheckpoint]  # in size order; the first is taken at once, before any record
    erased: Collection[int]
    frontier: list[bytes] = field(default_factory=list)
    size: int = 0
    prev: str = GENESIS
    position_of: dict[str, int] = field(default_factory=dict)  # hash -> position, to name an insertion
    matched: int = 0  # size of the last checkpoint whose root matched
    reached: int = 0  # the largest size among the checkpoints met so far
    upcoming: LogCheckpoint | None = None  # the next checkpoint to reach
    mismatch: tuple[int, int, str, str] | None = None  # the first checkpoint that did not match: (from, to, which, why)

    def __post_init__(self) -> None:
        self.upcoming = next(self.checkpoints, None)

    def rest(self) -> Iterator[LogCheckpoint]:
        """The checkpoints not reached, reading them all: those that cover more records than were walked."""
        ahead = self.checkpoints if self.upcoming is None else chain([self.upcoming], self.checkpoints)
        self.upcoming = None
        return (c for c in ahead if c.size > self.size)

    def add(self, position: int, row: Row) -> Problem | None:
        """A problem with this record, or None (then it joins the tree and meets the checkpoints of its size)."""
        problem = _row_problem(row, position, self.prev, self.erased)
        if problem is not None:
            inserted = _inserted_at(row, position, self.position_of)
            if inserted is not None:
                return inserted, None, (f"inserted: record {position} (seq {row.get('seq')}) was written to follow "
                                        f"record {inserted - 1}, so records {inserted}..{position - 1} were put in "
                                        f"between")
            return position, None, problem
        self.prev = row["hash"]
        self.position_of[self.prev] = position
        self.frontier, self.size = extend_frontier(self.frontier, self.size, [bytes.fromhex(self.prev)])
        while self.upcoming is not None and self.upcoming.size <= self.size:
            c, self.upcoming = self.upcoming, next(self.checkpoints, None)
            if c.size < self.reached and self.mismatch is None:  # the store sorted a size that is no number
                self.mismatch = (self.matched, c.size, c.label, (
                    f"damaged: {c.label} comes after checkpoints of more records; its size is not stored as a "
                    f"whole number"))
            elif c.size == self.size and frontier_root(self.frontier).hex() != c.root and self.mismatch is None:
                self.mismatch = (self.matched, c.size, c.label, (
                    f"rewritten: records {self.matched}..{c.size - 1} do not hash to the root of {c.label}; "
                    f"one of them (and every hash after it) was recomputed after that checkpoint"))
            elif self.mismatch is None:
                self.matched = c.size
            self.reached = max(self.reached, c.size)
        return None

    def blame(self, problem: Problem | None) -> Problem | None:
        """The first failure: a record's own problem when it lies inside the range of the first
        checkpoint that did not match (it says more), else that checkpoint's."""
        if self.mismatch is None:
            return problem
        start, end, label, reason = self.mismatch
        if problem is not None and start <= problem[0] < end:
            return problem
        return start, label, reason


def _row_problem(row: Row, position: int, prev: str, erased: Collection[int]) -> str | None:
    seq = row.get("seq")
    if seq != position:
        return (f"missing or moved: expected record {position} here, found {seq!r}" if isinstance(seq, int)
                else f"seq: {seq!r} is not an integer")
    try:
        fields = record_fields(row)
    except ValueError as err:
        return str(err)
    if record_hash(fields) != row.get("hash"):
        return "altered: its hash does not match its fields (a field or the hash itself was changed)"
    if row["prev_hash"] != prev:
        return f"unlinked: its prev_hash is not the hash of record {position - 1}" if position else \
            "unlinked: record 0 must follow the genesis hash"
    return _content_problem(row, fields["content_ref"], erased)


def _content_problem(row: Row, ref: dict[str, Any] | None, erased: Collection[int]) -> str | None:
    content, salt = row.get("content"), row.get("content_salt")
    if ref is None:
        return None if content is None and salt is None else "content: present, but the record references none"
    if salt is None:
        if content is not None:
            return "content: kept without its salt"
        return None if row["seq"] in erased else "content: removed, but no audit.erase record names this record"
    try:
        salt_bytes = bytes.fromhex(salt)
    except (TypeError, ValueError):
        salt_bytes = None
    if salt_bytes is None or salt_bytes.hex() != salt:  # one spelling: fromhex also reads upper case
        return "content_salt: not lower-case hex"
    if hashlib.sha256(salt_bytes).hexdigest() != ref["salt_sha256"]:
        return "content_salt: does not match the salt hash the record commits to"
    if ref["stored"] != (content is not None):
        return "content: removed without its salt (not an erasure)" if ref["stored"] else \
            "content: present in a hash-only record"
    if content is not None and content_sha256(salt_bytes, content) != ref["sha256"]:
        return "content: does not match the content hash the record commits to"
    return None


def _inserted_at(row: Row, position: int, position_of: Mapping[str, int]) -> int | None:
    """j when the row at `position` is really record j (its prev_hash is record j-1's hash and its own
    hash holds for seq j), pushed down by records put in before it; None otherwise."""
    prev = row.get("prev_hash")
    j = 0 if prev == GENESIS else position_of.get(prev, -2) + 1
    if not 0 <= j < position:
        return None
    try:
        return j if record_hash(record_fields({**row, "seq": j})) == row.get("hash") else None
    except ValueError:
        return None


def _with_anchors(stored: Iterable[LogCheckpoint], anchors: Sequence[LogCheckpoint]) -> Iterator[LogCheckpoint]:
    """Stored checkpoints (in size order) with the anchors merged in, each after the stored ones of
    its size, as a stable sort of both would place it; an anchor equal to a stored checkpoint is that
    checkpoint, checked and counted once. Only the stored checkpoints of one size are held."""
    if not anchors:
        yield from stored
        return
    tagged = sorted(((a, True) for a in anchors), key=lambda pair: pair[0].size)  # (checkpoint, is an anchor)
    merged = heapq.merge(((c, False) for c in stored), tagged, key=lambda pair: pair[0].size)
    size, here = None, []  # the stored checkpoints of the current size, as JSON
    for c, is_anchor in merged:
        if c.size != size:
            size, here = c.size, []
        if not is_anchor:
            here.append(c.to_json())
        elif c.to_json() in here:
            continue
        yield c


# ----- the log ---------------------------------------------------------------------------------


class AuditLog(Closing):
    """An audit log in a database (SQLite file or URL) through `heron.store.audit`."""

    def __init__(self, store: AuditStore, *, store_content: bool = False, redact: Redactor = identity,
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, sign_key: Ed25519PrivateKey | None = None) -> None:
        self.store = store
        self.store_content = store_content
        self.redact = redact
        self.checkpoint_every = checkpoint_every  # 0: only on demand
        self.sign_key = sign_key

    @classmethod
    def open(cls, url_or_path: str | os.PathLike[str], *, create: bool = True, **options: Any) -> AuditLog:
        """The log at a path or database URL; `create=False` makes a missing SQLite file an error."""
        from heron.store.audit import AuditStore

        return cls(AuditStore.open(url_or_path, create=create), **options)

    @property
    def url(self) -> str:
        return self.store.url

    def close(self) -> None:
        self.store.close()


    # ----- writing ------------------------------------------------------------------------------

    def append(self, event: str, *, actor: str | None = None, inputs: Mapping[str, ArtifactLike | None] | None = None,
               outputs: Mapping[str, ArtifactLike | None] | None = None, model_hash: str | None = None,
               parameters: Mapping[str, Any] | None = None, content: str | None = None,
               subject: str | None = None) -> Record:
        """Append one record (hashing inputs and outputs first, outside the transaction) and return it."""
        entry = self._entry(event, actor, inputs, outputs, model_hash, parameters, content, subject)
        row = self.store.append(entry.row)
        if self.checkpoint_every and (row["seq"] + 1) % self.checkpoint_every == 0:
            self.checkpoint()
        return Record.from_row(row)

    def _entry(self, event: str, actor: str | None, inputs: Mapping[str, ArtifactLike | None] | None,
               outputs: Mapping[str, ArtifactLike | None] | None, model_hash: str | None,
               parameters: Mapping[str, Any] | None, content: str | None, subject: str | None) -> _Entry:
        values: Row = {
            "time": utc_now(), "actor": _text(actor or default_actor(), "actor"), "event": _text(event, "event"),
            "subject": _text(subject, "subject", optional=True),
            "model_hash": _text(model_hash, "model_hash", optional=True),
            "inputs": _artifacts(inputs), "outputs": _artifacts(outputs),
            "parameters": canonical_json(json_value(dict(parameters or {}))), "content_ref": None,
        }
        if content is None:
            return _Entry(values, None, None)
        salt = secrets.token_bytes(16)
        text = self.redact(content) if self.store_content else content
        ref = ContentRef(content_sha256(salt, text), hashlib.sha256(salt).hexdigest(), self.store_content)
        values["content_ref"] = canonical_json(ref.to_json())
        return _Entry(values, text if self.store_content else None, salt.hex())

    def checkpoint(self, sign_key: Ed25519PrivateKey | None = None) -> LogCheckpoint:
        """Store a checkpoint of every record so far (signed with `sign_key`, else the log's own key, if any)."""
        frontier, size = self._last_frontier()
        new = self.store.hashes(start=size)
        frontier, size = extend_frontier(frontier, size, [bytes.fromhex(h) for h in new])
        root = frontier_root(frontier) if size else EMPTY_ROOT
        checkpoint = LogCheckpoint(size=size, root=root.hex(), time=utc_now())
        key = sign_key or self.sign_key
        if key is not None:
            checkpoint = sign_checkpoint(checkpoint, key)
        row = {**checkpoint.to_json(), "frontier": json.dumps([h.hex() for h in frontier])}
        return replace(checkpoint, id=self.store.add_checkpoint(row))

    def _last_frontier(self) -> tuple[list[bytes], int]:
        """The frontier of the largest stored checkpoint, if it still folds to that checkpoint's root."""
        last = self.store.last_checkpoint()
        if last is None:
            return [], 0
        try:
            frontier = [bytes.fromhex(h) for h in json.loads(last["frontier"])]
        except (TypeError, ValueError):
            return [], 0
        if type(last["size"]) is not int or last["size"] == 0 or len(frontier) != bin(last["size"]).count("1") or \
                frontier_root(frontier).hex() != last["root"]:
            return [], 0  # damaged: start over from the records
        return frontier, last["size"]

    def erase(self, subject: str, *, actor: str | None = None, reason: str = "") -> list[int]:
        """Clear the content (and salt) of every record of `subject`, and record that in an
        audit.erase record, in one transaction; returns the records cleared."""
        subject = _text(subject, "subject")
        with self.store.transaction() as conn:
            seqs = [row["seq"] for row in self.store.records(subject=subject, conn=conn)
                    if row["content_salt"] is not None or row["content"] is not None]
            if seqs:
                self.store.erase_content(seqs, conn)
                entry = self._entry(EVENT_ERASE, actor, None, None, None, {"records": seqs, "reason": reason},
                                    None, subject)
                self.store.append(entry.row, conn=conn)
        return seqs

    # ----- reading ------------------------------------------------------------------------------

    def records(self, *, event: str | None = None, subject: str | None = None) -> list[Record]:
        return [Record.from_row(row) for row in self.store.records(event=event, subject=subject)]

    def produced(self, sha256: str) -> list[Record]:
        """Records with an output of this hash (what wrote a file or folder)."""
        return [record for record in map(Record.from_row, self.store.records(outputs_containing=sha256))
                if any(a.sha256 == sha256 for a in record.outputs.values())]

    def checkpoints(self) -> list[LogCheckpoint]:
        return [LogCheckpoint.from_json(row, id=row["id"]) for row in self.store.checkpoints()]

    def prove(self, seq: int, checkpoint: LogCheckpoint | None = None) -> InclusionProof:
        """The audit path of record `seq` in a checkpoint's tree (default: the largest checkpoint)."""
        if checkpoint is None:
            last = self.store.last_checkpoint()
            checkpoint = None if last is None else LogCheckpoint.from_json(last, id=last["id"])
        if checkpoint is None or not 0 <= seq < checkpoint.size:
            raise ValueError(f"seq: no checkpoint covers record {seq}; write one first (heron audit checkpoint)")
        leaves = [bytes.fromhex(h) for h in self.store.hashes(stop=checkpoint.size)]
        return InclusionProof(seq, checkpoint.size, tuple(p.hex() for p in inclusion_proof(leaves, seq)))

    def verify(self, public_key: Ed25519PublicKey | None = None, anchors: Sequence[LogCheckpoint] = ()) -> VerifyReport:
        """Check every record and checkpoint (and `anchors`: checkpoints kept outside the database).
        An anchor equal to a stored checkpoint, as `heron audit checkpoint --out` writes it, is
        that checkpoint, checked and counted once; one that differs is checked on its own.
        Checkpoints stream beside the records, one at a time, never all held at once."""
        # One connection for both reads, the checkpoints' query first (_Walk takes one at once): the
        # records read are never older than the checkpoints read, as when these were read first.
        with self.store.transaction() as conn:
            erased = _ErasedSeqs(lambda: self.store.records(event=EVENT_ERASE, conn=conn))
            stored = (LogCheckpoint.from_json(row, id=row["id"]) for row in self.store.checkpoints_by_size(conn))
            return _verify(self.store.records(conn=conn), _with_anchors(stored, anchors), erased, public_key)


class _ErasedSeqs(Collection[int]):
    """The records audit.erase records name, read again when a record's content is found removed
    and none names it yet. Each read sees what was committed when it ran, so an erase committed
    after the first read but before the walk reached its records (content cleared and the erase
    record written in one transaction: one is never seen without the other) would otherwise
    read as tampering; a removal that no erase record names, read after it, still is."""

    def __init__(self, read: Callable[[], Iterable[Row]]) -> None:
        self.read = read
        self.seqs = erased_seqs(read())

    def __contains__(self, seq: object) -> bool:
        if seq not in self.seqs:
            self.seqs = erased_seqs(self.read())
        return seq in self.seqs

    def __iter__(self) -> Iterator[int]:
        return iter(self.seqs)

    def __len__(self) -> int:
        return len(self.seqs)


# ----- the configured log ------------------------------------------------------------------------

_STORES: dict[str, AuditStore] = {}  # one engine per database, reused by every record_event


def log_location(setting: str | None = None) -> str | None:
    """Where the log lives: $HERON_AUDIT_LOG (a path or URL; "off": nowhere), else runs/audit.db
    under the working directory. A path comes back absolute."""
    setting = (os.environ.get(LOG_ENV, "") if setting is None else setting).strip()
    if setting.lower() == "off":
        return None
    if "://" in setting:
        return setting
    return str(Path(setting or DEFAULT_LOG).resolve())


def audit_log(*, redact: Redactor | None = None) -> AuditLog | None:
    """The log normal work records to, or None when it is off ($HERON_AUDIT_LOG=off).

    Content is kept when $HERON_AUDIT_CONTENT is 1, after `redact`: by default
    `heron.govern.pii.redact`, which replaces personal data with type tags
    (loaded only when content is kept). The periodic checkpoints are signed
    with the key file $HERON_AUDIT_SIGN_KEY names."""
    from heron.store.audit import AuditStore

    location = log_location()
    if location is None:
        return None
    sign_key = _env_signing_key()  # before the store: a refused key leaves no new database file behind
    if location not in _STORES:
        _STORES[location] = AuditStore.open(location)
    store_content = os.environ.get(CONTENT_ENV, "") in ("1", "on", "true")
    if redact is None:
        redact = _pii_redact() if store_content else identity
    return AuditLog(_STORES[location], store_content=store_content, redact=redact, sign_key=sign_key)


def _env_signing_key() -> Ed25519PrivateKey | None:
    """The private key $HERON_AUDIT_SIGN_KEY names, or None when it is unset. A path with no file,
    a folder, a file this user may not read or one that is no Ed25519 private key is refused naming
    the variable: any command that records reads it, and open()'s bare `[Errno 2] No such file or
    directory` from deep inside that command says neither what nor where."""
    key_file = os.environ.get(SIGN_KEY_ENV)
    if not key_file:
        return None
    try:
        return load_signing_key(existing_input(Path(key_file), SIGN_KEY_ENV, "private key"))
    except PermissionError:  # open()'s `[Errno 13] Permission denied: '...'` names the path alone
        raise PermissionError(f"{SIGN_KEY_ENV}: cannot read the private key at {key_file} "
                              "(permission denied)") from None
    except ValueError as err:  # load_signing_key's message names the path, not where it came from
        raise ValueError(f"{SIGN_KEY_ENV}: {err}") from None


def _pii_redact() -> Redactor:
    from heron.govern.pii import redact

    return redact


def record_event(event_type: str, *, actor: str | None = None,
                 inputs: Mapping[str, ArtifactLike | None] | None = None,
                 outputs: Mapping[str, ArtifactLike | None] | None = None, model_hash: str | None = None,
                 parameters: Mapping[str, Any] | None = None, content: str | None = None,
                 subject: str | None = None) -> Record | None:
    """Append one record to the configured log (None when the log is off).

    inputs / outputs map a role ("data", "base", "checkpoint", ...) to a path
    (a file or folder, hashed), a JSON description (hashed canonically) or an
    Artifact; None values are skipped. actor defaults to the OS user."""
    log = audit_log()
    if log is None:
        return None
    return log.append(event_type, actor=actor, inputs=inputs, outputs=outputs, model_hash=model_hash,
                      parameters=parameters, content=content, subject=subject)


__all__ = [
    "AuditLog", "DamagedCheckpoint", "LogCheckpoint", "ContentRef", "DEFAULT_LOG", "EVENT_ERASE", "GENESIS",
    "InclusionProof", "LOG_ENV",
    "Record", "Redactor", "VerifyReport", "audit_log", "content_sha256", "log_location", "record_event",
    "record_fields", "record_hash", "sign_checkpoint", "signature_valid", "verify_log", "verify_proof",
]
