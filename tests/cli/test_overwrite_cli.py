"""The verbs that write a file from a database refuse an existing file unless --overwrite is given
(feedback export, consent history --out, audit checkpoint --out, audit export), and never write over the
database."""
import json
from pathlib import Path

from heron.cli.main import main
from heron.govern.audit import AuditLog

PAIR = {"prompt": "Add 1 and 1.", "chosen": "2", "rejected": "3"}


def refused_then_replaced(argv: list[str], out: Path, capsys) -> None:
    """`argv` refuses the existing `out` (left as it was), and with --overwrite replaces it."""
    out.write_text("mine\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out}: exists; write to a new file, or pass --overwrite to replace it" in err and err.count("\n") == 1
    assert out.read_text() == "mine\n"
    assert main([*argv, "--overwrite"]) == 0
    assert out.read_text() != "mine\n"


def test_feedback_export_refuses_an_existing_file_even_the_one_imported(tmp_path: Path, capsys) -> None:
    db, source = tmp_path / "feedback.db", tmp_path / "in.jsonl"
    source.write_text(json.dumps(PAIR) + "\n")
    assert main(["feedback", "import", str(source), "--db", str(db), "--annotator", "alice"]) == 0
    refused_then_replaced(["feedback", "export", str(source), "--db", str(db)], source, capsys)
    assert main(["feedback", "export", str(db), "--db", str(db), "--overwrite"]) == 2  # never the store itself
    assert "is the feedback store being read" in capsys.readouterr().err


def test_consent_history_refuses_an_existing_file(tmp_path: Path, capsys) -> None:
    db = str(tmp_path / "consent.db")
    assert main(["consent", "grant", "alice", "training", "--db", db]) == 0
    refused_then_replaced(["consent", "history", "alice", "--db", db, "--out", str(tmp_path / "a.json")],
                          tmp_path / "a.json", capsys)
    assert main(["consent", "history", "alice", "--db", db, "--out", db, "--overwrite"]) == 2
    assert "is the consent registry being read" in capsys.readouterr().err


def test_audit_checkpoint_refuses_an_existing_file_before_storing_the_checkpoint(tmp_path: Path, capsys) -> None:
    db = tmp_path / "audit.db"
    AuditLog.open(db).close()
    out = tmp_path / "cp.json"
    out.write_text("mine\n")
    before = db.read_bytes()
    assert main(["audit", "checkpoint", "--log", str(db), "--out", str(out)]) == 2
    assert db.read_bytes() == before  # no checkpoint stored for a refused --out
    capsys.readouterr()
    refused_then_replaced(["audit", "checkpoint", "--log", str(db), "--out", str(out)], out, capsys)
    assert json.loads(out.read_text())["root"]
    assert main(["audit", "checkpoint", "--log", str(db), "--out", str(db), "--overwrite"]) == 2
    assert "is the audit log being read" in capsys.readouterr().err


def test_audit_export_refuses_an_existing_file(tmp_path: Path, capsys) -> None:
    db = tmp_path / "audit.db"
    AuditLog.open(db).close()
    for name in ("notes.json", "notes.csv"):
        refused_then_replaced(["audit", "export", str(tmp_path / name), "--log", str(db)], tmp_path / name, capsys)
    assert main(["audit", "export", str(db), "--log", str(db), "--format", "json", "--overwrite"]) == 2
    assert "is the audit log being read" in capsys.readouterr().err
