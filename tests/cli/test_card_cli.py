"""`heron card` through its argparse verb: a run folder in, README.md or ANNEX_IV.md out, user errors as
ValueError / FileNotFoundError (which `heron` prints as one line)."""
import argparse
import json
import sqlite3
from pathlib import Path

import pytest

from heron.cli import card
from heron.govern.audit import AuditLog
from heron.cli.main import main


def heron(argv: list[str]) -> int:
    """What `heron ...` does once cli/main.py registers the verb."""
    parser = argparse.ArgumentParser(prog="heron")
    card.register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder whose `latest` names a checkpoint shaped like a training run's (JSON only)."""
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    energy = {"joules": 36.0, "seconds": 2.0, "source": "estimate: CPU time x 10 W/core", "measured": False,
              "tokens": 256, "joules_per_token": 36.0 / 256, "grid_g_per_kwh": 475.0, "co2e_grams": 36.0 / 3.6e6 * 475,
              "unavailable": []}
    (step / "lineage.json").write_text(json.dumps({
        "kind": "pretrain", "recipe": {"name": "clitest", "train": {"batch_size": 8, "eval_batches": 1},
                                       "data": {"seq_len": 16}},
        "step": 2, "tokens_seen": 256, "seed": 0, "metrics": {"train_loss": 3.0, "val_loss": 2.5},
        "data": {"source": "synthetic", "kind": "permutation", "vocab_size": 32, "n_tokens": 64, "seed": 0,
                 "sha256": "12" * 32},
        "energy": energy, "files": {"model.safetensors": {"bytes": 1, "sha256": "34" * 32}}}))
    (step / "config.json").write_text(json.dumps({"vocab_size": 32, "n_layers": 1, "max_seq_len": 16}))
    (tmp_path / "run" / "checkpoints" / "latest").symlink_to("step_00000002")
    return tmp_path / "run"


def test_card_writes_readme_into_the_latest_checkpoint(run, capsys):
    assert heron(["card", str(run), "--license", "mit"]) == 0
    readme = run / "checkpoints" / "step_00000002" / "README.md"
    assert capsys.readouterr().out.strip() == f"wrote {readme}"
    assert "license: mit" in readme.read_text()


def test_card_annex_iv_with_eval_and_audit_log(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    AuditLog.open("audit.db").close()
    results = tmp_path / "eval.json"
    results.write_text(json.dumps([{"task": "text-generation", "dataset": "holdout", "metrics": {"perplexity": 9.0}}]))
    out = tmp_path / "docs" / "annex.md"
    assert heron(["card", str(run), "--annex-iv", "--eval", str(results), "--audit-log", "audit.db",
                  "--out", str(out)]) == 0
    text = out.read_text()
    assert "holdout" in text and "`audit.db`" in text and text.count("\n## ") == 9


def test_card_annex_iv_names_the_audit_log_that_work_records_to(run, tmp_path, monkeypatch):
    log = tmp_path / "audit.db"
    monkeypatch.setenv("HERON_AUDIT_LOG", str(log))
    assert heron(["card", str(run), "--annex-iv", "--out", str(tmp_path / "a.md")]) == 0
    assert "Where the event logs are kept: [to be completed by the provider]" in (tmp_path / "a.md").read_text()
    assert log.exists()  # the first document's write was recorded, which made the log
    assert heron(["card", str(run), "--annex-iv", "--out", str(tmp_path / "b.md")]) == 0
    assert f"Audit log of events: `{log}`" in (tmp_path / "b.md").read_text()


def test_card_user_errors(run, tmp_path):
    with pytest.raises(ValueError, match="--audit-log: goes into the Annex IV document"):
        heron(["card", str(run), "--audit-log", "audit.db"])
    with pytest.raises(ValueError, match="--license: goes into the model card"):
        heron(["card", str(run), "--annex-iv", "--license", "mit"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: not a Heron checkpoint: it has no lineage.json"):
        heron(["card", str(tmp_path / "empty")])


@pytest.mark.parametrize("log, complaint", [
    ("missing.db", "--audit-log: no audit log at missing.db"),
    ("notes.db", "--audit-log: cannot open audit log .*: file is not a database"),
    ("other.db", "--audit-log: .*other.db: holds no audit log"),
])
def test_an_audit_log_that_is_not_one_is_refused_before_the_document_cites_it(run, tmp_path, monkeypatch, log,
                                                                               complaint):
    monkeypatch.chdir(tmp_path)
    Path("notes.db").write_text("hi\n")
    sqlite3.connect("other.db").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises((FileNotFoundError, ValueError), match=f"^{complaint}"):
        heron(["card", str(run), "--annex-iv", "--audit-log", log, "--out", "annex.md"])
    assert not Path("annex.md").exists()


@pytest.mark.parametrize("db", [":memory:", "sqlite://", "sqlite:///"])
def test_an_in_memory_audit_log_is_refused_as_heron_audit_refuses_it(run, db, capsys):
    complaints = []
    for argv, flag in ((["card", str(run), "--annex-iv", "--audit-log", db], "--audit-log"),
                       (["audit", "verify", "--log", db], "--log")):
        with pytest.raises(SystemExit):
            main(argv)
        last = capsys.readouterr().err.splitlines()[-1]
        complaints.append(last.split(f"error: argument {flag}: ", 1)[1])
    expected = f"{db!r} is an in-memory database: nothing would be kept; give a file or a server's URL"
    assert complaints == [expected, expected]
    assert not (run / "checkpoints" / "step_00000002" / "ANNEX_IV.md").exists()
