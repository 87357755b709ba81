"""Feedback as JSONL: lines in (comparisons and ratings), pairs out.

A comparison line follows the prompt/chosen/rejected convention that TRL's
DPO and reward trainers read (https://huggingface.co/docs/trl/dataset_formats#preference):

    {"prompt": "...", "chosen": "...", "rejected": "..."}

with optional provenance: "annotator", "created_at" (ISO 8601 with an offset),
"chosen_model", "rejected_model", "note", and "comparison_id" (read and ignored:
ids are the store's own). A rating line is

    {"prompt": "...", "response": "...", "rating": 4}

with optional "model", "scale", "annotator" and "created_at". Texts are strings
or lists of {"role", "content"} messages. Any other key is an error naming it,
so a misspelt provenance key is never dropped silently.

The lines are read by `read_jsonl_objects`, the one JSONL reader of every layer
(chats, alignment data): its errors name the file and the line.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

from heron.store.atomic import atomic_writer
from heron.store.records import PairInput, RatingInput

# Each kind of line: the keys it needs, and every key it may hold (the record's
# fields; "comparison_id" is an export's and is read and ignored).
PAIR_REQUIRED = ("prompt", "chosen", "rejected", "annotator")
PAIR_KEYS = (*(f.name for f in fields(PairInput)), "comparison_id")
RATING_REQUIRED = ("prompt", "response", "rating", "annotator")
RATING_KEYS = tuple(f.name for f in fields(RatingInput))


def read_jsonl_objects(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each line of a JSONL file that is not blank.

    Every error is a ValueError that names the file and the line, `data.jsonl:3: ...`: bytes
    that are not UTF-8, invalid JSON, a value that is not a JSON object. A BOM on line 1, as
    Windows editors write, is not JSON and is skipped.
    """
    file = Path(path)
    rows = []
    with open(file, "rb") as f:  # decoded line by line, so that bytes that are not UTF-8 are found by line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{file}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start + 1} "
                                 "of the line)") from None
            if line.strip():
                rows.append((lineno, _json_object(line, f"{file}:{lineno}")))
    return rows


def _json_object(line: str, where: str) -> dict[str, Any]:
    # The newline is stripped: else a truncated line's error points past it, at column 1.
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def read_feedback_jsonl(
    path: str | os.PathLike[str], *, annotator: str | None, now: datetime
) -> list[PairInput | RatingInput]:
    """Every line of a file, validated; blank lines are skipped.

    A line's own "annotator" and "created_at" win over `annotator` and `now`,
    which fill them where a line has none. Errors name the file, the 1-based
    line and the field: `feedback.jsonl:3: 'chosen' is missing`.
    """
    rows: list[PairInput | RatingInput] = []
    for lineno, record in read_jsonl_objects(path):
        try:
            rows.append(parse_record(record, annotator=annotator, now=now))
        except ValueError as exc:
            raise ValueError(f"{Path(path)}:{lineno}: {exc}") from None
    return rows


def parse_record(record: dict[str, Any], *, annotator: str | None, now: datetime) -> PairInput | RatingInput:
    """One line's object as a comparison or a rating; errors name the field."""
    if annotator is not None:
        record.setdefault("annotator", annotator)
    record.setdefault("created_at", now)
    if "chosen" in record or "rejected" in record:
        _check_keys(record, PAIR_REQUIRED, PAIR_KEYS)
        record.pop("comparison_id", None)
        return PairInput(**record)
    if "response" in record or "rating" in record:
        _check_keys(record, RATING_REQUIRED, RATING_KEYS)
        return RatingInput(**record)
    raise ValueError("expected 'chosen' and 'rejected' (a comparison) or 'response' and 'rating' (a rating)")


def _check_keys(record: dict[str, object], required: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(record) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; this kind of line takes {list(allowed)}")
    for key in required:
        if key not in record:
            hint = " (give an annotator for the file, or one per line)" if key == "annotator" else ""
            raise ValueError(f"'{key}' is missing{hint}")


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Iterable[dict[str, object]]) -> int:
    """Write one JSON object per line, atomically (`atomic_writer`). Returns the row count."""
    count = 0
    with atomic_writer(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
