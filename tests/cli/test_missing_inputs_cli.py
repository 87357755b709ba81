"""An input path that is not there is refused in one line naming the argument or flag and the path, before
any work: not open()'s bare `[Errno 2] No such file or directory`, and no traceback."""
from pathlib import Path

import pytest

from heron.cli.main import main
from heron.govern.audit import AuditLog
from heron.train.checkpoint import save_model_folder


def refusal(argv: list[str], capsys) -> str:
    """The one line `heron ARGV` prints on standard error, once it has exited 2 with nothing on standard output."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and "Errno" not in err
    assert err.count("\n") == 1, err
    return err


def test_feedback_import_of_a_missing_file_names_it_before_the_store_is_made(tmp_path: Path, capsys) -> None:
    missing, db = tmp_path / "batch1.jsonl", tmp_path / "feedback.db"
    err = refusal(["feedback", "import", str(missing), "--db", str(db), "--annotator", "alice"], capsys)
    assert err == f"heron feedback: error: file: no JSONL file at {missing}\n"
    assert not db.exists()
    missing.mkdir()
    err = refusal(["feedback", "import", str(missing), "--db", str(db), "--annotator", "alice"], capsys)
    assert err == f"heron feedback: error: file: {missing} is a folder; give the JSONL file itself\n"


def test_card_with_a_missing_eval_file_names_the_flag(tmp_path: Path, capsys) -> None:
    (tmp_path / "ckpt").mkdir()
    missing = tmp_path / "results.json"
    err = refusal(["card", str(tmp_path / "ckpt"), "--eval", str(missing)], capsys)
    assert err == f"heron card: error: --eval: no evaluation results file at {missing}\n"
    assert list((tmp_path / "ckpt").iterdir()) == []


@pytest.mark.parametrize("argv, complaint", [
    (["checkpoint", "--sign-key", "{tmp}/private.pem"], "--sign-key: no private key at {tmp}/private.pem"),
    (["verify", "--public-key", "{tmp}/public.pem"], "--public-key: no public key at {tmp}/public.pem"),
    (["verify", "--anchor", "{tmp}/cp.json"], "--anchor: no checkpoint file at {tmp}/cp.json"),
])
def test_audit_with_a_missing_key_or_anchor_names_the_flag(tmp_path: Path, capsys, argv, complaint) -> None:
    db = tmp_path / "audit.db"
    AuditLog.open(str(db)).close()  # a log to check or sign: only the key or anchor is missing
    err = refusal(["audit", *(a.format(tmp=tmp_path) for a in argv), "--log", str(db)], capsys)
    assert err == f"heron audit: error: {complaint.format(tmp=tmp_path)}\n"


def test_compress_report_refuses_a_missing_variant_before_any_warning_or_measuring(tmp_path: Path, capsys,
                                                                                    code_model) -> None:
    model, tokenizer, shards = code_model()
    reference = save_model_folder(tmp_path / "ref", model, tokenizer=tokenizer)
    missing, out = tmp_path / "int8", tmp_path / "report"
    for folders in ([reference, missing], [missing, reference]):
        err = refusal(["compress", "report", *map(str, folders), "--shards", str(shards), "--out", str(out),
                       "--seq-len", "16", "--max-batches", "1", "--new-tokens", "2"], capsys)
        assert err == f"heron compress: error: checkpoints: no checkpoint at {missing}\n"  # no warning before it
        assert not out.exists()
    err = refusal(["compress", "report", str(reference), "--baseline", str(missing), "--shards", str(shards),
                   "--out", str(out)], capsys)
    assert err == f"heron compress: error: --baseline: no checkpoint at {missing}\n"
    assert not out.exists()
