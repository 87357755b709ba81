"""`heron pii find|redact` through its argparse verb: text or a file in, JSON lines or redacted text out."""
import argparse
import json

import pytest

from heron.cli import pii


def heron(argv: list[str]) -> int:
    """What `heron ...` does once cli/main.py registers the verb."""
    parser = argparse.ArgumentParser(prog="heron")
    pii.register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


TEXT = "SSN 536-22-8741, card 4111 1111 1111 1111."
ENTITIES = "SSN,CREDIT_CARD"  # pattern types only: no name model to train


def test_find_prints_json_lines(capsys):
    assert heron(["pii", "find", TEXT, "--entities", ENTITIES]) == 0
    spans = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(s["entity"], s["text"], TEXT[s["start"]:s["end"]]) for s in spans] == [
        ("SSN", "536-22-8741", "536-22-8741"), ("CREDIT_CARD", "4111 1111 1111 1111", "4111 1111 1111 1111")]


def test_redact_reads_a_file_and_masks(tmp_path, capsys):
    path = tmp_path / "note.txt"
    path.write_text(TEXT)
    assert heron(["pii", "redact", str(path), "--entities", ENTITIES, "--operator", "mask"]) == 0
    assert capsys.readouterr().out == "SSN ***-**-8741, card **** **** **** 1111.\n"


def test_pseudonyms_take_the_secret_from_the_environment(monkeypatch, capsys):
    argv = ["pii", "redact", TEXT, "--entities", ENTITIES, "--operator", "pseudonym", "--scope", "s"]
    monkeypatch.delenv(pii.SECRET_ENV, raising=False)
    with pytest.raises(ValueError, match=pii.SECRET_ENV):
        heron(argv)
    monkeypatch.setenv(pii.SECRET_ENV, "k")
    assert heron(argv) == 0
    first = capsys.readouterr().out
    assert heron(argv) == 0
    assert capsys.readouterr().out == first and "536-22-8741" not in first and "4111 1111" not in first
