"""The one JSONL reader: every error names the file and the line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from heron.store.jsonl import read_jsonl_objects


def test_objects_come_with_their_lines_past_a_bom_and_blank_lines(tmp_path: Path) -> None:
    file = tmp_path / "rows.jsonl"
    file.write_bytes("\ufeff".encode() + b'{"a": 1}\n\n  \r\n{"b": "caf\xc3\xa9"}\r\n')
    assert read_jsonl_objects(file) == [(1, {"a": 1}), (4, {"b": "café"})]


@pytest.mark.parametrize(("line", "message"), [
    (b'{"a": "caf\xe9"}', r"rows\.jsonl:3: not UTF-8 \(invalid continuation byte at byte 11 of the line\)"),
    (b'{"a": ', r"rows\.jsonl:3: invalid JSON: Expecting value \(column 7\)"),
    (b"[1, 2]", r"rows\.jsonl:3: expected a JSON object, got list"),
    (b'"text"', r"rows\.jsonl:3: expected a JSON object, got str"),
])
def test_each_error_names_the_file_and_line(tmp_path: Path, line: bytes, message: str) -> None:
    file = tmp_path / "rows.jsonl"
    file.write_bytes(json.dumps({"ok": 1}).encode() + b"\n\n" + line + b"\n")  # line 2 blank, line 3 bad
    with pytest.raises(ValueError, match=message):
        read_jsonl_objects(file)
