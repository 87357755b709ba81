"""`heron feedback import|export|stats` end to end on a small generated file."""
import json
from pathlib import Path

from heron.cli.main import main

PAIRS = [
    {"prompt": f"Add {i} and {i}.", "chosen": str(2 * i), "rejected": str(2 * i + 1), "chosen_model": "tiny@1"}
    for i in range(4)
]
RATINGS = [{"prompt": "Add 0 and 0.", "response": "0", "model": "tiny@1", "rating": r, "scale": "1-5"} for r in (3, 5)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_import_export_stats(tmp_path: Path, capsys) -> None:
    db, out = tmp_path / "runs" / "feedback.db", tmp_path / "pairs.jsonl"
    source = write_jsonl(tmp_path / "in.jsonl", PAIRS + RATINGS)
    assert main(["feedback", "import", str(source), "--db", str(db), "--annotator", "alice"]) == 0
    assert "imported 4 comparisons and 2 ratings" in capsys.readouterr().out
    once = write_jsonl(tmp_path / "once.jsonl", [PAIRS[0] | {"created_at": "2026-01-01T00:00:00+00:00"}, RATINGS[0]])
    assert main(["feedback", "import", str(once), "--db", str(tmp_path / "other.db"), "--annotator", "carol"]) == 0
    assert main(["feedback", "import", str(once), "--db", str(tmp_path / "other.db"), "--annotator", "carol"]) == 0
    first, again = capsys.readouterr().out.splitlines()
    assert first.startswith("imported 1 comparison and 1 rating from")
    assert again.startswith("imported 0 comparisons and 1 rating from")  # the rating has no time: stamped anew
    assert again.endswith("; skipped 1 line repeating a stored or earlier judgement")
    assert main(["feedback", "export", str(out), "--db", str(db)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"], r["annotator"]) for r in rows] == \
           [(p["prompt"], p["chosen"], p["rejected"], "alice") for p in PAIRS]
    assert main(["feedback", "import", str(source), "--db", f"sqlite:///{db}", "--annotator", "bob"]) == 0
    capsys.readouterr()
    assert main(["feedback", "stats", "--db", str(db)]) == 0
    report = capsys.readouterr().out
    assert "comparisons         8" in report
    assert "agreement: 1.000 over 4 response pair(s)" in report
    assert any(line.split() == ["tiny@1", "1-5", "4", "4.000"] for line in report.splitlines())


def test_a_bad_line_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [PAIRS[0], {"prompt": "p", "rejected": "r"}])
    db = tmp_path / "feedback.db"
    assert main(["feedback", "import", str(source), "--db", str(db), "--annotator", "alice"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in.jsonl:2: 'chosen' is missing" in err
    assert not db.exists()  # the file is read before the store is made: a bad one leaves no empty store
    assert main(["feedback", "import", str(write_jsonl(tmp_path / "ok.jsonl", PAIRS[:1])), "--db", str(db),
                 "--annotator", "alice"]) == 0
    assert main(["feedback", "import", str(source), "--db", str(db), "--annotator", "alice"]) == 2
    capsys.readouterr()
    assert main(["feedback", "stats", "--db", str(db)]) == 0
    assert "comparisons         1" in capsys.readouterr().out  # all or nothing: the good first line did not land


def test_export_from_a_missing_database_fails_clearly(tmp_path: Path, capsys) -> None:
    assert main(["feedback", "export", str(tmp_path / "out.jsonl"), "--db", str(tmp_path / "nope.db")]) == 2
    assert "no feedback store" in capsys.readouterr().err
    assert not (tmp_path / "nope.db").exists() and not (tmp_path / "out.jsonl").exists()


def test_an_export_never_replaces_the_store_and_a_file_must_be_utf8(tmp_path: Path, capsys) -> None:
    db = tmp_path / "feedback.db"
    assert main(["feedback", "import", str(write_jsonl(tmp_path / "in.jsonl", PAIRS)), "--db", str(db),
                 "--annotator", "alice"]) == 0
    before = db.read_bytes()
    assert main(["feedback", "export", str(db), "--db", str(db)]) == 2
    assert f"{db}: is the feedback store being read; write to another file" in capsys.readouterr().err
    assert db.read_bytes() == before
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9"}\n')
    assert main(["feedback", "import", str(bad), "--db", str(db), "--annotator", "alice"]) == 2
    assert f"{bad}:2: not UTF-8 (invalid continuation byte at byte 16 of the line)" in capsys.readouterr().err
    assert main(["feedback", "stats", "--db", str(tmp_path / "in.jsonl")]) == 2  # not a database at all
    assert "cannot open feedback store" in capsys.readouterr().err


def test_annotators_importing_at_once_all_land(tmp_path: Path) -> None:
    """Three processes import into one SQLite store together: each waits for the others' write
    (BEGIN IMMEDIATE, store/database.py), none fails with "database is locked". Files of 3,000
    lines overlap their transactions here; two of three imports failed before."""
    import subprocess
    import sys

    from heron.store import FeedbackStore

    FeedbackStore.open(tmp_path / "fb.db", create=True).close()  # made before the race, as a team's store is
    procs = []
    for who in "ABC":
        rows = [{"prompt": f"q{who}{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(3000)]
        (tmp_path / f"{who}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        procs.append(subprocess.Popen([sys.executable, "-m", "heron", "feedback", "import", str(tmp_path / f"{who}.jsonl"),
                                       "--db", str(tmp_path / "fb.db"), "--annotator", who],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    with FeedbackStore.open(tmp_path / "fb.db") as store:
        assert len(store.pairs()) == 9000


def test_an_export_for_training_leaves_out_annotators_without_consent(tmp_path: Path, capsys) -> None:
    """alice consented to training, bob withdrew, carol never consented: with --consent, only
    alice's comparisons reach the file that DPO and the reward model train on."""
    db, consent, out = tmp_path / "feedback.db", tmp_path / "consent.db", tmp_path / "pairs.jsonl"
    source = write_jsonl(tmp_path / "in.jsonl", PAIRS)
    for annotator in ("alice", "bob", "carol"):
        assert main(["feedback", "import", str(source), "--db", str(db), "--annotator", annotator]) == 0
    for argv in (["grant", "alice", "training"], ["grant", "bob", "training"], ["withdraw", "bob", "training"]):
        assert main(["consent", *argv, "--db", str(consent), "--source", "web-form"]) == 0
    capsys.readouterr()
    assert main(["feedback", "export", str(out), "--db", str(db), "--consent", str(consent)]) == 0
    said = capsys.readouterr().out
    assert {json.loads(line)["annotator"] for line in out.read_text().splitlines()} == {"alice"}
    assert "wrote 4 prompt/chosen/rejected pairs" in said
    assert "left out 8 comparisons by annotators without consent for 'training' in force: bob (4), carol (4)" in said
    assert main(["feedback", "export", str(out), "--db", str(db), "--overwrite"]) == 0  # without a registry: everything
    assert len(out.read_text().splitlines()) == 12
    capsys.readouterr()
    assert main(["feedback", "export", str(out), "--db", str(db), "--overwrite", "--purpose", "research"]) == 2
    assert "--purpose: names the consent an export needs, which only --consent REGISTRY checks" in capsys.readouterr().err
    assert main(["feedback", "export", str(out), "--db", str(db), "--overwrite", "--consent", str(consent),
                 "--purpose", "research"]) == 0  # nobody consented to research
    assert out.read_text() == "" and "without consent for 'research' in force" in capsys.readouterr().out
