"""Planted personal data never reaches the audit log or the run's metrics files,
and content the log is told to keep is redacted first."""
from pathlib import Path

from heron.cli.main import main
from heron.govern.audit import CONTENT_ENV, LOG_ENV, AuditLog, record_event

PLANTED = ["jane.doe@example.org", "123-45-6789", "4111 1111 1111 1111", "+1 415 555 0134", "Jane Doe"]


def corpus(root: Path) -> Path:
    root.mkdir()
    for i in range(30):
        (root / f"note_{i}.txt").write_text(
            f"Note {i}: Jane Doe (jane.doe@example.org, +1 415 555 0134) paid with 4111 1111 1111 1111; "
            f"SSN 123-45-6789. The total was {i * 7} dollars.\n")
    return root


def test_a_run_on_personal_data_leaves_none_in_the_log_or_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv(LOG_ENV, str(tmp_path / "audit.db"))
    text, tok, shards, run = corpus(tmp_path / "corpus"), tmp_path / "tok.json", tmp_path / "shards", tmp_path / "run"
    assert main(["tokenizer", "train", str(text), "--ext", ".txt", "--vocab-size", "300", "--out", str(tok)]) == 0
    assert main(["data", "prepare", str(text), "--ext", ".txt", "--tokenizer", str(tok), "--out", str(shards)]) == 0
    assert main(["train", "test", "--set", f"out_dir={run}", "--set", f"data.shards={shards}",
                 "--set", f"data.tokenizer={tok}", "--set", "data.synthetic=null", "--set", "train.steps=4",
                 "--set", "schedule.warmup_steps=1", "--set", "train.eval_every=2", "--set", "train.progress=false"]) == 0
    assert [r.event for r in AuditLog.open(tmp_path / "audit.db").records()] == ["train"]
    scanned = [tmp_path / "audit.db", *run.rglob("*.json"), *run.rglob("*.jsonl"), *run.rglob("*.yaml")]
    assert any(p.name == "metrics.jsonl" for p in scanned) and any(p.name == "lineage.json" for p in scanned)
    for path in scanned:
        if path.name == "tokenizer.json":  # the model's vocabulary, learned from the text, not a record
            continue
        data = path.read_bytes()
        for value in PLANTED:
            assert value.encode() not in data, f"{value!r} in {path}"


def test_kept_content_is_redacted_before_it_is_stored(tmp_path, monkeypatch):
    monkeypatch.setenv(LOG_ENV, str(tmp_path / "audit.db"))
    monkeypatch.setenv(CONTENT_ENV, "1")
    record_event("serve.request", content="Hi, I am Jane Doe, mail me at jane.doe@example.org or call +1 415 555 0134.")
    stored = (tmp_path / "audit.db").read_bytes()
    for value in ["jane.doe@example.org", "+1 415 555 0134"]:
        assert value.encode() not in stored
    assert b"<EMAIL>" in stored
