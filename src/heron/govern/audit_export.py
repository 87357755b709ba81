"""The audit log out to a file and back: JSON (exact, with the checkpoints) or CSV (for spreadsheets).

    export_log(log, "audit.json")                  # or "audit.csv", fmt="csv"
    rows, checkpoints = read_export("audit.json")
    verify_log(rows, checkpoints).ok               # an export verifies as the database does
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from heron.govern.audit import COLUMNS, JSON_FIELDS, AuditLog, LogCheckpoint, Row
from heron.govern.digest import canonical_json
from heron.store.atomic import atomic_writer

FORMATS = ("json", "csv")
EXPORT_FORMAT = "heron-audit-log/1"
# A spreadsheet runs a cell that starts with one of = + - @ (or tab, carriage return) as a formula: an actor
# "=HYPERLINK(...)" would. Such a text cell is written after a ', which makes it text (OWASP, "CSV
# Injection"); so is one that starts with ' itself, so that reading strips exactly one ' and gets it back.
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def export_rows(rows: Iterable[Row], checkpoints: Sequence[LogCheckpoint], path: str | os.PathLike[str],
                fmt: str = "json") -> int:
    """`write_rows` to a file, whole or not at all, as every file Heron writes."""
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    with atomic_writer(path, newline="" if fmt == "csv" else None) as f:
        return write_rows(rows, checkpoints, f, fmt)


def write_rows(rows: Iterable[Row], checkpoints: Sequence[LogCheckpoint], out: TextIO, fmt: str = "json") -> int:
    """JSON: {format, records, checkpoints}, JSON fields embedded as values (as text when a
    tampered one no longer parses), exact. CSV: one row a record, every column as stored, but a
    text that a spreadsheet would run as a formula, or that starts with ', is written after a '
    (CSV_FORMULA_START); an empty cell is NULL (so empty content reads back as none: use JSON to
    keep everything). Returns the record count."""
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "json":
        records = [_embed_json(row) for row in rows]
        document = {"format": EXPORT_FORMAT, "records": records, "checkpoints": [c.to_json() for c in checkpoints]}
        out.write(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
        return len(records)
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    count = 0
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in COLUMNS])
        count += 1
    return count


def read_export(path: str | os.PathLike[str]) -> tuple[list[Row], list[LogCheckpoint]]:
    """(rows, checkpoints) from a file `export_rows` wrote (CSV holds no checkpoints), ready for `verify_log`."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
            if missing:  # else any CSV, even an empty file, would read as a log of no records, and verify
                lacks = "the header, " + ",".join(COLUMNS) if missing == list(COLUMNS) else ", ".join(missing)
                raise ValueError(f"{path}: not an audit log export: its first line lacks {lacks}")
            rows = [{c: (None if line.get(c) in ("", None) else line[c].removeprefix("'")) for c in COLUMNS}
                    for line in reader]
        for row in rows:
            row["seq"] = int(row["seq"]) if row["seq"] is not None and row["seq"].lstrip("-").isdigit() else row["seq"]
        return rows, []
    document = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not an audit log export ({EXPORT_FORMAT})")
    rows = [_unembed_json(record) for record in document["records"]]
    return rows, [LogCheckpoint.from_json(c) for c in document.get("checkpoints", [])]


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    return "'" + value if isinstance(value, str) and value.startswith(CSV_FORMULA_START) else value


def _embed_json(row: Row) -> dict[str, Any]:
    out = {c: row.get(c) for c in COLUMNS}
    for name in JSON_FIELDS:
        text = out[name]
        try:
            value = json.loads(text) if text is not None else None
        except ValueError:
            continue
        if text is not None and canonical_json(value) == text:
            out[name] = value
    return out


def _unembed_json(record: Mapping[str, Any]) -> Row:
    row = {c: record.get(c) for c in COLUMNS}
    for name in JSON_FIELDS:
        if row[name] is not None and not isinstance(row[name], str):  # JSON fields are objects, so text is raw
            row[name] = canonical_json(row[name])
    return row


def export_log(log: AuditLog, path: str | os.PathLike[str] | TextIO, fmt: str = "json") -> int:
    """Write every record of `log` (and, for JSON, every checkpoint) to a file, or to an open
    text stream such as sys.stdout; returns the record count. The records are the log as one read
    saw it, spooled, so a stream that blocks (a pager left open) never holds the log's writers up."""
    checkpoints = log.checkpoints()  # first: every record they cover is then read
    if isinstance(path, (str, os.PathLike)):
        return export_rows(log.store.records_spooled(), checkpoints, path, fmt)
    return write_rows(log.store.records_spooled(), checkpoints, path, fmt)


__all__ = ["CSV_FORMULA_START", "EXPORT_FORMAT", "FORMATS", "export_log", "export_rows", "read_export", "write_rows"]
