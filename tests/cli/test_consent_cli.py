"""`heron consent` through its argparse verbs: grant, check (exit 0 or 1), withdraw, history as JSON."""
import argparse
import json

import pytest

from heron.cli import consent
from heron.store import FeedbackStore
from heron.govern.consent import events_from_export


def heron(argv: list[str]) -> int:
    """What `heron ...` does once cli/main.py registers the verb."""
    parser = argparse.ArgumentParser(prog="heron")
    consent.register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_grant_check_withdraw_history(tmp_path, capsys):
    db = str(tmp_path / "consent.db")
    assert heron(["consent", "grant", "alice", "training", "--db", db, "--source", "web-form", "--notice", "v3",
                  "--at", "2025-03-01T12:00:00+00:00", "--pii-category", "chats"]) == 0
    assert capsys.readouterr().out.startswith("granted: alice / training at 2025-03-01T12:00:00+00:00")
    assert heron(["consent", "check", "alice", "training", "--db", db]) == 0
    assert capsys.readouterr().out.startswith("yes: alice / training: given at 2025-03-01T12:00:00+00:00 via "
                                              "'web-form', notice 'v3'")
    assert heron(["consent", "check", "alice", "analytics", "--db", db]) == 1
    assert capsys.readouterr().out.startswith("no: alice / analytics: never given")
    assert heron(["consent", "withdraw", "alice", "training", "--db", db]) == 0
    assert heron(["consent", "check", "alice", "training", "--db", db]) == 1
    assert heron(["consent", "check", "alice", "training", "--db", db, "--at", "2025-03-02T00:00:00Z"]) == 0
    capsys.readouterr()
    assert heron(["consent", "history", "alice", "--db", db]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert [e.event for e in events_from_export(exported)] == ["given", "withdrawn"]
    out = tmp_path / "alice.json"
    assert heron(["consent", "history", "alice", "training", "--db", db, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["records"][0]["status"] == "withdrawn"


def test_user_errors(tmp_path):
    db = str(tmp_path / "consent.db")
    with pytest.raises(FileNotFoundError, match="no consent registry at"):
        heron(["consent", "check", "alice", "training", "--db", db])
    with pytest.raises(ValueError, match="'purpose' 'Training': use lower-case"):
        heron(["consent", "grant", "alice", "Training", "--db", db])
    with pytest.raises(ValueError, match="to withdraw: never given"):
        heron(["consent", "withdraw", "alice", "training", "--db", db])
    with pytest.raises(FileExistsError, match="is the consent registry being read"):
        heron(["consent", "history", "alice", "--db", db, "--out", db])
    FeedbackStore.open(tmp_path / "other.db").close()
    with pytest.raises(ValueError, match="holds no consent registry"):  # another store's database
        heron(["consent", "check", "alice", "training", "--db", str(tmp_path / "other.db")])


@pytest.mark.parametrize("db", [":memory:", "sqlite://", "sqlite:///"])
def test_an_in_memory_database_is_refused(db, capsys):
    with pytest.raises(SystemExit):
        heron(["consent", "grant", "alice", "training", "--db", db])
    assert "is an in-memory database: nothing would be kept" in capsys.readouterr().err
