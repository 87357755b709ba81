"""The feedback store against known answers: generated pairs and ratings go in,
the same pairs come out, every one naming its annotator and time; bad input
names its line and field and changes nothing; the database itself refuses
broken references and ties.

Runs on SQLite; set HERON_TEST_POSTGRES_URL to a PostgreSQL database that the
tests may empty (its tables are dropped) to run every test there too.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from heron.store import FeedbackStore, ImportCounts, PairInput, PreferencePair, RatingInput, format_stats
from heron.store import feedback as feedback_module
from heron.store.schema import comparisons, metadata, ratings, responses
from heron.store.stats import Verdict, pairwise_agreement

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
POSTGRES_URL = os.environ.get("HERON_TEST_POSTGRES_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if POSTGRES_URL else [])


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path: Path) -> str:
    """A database URL or path holding no feedback yet."""
    if request.param == "sqlite":
        return str(tmp_path / "feedback.db")
    engine = sa.create_engine(POSTGRES_URL)
    metadata.drop_all(engine)
    engine.dispose()
    return POSTGRES_URL


@pytest.fixture
def store(db: str):
    with FeedbackStore.open(db) as opened:
        yield opened


def generated_pairs(n: int) -> list[dict]:
    """n comparison rows: prompts alternate plain text and chat messages, three
    annotators take turns, times a minute apart in three timezones."""
    rows = []
    for i in range(n):
        prompt = f"Add {i} and {i + 1}." if i % 2 else [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": f"Add {i} and {i + 1}."}]
        when = (T0 + timedelta(minutes=i)).astimezone(timezone(timedelta(hours=i % 3 - 1)))
        rows.append({"prompt": prompt, "chosen": str(2 * i + 1), "rejected": f"{2 * i + 1} or so",
                     "annotator": ["alice", "bob", "carol"][i % 3], "created_at": when.isoformat(),
                     "chosen_model": f"tiny@{i % 2}", "rejected_model": "tiny@base"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def snapshot(store: FeedbackStore) -> tuple:
    """Everything a reader can see, to compare before and after."""
    return store.stats(), store.pairs(), store.ratings()


# ----- round trip and provenance ------------------------------------------------------------------

def test_import_then_export_gives_the_same_pairs(store: FeedbackStore, tmp_path: Path) -> None:
    rows = generated_pairs(12)
    counts = store.import_jsonl(write_jsonl(tmp_path / "in.jsonl", rows), annotator="fallback")
    assert (counts.comparisons, counts.ratings) == (12, 0)
    assert store.export_pairs(tmp_path / "out.jsonl") == 12
    out = read_jsonl(tmp_path / "out.jsonl")
    keys = ("prompt", "chosen", "rejected", "annotator", "chosen_model", "rejected_model")
    assert [{k: r[k] for k in keys} for r in out] == [{k: r[k] for k in keys} for r in rows]
    # The same instants, now written in UTC.
    assert [datetime.fromisoformat(r["created_at"]) for r in out] == \
           [datetime.fromisoformat(r["created_at"]) for r in rows]
    assert all(r["created_at"].endswith("+00:00") for r in out)
    assert [r["comparison_id"] for r in out] == list(range(1, 13))


def test_an_export_imports_back_unchanged(store: FeedbackStore, tmp_path: Path) -> None:
    store.import_jsonl(write_jsonl(tmp_path / "in.jsonl", generated_pairs(6)))
    store.export_pairs(tmp_path / "first.jsonl")
    with FeedbackStore.open(tmp_path / "second.db") as copy:
        copy.import_jsonl(tmp_path / "first.jsonl", annotator="ignored: every row names its own")
        copy.export_pairs(tmp_path / "second.jsonl")
    assert (tmp_path / "second.jsonl").read_text() == (tmp_path / "first.jsonl").read_text()


def test_importing_again_or_an_export_back_changes_nothing(store: FeedbackStore, tmp_path: Path) -> None:
    rating = {"prompt": "Add 1 and 2.", "response": "3", "model": "tiny@1", "rating": 4.5, "annotator": "dana",
              "created_at": T0.isoformat()}
    rows = generated_pairs(6) + [rating]
    file = write_jsonl(tmp_path / "in.jsonl", rows)
    first = store.import_jsonl(file)
    assert (first.comparisons, first.ratings, first.already_stored) == (6, 1, 0)
    before = snapshot(store)
    again = store.import_jsonl(file)
    assert (again.comparisons, again.ratings, again.already_stored) == (0, 0, 7)
    store.export_pairs(tmp_path / "out.jsonl")
    back = store.import_jsonl(tmp_path / "out.jsonl")
    assert (back.comparisons, back.already_stored) == (0, 6)
    assert snapshot(store) == before
    # A judgement that differs in anything, here only its time or the score, is a new one.
    later = dict(rows[0], created_at=(T0 + timedelta(days=1)).isoformat())
    rescored = dict(rating, rating=2.0)
    new = store.import_jsonl(write_jsonl(tmp_path / "later.jsonl", [later, rescored]))
    assert (new.comparisons, new.ratings, new.already_stored) == (1, 1, 0)


def test_every_exported_pair_traces_to_its_annotator_and_time(store: FeedbackStore, tmp_path: Path) -> None:
    rows = [{k: v for k, v in row.items() if k not in ("annotator", "created_at")} for row in generated_pairs(4)]
    rows[1]["annotator"] = "dana"  # a line's own annotator wins over the file's
    before = datetime.now(timezone.utc)
    store.import_jsonl(write_jsonl(tmp_path / "in.jsonl", rows), annotator="erin", source="batch-7")
    after = datetime.now(timezone.utc)
    store.export_pairs(tmp_path / "out.jsonl")
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["annotator"] for r in out] == ["erin", "dana", "erin", "erin"]
    for row in out:
        when = datetime.fromisoformat(row["created_at"])
        assert when.utcoffset() == timedelta(0) and before <= when <= after
    pair = store.pairs(annotator="dana")[0]
    assert isinstance(pair, PreferencePair) and pair.comparison_id == out[1]["comparison_id"]


def test_prompts_and_responses_are_stored_once_per_text(store: FeedbackStore) -> None:
    prompt = store.add_prompt("Name a prime.", source="ui")
    assert store.add_prompt("Name a prime.", source="elsewhere") == prompt  # the first source stays
    chat = store.add_prompt([{"role": "user", "content": "Name a prime."}])
    assert chat.id != prompt.id and chat.text == [{"role": "user", "content": "Name a prime."}]
    seven = store.add_response(prompt.id, "7", model="m1")
    assert store.add_response(prompt.id, "7", model="m1") == seven
    assert store.add_response(prompt.id, "7", model="m2").id != seven.id
    assert store.stats().responses == 2


def test_times_are_kept_as_utc_and_naive_ones_refused(store: FeedbackStore) -> None:
    prompt = store.add_prompt("p")
    a, b = store.add_response(prompt.id, "a", model="m"), store.add_response(prompt.id, "b", model="m")
    paris = datetime(2025, 6, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    comparison = store.add_comparison(a.id, b.id, annotator="alice", created_at=paris, note="closer call")
    assert comparison.created_at == paris and comparison.created_at.tzinfo == timezone.utc
    assert store.pairs()[0].created_at == datetime(2025, 6, 1, 12, 30, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="'created_at' has no timezone"):
        store.add_rating(a.id, 3, annotator="alice", created_at=datetime(2025, 6, 1, 14, 30))


# ----- bad input --------------------------------------------------------------------------------

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b", "annotator": "alice"}


@pytest.mark.parametrize(("bad_line", "message"), [
    ({"prompt": "p", "rejected": "b"}, "bad.jsonl:3: 'chosen' is missing"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "anotator": "x"}, r"bad\.jsonl:3: unknown key\(s\) \['anotator'\]"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "annotator": "  "}, "bad.jsonl:3: 'annotator' is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "bad.jsonl:3: 'chosen' and 'rejected' are the same text"),
    ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "a"}]},
     "bad.jsonl:3: 'chosen' and 'rejected' are the same text"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "created_at": "2025-03-01T12:00:00"},
     "bad.jsonl:3: 'created_at' has no timezone"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, r"bad\.jsonl:3: 'prompt'\[0\] must be an object"),
    # What training refuses is refused here too, so an export can always be trained on.
    ({"prompt": [{"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"},
     r"bad\.jsonl:3: 'prompt'\[0\]: role 'human'; expected one of system, user, assistant"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": "b"}, "bad.jsonl:3: 'chosen': a reply is text, or one assistant message; got 2 message"),
    ({"prompt": "p", "response": "a", "rating": "high"}, "bad.jsonl:3: 'rating' must be a finite number"),
    ({"prompt": "p", "response": "a"}, "bad.jsonl:3: 'rating' is missing"),
    ({"prompt": "p"}, "bad.jsonl:3: expected 'chosen' and 'rejected'"),
    ("not json", "bad.jsonl:3: invalid JSON"),
])
def test_a_bad_line_is_named_and_changes_nothing(store: FeedbackStore, tmp_path: Path, bad_line, message) -> None:
    store.import_jsonl(write_jsonl(tmp_path / "earlier.jsonl", generated_pairs(3)))
    before = snapshot(store)
    file = tmp_path / "bad.jsonl"
    line = bad_line if isinstance(bad_line, str) else json.dumps(bad_line)
    file.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD) + "\n")  # line 2 is blank
    with pytest.raises(ValueError, match=message):
        store.import_jsonl(file, annotator="bob")
    assert snapshot(store) == before


def test_a_line_without_any_annotator_is_refused(store: FeedbackStore, tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="in.jsonl:1: 'annotator' is missing"):
        store.import_jsonl(file)


def test_an_import_failing_midway_in_the_database_rolls_back(store: FeedbackStore, tmp_path: Path,
                                                              monkeypatch) -> None:
    store.import_jsonl(write_jsonl(tmp_path / "earlier.jsonl", generated_pairs(2)))
    before = snapshot(store)
    real_add_row, calls = feedback_module._add_row, []

    def add_row_then_fail(conn, row, source):  # two rows written, then the third fails
        calls.append(row)
        if len(calls) == 3:
            raise ValueError("disk full")
        return real_add_row(conn, row, source)

    monkeypatch.setattr(feedback_module, "_add_row", add_row_then_fail)
    with pytest.raises(ValueError, match="disk full"):
        store.import_jsonl(write_jsonl(tmp_path / "in.jsonl", generated_pairs(5)))
    assert snapshot(store) == before


def test_bad_calls_name_the_field(store: FeedbackStore) -> None:
    prompt = store.add_prompt("p")
    a = store.add_response(prompt.id, "a", model="m")
    with pytest.raises(ValueError, match="'annotator' is empty"):
        store.add_comparison(a.id, a.id + 1, annotator="")
    with pytest.raises(ValueError, match="ties are not recorded"):
        store.add_comparison(a.id, a.id, annotator="alice")
    # two responses (two models', or the text and its one-message form) alike to training: a tie
    # that `heron feedback export` would hand DPO, which refuses the whole file for it
    for other in (store.add_response(prompt.id, "a", model="other"),
                  store.add_response(prompt.id, [{"role": "assistant", "content": "a"}], model="m")):
        with pytest.raises(ValueError, match=rf"responses {a.id} and {other.id} are the same text .*ties are not"):
            store.add_comparison(a.id, other.id, annotator="alice")
    assert store.pairs() == []
    with pytest.raises(ValueError, match="'score' must be a finite number"):
        store.add_rating(a.id, float("nan"), annotator="alice")
    with pytest.raises(ValueError, match="'model' is empty"):
        store.add_response(prompt.id, "b", model=" ")
    with pytest.raises(ValueError, match="'text' is empty"):
        store.add_prompt("")


# ----- referential integrity --------------------------------------------------------------------

def test_references_to_missing_rows_are_refused(store: FeedbackStore) -> None:
    p, q = store.add_prompt("p"), store.add_prompt("q")
    a, b = store.add_response(p.id, "a", model="m"), store.add_response(q.id, "b", model="m")
    with pytest.raises(ValueError, match="prompt_id 99 does not exist"):
        store.add_response(99, "x", model="m")
    with pytest.raises(ValueError, match="response_id 99 does not exist"):
        store.add_rating(99, 1.0, annotator="alice")
    with pytest.raises(ValueError, match="rejected_response_id 99 does not exist"):
        store.add_comparison(a.id, 99, annotator="alice")
    with pytest.raises(ValueError, match="answer different prompts"):
        store.add_comparison(a.id, b.id, annotator="alice")


def test_the_database_itself_enforces_integrity(store: FeedbackStore) -> None:
    """Past the API's checks, straight into the tables: the schema still refuses."""
    p, q = store.add_prompt("p"), store.add_prompt("q")
    a, b = store.add_response(p.id, "a", model="m"), store.add_response(p.id, "b", model="m")
    c = store.add_response(q.id, "c", model="m")
    row = {"annotator": "alice", "created_at": T0}
    bad_inserts = [
        sa.insert(ratings).values(response_id=999, score=1.0, scale="s", **row),  # no such response
        sa.insert(responses).values(prompt_id=999, text='"x"', text_sha256="0" * 64, model="m", created_at=T0),
        sa.insert(comparisons).values(prompt_id=p.id, chosen_response_id=a.id, rejected_response_id=c.id,
                                      **row),  # c answers another prompt
        sa.insert(comparisons).values(prompt_id=p.id, chosen_response_id=a.id, rejected_response_id=a.id,
                                      **row),  # a tie
        sa.insert(ratings).values(response_id=a.id, score=1.0, scale="s", annotator="", created_at=T0),
    ]
    for statement in bad_inserts:
        with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
            conn.execute(statement)
    with store.engine.begin() as conn:  # the good version of the same row goes in
        conn.execute(sa.insert(comparisons).values(prompt_id=p.id, chosen_response_id=a.id,
                                                   rejected_response_id=b.id, **row))
    assert store.stats().comparisons == 1


# ----- stats ------------------------------------------------------------------------------------

def test_stats_on_a_known_dataset(store: FeedbackStore, tmp_path: Path) -> None:
    def at(minute: int) -> str:
        return (T0 + timedelta(minutes=minute)).isoformat()

    pairs = [
        # P1, a1 vs b1: alice first prefers b1, then changes her mind (her latest counts);
        # bob agrees with alice; carol disagrees and saw the pair in the other order.
        {"prompt": "P1", "chosen": "b1", "rejected": "a1", "annotator": "alice", "created_at": at(0)},
        {"prompt": "P1", "chosen": "a1", "rejected": "b1", "annotator": "alice", "created_at": at(5)},
        {"prompt": "P1", "chosen": "a1", "rejected": "b1", "annotator": "bob", "created_at": at(1)},
        {"prompt": "P1", "chosen": "b1", "rejected": "a1", "annotator": "carol", "created_at": at(2)},
        # P2: alice and bob agree.
        {"prompt": "P2", "chosen": "c2", "rejected": "d2", "annotator": "alice", "created_at": at(3)},
        {"prompt": "P2", "chosen": "c2", "rejected": "d2", "annotator": "bob", "created_at": at(4)},
        # P3: only alice; no agreement to measure.
        {"prompt": "P3", "chosen": "e3", "rejected": "f3", "annotator": "alice", "created_at": at(6)},
    ]
    scores = [("a1", "m1", 4, "1-5"), ("b1", "m1", 2, "1-5"), ("c2", "m2", 5, "1-5"), ("c2", "m2", 0.5, "helpful")]
    ratings_rows = [{"prompt": "P1" if text.endswith("1") else "P2", "response": text, "model": model,
                     "rating": score, "scale": scale, "annotator": "dana"} for text, model, score, scale in scores]
    store.import_jsonl(write_jsonl(tmp_path / "in.jsonl", pairs + ratings_rows))
    stats = store.stats()
    # Responses: a1, b1, c2, d2, e3, f3 by the unknown model, then a1, b1 (m1) and c2 (m2) rated.
    assert (stats.prompts, stats.responses, stats.comparisons, stats.ratings) == (3, 9, 7, 4)
    assert [(a.annotator, a.comparisons, a.ratings) for a in stats.annotators] == \
           [("alice", 4, 0), ("bob", 2, 0), ("carol", 1, 0), ("dana", 0, 4)]
    # By hand: P1 has winners a1 (alice), a1 (bob), b1 (carol): 1 of 3 annotator pairs agree;
    # P2: 1 of 1. Mean over the two pairs: (1/3 + 1) / 2 = 2/3.
    assert stats.agreement.items == 2
    assert stats.agreement.rate == pytest.approx(2 / 3)
    assert [(m.model, m.scale, m.ratings, m.mean) for m in stats.model_ratings] == \
           [("m1", "1-5", 2, 3.0), ("m2", "1-5", 1, 5.0), ("m2", "helpful", 1, 0.5)]
    table = format_stats(stats)
    assert "0.667 over 2 response pair(s)" in table and "dana" in table


def test_agreement_ignores_the_order_a_pair_was_shown_in() -> None:
    verdicts = [Verdict("x", 1, 2), Verdict("y", 1, 2), Verdict("z", 1, 2), Verdict("x", 3, 4), Verdict("y", 4, 3)]
    agreement = pairwise_agreement(verdicts)
    assert agreement.items == 2 and agreement.rate == pytest.approx((1 + 0) / 2)
    assert pairwise_agreement([Verdict("x", 1, 2)]).rate is None


# ----- files and reopening ----------------------------------------------------------------------

def test_a_reopened_store_keeps_everything(db: str, tmp_path: Path) -> None:
    with FeedbackStore.open(db) as store:
        store.import_jsonl(write_jsonl(tmp_path / "in.jsonl", generated_pairs(7)))
        prompt = store.add_prompt([{"role": "user", "content": "Rate this."}], source="ui")
        response = store.add_response(prompt.id, "Fine.", model="tiny@9")
        store.add_rating(response.id, 4.5, annotator="erin", scale="1-5", created_at=T0)
        before = snapshot(store)
    with FeedbackStore.open(db, create=False) as store:
        assert snapshot(store) == before
        assert store.ratings(response.id)[0].created_at == T0


def test_opening_needs_a_usable_database(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no feedback store"):
        FeedbackStore.open(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(ValueError, match="cannot open"):
        FeedbackStore.open("nosuchdialect://host/db")
    (tmp_path / "text.db").write_text("not a database, but long enough to have a header of sorts " * 4)
    with pytest.raises(ValueError, match="cannot open feedback store"):
        FeedbackStore.open(tmp_path / "text.db")
    with FeedbackStore.open(f"sqlite:///{tmp_path}/deeper/folder/f.db") as store:
        assert store.stats().prompts == 0


@pytest.mark.parametrize("kind", ["empty file", "other store"])
def test_reading_refuses_a_database_without_the_stores_tables_and_writes_nothing(tmp_path: Path, kind) -> None:
    """Only `open(create=True)` (an import) may make tables: `stats` or `export` on an empty
    file or on a consent registry must not turn it into a feedback store."""
    from heron.govern.consent import ConsentRegistry

    db = tmp_path / "x.db"
    if kind == "empty file":
        db.write_bytes(b"")
    else:
        ConsentRegistry.open(db).close()
    before = db.read_bytes()
    with pytest.raises(ValueError, match=r"x.db: holds no feedback store \(missing its tables prompts, responses, "
                                         r"comparisons, ratings\)"):
        FeedbackStore.open(db, create=False)
    assert db.read_bytes() == before


def one_prompt_pairs(n: int) -> list[PairInput]:
    return [PairInput(prompt="Say stone.", chosen=f"stone {i}", rejected=f"rock {i}", annotator="alice",
                      created_at=T0 + timedelta(seconds=i)) for i in range(n)]


def test_an_import_looks_a_row_up_at_the_same_cost_however_many_its_prompt_has(tmp_path: Path,
                                                                                sqlite_steps) -> None:
    """Each imported row is looked up among the stored comparisons first (a repeat is skipped). That
    scanned every comparison of the prompt; ix_comparisons_verdict makes it one seek. Counted in
    SQLite instructions: a new row and a repeat cost the same at 8 comparisons as at 128."""
    store = FeedbackStore.open(tmp_path / "f.db")
    rows, work = one_prompt_pairs(129), {}
    for size in (8, 128):
        store.import_rows(rows[:size], source="test")
        repeat = sqlite_steps(store.engine, lambda: store.import_rows([rows[size - 1]], source="test"))
        new = sqlite_steps(store.engine, lambda: store.import_rows([rows[size]], source="test"))
        work[size] = repeat, new
    assert all(large - small < 128 - 8 for small, large in zip(work[8], work[128])), work
    assert store.stats().comparisons == 129
    store.close()


def test_a_store_made_before_an_index_gains_it_when_opened_to_write(db: str) -> None:
    """`create_all` passes over tables that exist, so a database made before ix_comparisons_verdict
    would go on scanning: opening it to write adds the index; opening it to read writes nothing."""
    index = next(ix for ix in comparisons.indexes if ix.name == "ix_comparisons_verdict")

    def indexes() -> set[str]:
        with FeedbackStore.open(db, create=False) as store:
            return {found["name"] for found in sa.inspect(store.engine).get_indexes("comparisons")}

    with FeedbackStore.open(db) as store:
        store.import_rows(one_prompt_pairs(3), source="test")
        with store.engine.begin() as conn:
            index.drop(conn)  # as an older Heron made it
    assert "ix_comparisons_verdict" not in indexes()
    with FeedbackStore.open(db) as store:
        assert store.import_rows(one_prompt_pairs(4), source="test") == ImportCounts(1, 0, 3)
    assert "ix_comparisons_verdict" in indexes()


def test_a_read_only_store_without_the_index_still_opens(tmp_path: Path, caplog) -> None:
    """The index only speeds lookups up: a database that cannot take it (opened read-only through
    an SQLite URI) opens with a warning, as it did before the index existed."""
    with FeedbackStore.open(tmp_path / "f.db") as store:
        store.import_rows(one_prompt_pairs(3), source="test")
        with store.engine.begin() as conn:
            next(ix for ix in comparisons.indexes if ix.name == "ix_comparisons_verdict").drop(conn)
    read_only = f"sqlite:///file:{tmp_path / 'f.db'}?mode=ro&uri=true"
    for create in (True, False):
        with FeedbackStore.open(read_only, create=create) as store:
            assert store.stats().comparisons == 3
    assert "index ix_comparisons_verdict not made (attempt to write a readonly database)" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"no feedback store at .*missing\.db$"):
        FeedbackStore.open(f"sqlite:///file:{tmp_path / 'missing.db'}?mode=ro&uri=true", create=False)


def test_an_export_replaces_the_file_whole_or_not_at_all(store: FeedbackStore, tmp_path: Path,
                                                         monkeypatch) -> None:
    store.import_jsonl(write_jsonl(tmp_path / "in.jsonl", generated_pairs(3)))
    out = tmp_path / "pairs.jsonl"
    out.write_text("the previous export\n")
    real_to_json = PreferencePair.to_json

    def fail_on_the_third(pair: PreferencePair) -> dict:
        if pair.comparison_id == 3:
            raise OSError("disk full")
        return real_to_json(pair)

    monkeypatch.setattr(PreferencePair, "to_json", fail_on_the_third)
    with pytest.raises(OSError, match="disk full"):
        store.export_pairs(out)
    assert out.read_text() == "the previous export\n"
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_rows_built_in_python_are_checked_and_imported_together(store: FeedbackStore) -> None:
    rows = [PairInput(prompt="p", chosen="a", rejected="b", annotator=" alice ", created_at="2025-03-01T13:00+01:00"),
            RatingInput(prompt="p", response="a", rating=4, annotator="bob", created_at=T0, model="m")]
    assert rows[0].annotator == "alice" and rows[0].created_at == T0
    counts = store.import_rows(rows, source="python")
    assert (counts.comparisons, counts.ratings) == (1, 1)
    assert store.ratings()[0].score == 4.0
    with pytest.raises(ValueError, match="ties are not recorded"):
        PairInput(prompt="p", chosen="a", rejected="a", annotator="alice", created_at=T0)
