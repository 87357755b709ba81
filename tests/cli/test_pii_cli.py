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
    path.write_text(TEXT + "\n")  # the file's own last newline, not a second one
    assert heron(["pii", "redact", str(path), "--entities", ENTITIES, "--operator", "mask"]) == 0
    assert capsys.readouterr().out == "SSN ***-**-8741, card **** **** **** 1111.\n"


@pytest.mark.parametrize("argument, error, complaint", [
    ("notes.txt", FileNotFoundError, "notes.txt: no such file"),
    ("data/notes", FileNotFoundError, "data/notes: no such file"),
    (".", IsADirectoryError, ".: is a folder"),
])
def test_a_mistyped_path_or_a_folder_is_an_error_not_the_text(tmp_path, monkeypatch, argument, error, complaint):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(error, match=complaint):
        heron(["pii", "redact", argument, "--entities", ENTITIES])


def test_words_and_addresses_are_read_as_text_and_a_file_must_be_utf8(tmp_path, capsys):
    for text in ("mail.com", "N/A", "https://example.org/notes.txt"):  # no file named, nor a folder's file
        assert heron(["pii", "redact", text, "--entities", ENTITIES]) == 0
        assert capsys.readouterr().out == text + "\n"
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8 text"):
        heron(["pii", "redact", str(tmp_path / "latin1.txt"), "--entities", ENTITIES])


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


def test_json_lines_stay_json_and_fields_choose_the_strings(tmp_path, capsys):
    """A feedback export redacted as text once came out as broken JSON; by suffix (or --format) its strings
    are redacted one by one, keys, numbers and nesting kept, and --fields leaves the other strings alone."""
    record = {"prompt": TEXT, "chosen": ["ok", {"note": "card 4111 1111 1111 1111"}], "rating": 5,
              "created_at": "536-22-8741"}  # not a date, but a string outside the chosen fields all the same
    path = tmp_path / "export.jsonl"
    path.write_text(json.dumps(record) + "\n\n" + json.dumps({"prompt": "nothing here"}) + "\n")
    assert heron(["pii", "redact", str(path), "--entities", ENTITIES]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) if line else None for line in lines] == [
        {"prompt": "SSN <SSN>, card <CREDIT_CARD>.", "chosen": ["ok", {"note": "card <CREDIT_CARD>"}], "rating": 5,
         "created_at": "<SSN>"}, None, {"prompt": "nothing here"}]
    assert heron(["pii", "redact", str(path), "--entities", ENTITIES, "--fields", "chosen"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first == {**record, "chosen": ["ok", {"note": "card <CREDIT_CARD>"}]}
    whole = tmp_path / "export.json"
    whole.write_text(json.dumps([record]))
    assert heron(["pii", "redact", str(whole), "--entities", ENTITIES, "--fields", "prompt"]) == 0
    assert json.loads(capsys.readouterr().out) == [{**record, "prompt": "SSN <SSN>, card <CREDIT_CARD>."}]


def test_json_that_does_not_parse_names_its_line_and_fields_need_json(tmp_path):
    path = tmp_path / "export.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"export.jsonl:2: not valid JSON \(Expecting value"):
        heron(["pii", "redact", str(path), "--entities", ENTITIES])
    with pytest.raises(ValueError, match="--fields: names keys of JSON records"):
        heron(["pii", "redact", TEXT, "--entities", ENTITIES, "--fields", "prompt"])
    assert heron(["pii", "redact", str(path), "--entities", ENTITIES, "--format", "text"]) == 0  # as plain text


@pytest.mark.parametrize("fields", ["", " , "])  # an unset shell variable would redact nothing
def test_fields_naming_no_key_are_refused(tmp_path, fields):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"a": TEXT}))
    with pytest.raises(ValueError, match="^--fields: names no key"):
        heron(["pii", "redact", str(path), "--entities", ENTITIES, "--fields", fields])


def test_fields_found_nowhere_in_the_input_are_refused_before_any_output(tmp_path, capsys):
    """A typo in --fields (`promt`) would print the very strings it meant to redact."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": TEXT}) + "\n")
    with pytest.raises(ValueError, match=r"^--fields: no key 'promt' in .*p.jsonl; nothing would be redacted under it$"):
        heron(["pii", "redact", str(path), "--entities", ENTITIES, "--fields", "prompt,promt"])
    assert capsys.readouterr().out == ""


def test_json_lines_split_at_newlines_only_and_long_text_is_text(tmp_path, capsys):
    """Heron's JSONL writes U+2028 and U+0085 raw inside strings (legal JSON); str.splitlines() cut
    lines there. A text argument over 1,024 characters is text, never a path (asking the file system
    about it failed: file name too long)."""
    path = tmp_path / "export.jsonl"
    records = [{"prompt": "one\u2028two\u0085three", "chosen": TEXT}, {"prompt": "x"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in records), newline="")
    assert heron(["pii", "redact", str(path), "--entities", ENTITIES]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.split("\n") if line.startswith("{")]
    assert out[0]["prompt"] == "one\u2028two\u0085three" and out[0]["chosen"] == "SSN <SSN>, card <CREDIT_CARD>."
    long = " ".join([TEXT] * 40)
    assert heron(["pii", "redact", long, "--entities", ENTITIES]) == 0
    assert capsys.readouterr().out.count("<SSN>") == 40


@pytest.mark.parametrize("content, complaint", [
    ('{"a": NaN}', "holds NaN, which is not JSON"),  # the output would not be JSON either
    ('[1, -Infinity]', "holds -Infinity, which is not JSON"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),  # not a RecursionError
    ("[" * 600 + "]" * 600, "JSON nested too deeply"),  # parsed, but too deep to walk (two frames a level)
])
def test_json_that_cannot_come_back_as_json_is_refused(tmp_path, content, complaint):
    path = tmp_path / "odd.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"^{path}: {complaint}"):
        heron(["pii", "redact", str(path), "--entities", ENTITIES])


@pytest.mark.parametrize("flag", ["--scope", "--secret-env"])
def test_pseudonym_settings_without_the_pseudonym_operator_are_refused(flag):
    with pytest.raises(ValueError, match=f"^{flag}: applies to --operator pseudonym only, not mask"):
        heron(["pii", "redact", TEXT, "--entities", ENTITIES, "--operator", "mask", flag, "s"])
