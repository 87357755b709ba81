"""The human-feedback store: prompts, responses, pairwise choices and ratings.

    store = FeedbackStore.open("runs/feedback.db")          # or "sqlite:///...", "postgresql://..."
    prompt = store.add_prompt("Name a prime.", source="ui")
    a = store.add_response(prompt.id, "7", model="tiny@3f2a")
    b = store.add_response(prompt.id, "8", model="tiny@3f2a")
    store.add_comparison(a.id, b.id, annotator="alice")
    store.export_pairs("runs/pairs.jsonl")                   # prompt/chosen/rejected rows for DPO and RM

Every comparison and rating names its annotator and carries a UTC time, so
each exported pair traces to who chose it and when. A prompt is stored once
per text and a response once per (prompt, text, model): adding one again
returns the stored record, which is how two annotators' files that judge the
same pair meet on the same ids (and agreement can be measured).

Ties are refused, not flagged: the prompt/chosen/rejected convention has no
tie, and a pairwise loss (Bradley-Terry, DPO) gets no signal from one. Two
responses judged equally good are better recorded as two ratings.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

from heron.store.database import EngineStore
from heron.store.jsonl import read_feedback_jsonl, write_jsonl_atomic
from heron.store.records import (
    DEFAULT_SCALE, Comparison, Content, ImportCounts, PairInput, PreferencePair, Prompt, Rating, RatingInput,
    Response, check_content, check_name, check_note, check_score, check_time, content_digest, decode_content,
    encode_content, reply_text, utc_now,
)
from heron.store.schema import comparisons, metadata, prompts, ratings, responses
from heron.store.stats import AnnotatorCounts, FeedbackStats, ModelRating, Verdict, pairwise_agreement


class FeedbackStore(EngineStore):
    """Human feedback in one database; every write is one transaction."""

    what = "feedback store"
    schema = metadata

    # ----- writing ------------------------------------------------------------------------------

    def add_prompt(self, text: Content, *, source: str = "api") -> Prompt:
        """The prompt with this text, added if new (an existing one keeps its first source)."""
        text, source = check_content(text, "text"), check_name(source, "source")
        with self.write_transaction() as conn:
            return _prompt(conn, _prompt_id(conn, text, source))

    def add_response(self, prompt_id: int, text: Content, *, model: str) -> Response:
        """The response with this text by this model to the prompt, added if new."""
        text, model = check_content(text, "text"), check_name(model, "model")
        with self.write_transaction() as conn:
            _require(conn, prompts, prompt_id, "prompt_id")
            return _response(conn, _response_id(conn, prompt_id, text, model))

    def add_comparison(
        self, chosen_response_id: int, rejected_response_id: int, *, annotator: str,
        note: str | None = None, created_at: datetime | None = None,
    ) -> Comparison:
        """Record that `annotator` preferred one response to another answer to the same prompt."""
        annotator, note = check_name(annotator, "annotator"), check_note(note)
        when = utc_now() if created_at is None else check_time(created_at, "created_at")
        if chosen_response_id == rejected_response_id:
            raise ValueError(f"chosen and rejected are the same response ({chosen_response_id}); "
                             f"ties are not recorded")
        with self.write_transaction() as conn:
            chosen = _require(conn, responses, chosen_response_id, "chosen_response_id")
            rejected = _require(conn, responses, rejected_response_id, "rejected_response_id")
            if chosen.prompt_id != rejected.prompt_id:
                raise ValueError(f"responses {chosen.id} and {rejected.id} answer different prompts "
                                 f"({chosen.prompt_id} and {rejected.prompt_id})")
            if reply_text(decode_content(chosen.text)) == reply_text(decode_content(rejected.text)):
                raise ValueError(f"responses {chosen.id} and {rejected.id} are the same text (from models "
                                 f"{chosen.model!r} and {rejected.model!r}); ties are not recorded")
            return _comparison(conn, _insert(conn, comparisons, prompt_id=chosen.prompt_id, note=note,
                                             chosen_response_id=chosen.id, rejected_response_id=rejected.id,
                                             annotator=annotator, created_at=when))

    def add_rating(
        self, response_id: int, score: float, *, annotator: str, scale: str = DEFAULT_SCALE,
        created_at: datetime | None = None,
    ) -> Rating:
        """Record `annotator`'s score for a response on a named scale or rubric."""
        score, scale = check_score(score, "score"), check_name(scale, "scale")
        annotator = check_name(annotator, "annotator")
        when = utc_now() if created_at is None else check_time(created_at, "created_at")
        with self.write_transaction() as conn:
            _require(conn, responses, response_id, "response_id")
            return _rating(conn, _insert(conn, ratings, response_id=response_id, score=score, scale=scale,
                                         annotator=annotator, created_at=when))

    def import_rows(self, rows: Iterable[PairInput | RatingInput], *, source: str) -> ImportCounts:
        """Add comparisons and ratings given by their texts, all or none (one transaction).

        A row that repeats a stored judgement exactly (the same annotator, at
        the same time, choosing between or scoring the same texts) is skipped,
        so importing a file again, or an export back into its own store,
        changes nothing. A line without its own created_at is stamped with
        the time of import, so only timestamped lines are recognised again.
        """
        source = check_name(source, "source")
        counts = {PairInput: 0, RatingInput: 0, None: 0}
        with self.write_transaction() as conn:
            for row in rows:
                counts[type(row) if _add_row(conn, row, source) else None] += 1
        return ImportCounts(comparisons=counts[PairInput], ratings=counts[RatingInput], already_stored=counts[None])

    def import_jsonl(
        self, path: str | os.PathLike[str], *, annotator: str | None = None, source: str | None = None,
    ) -> ImportCounts:
        """Add every line of a JSONL file (see `heron.store.jsonl`), or none if any line is bad.

        `annotator` fills lines that name none; `source` (default: the file's
        name) is recorded on the prompts the file adds.
        """
        rows = read_feedback_jsonl(path, annotator=annotator, now=utc_now())
        return self.import_rows(rows, source=source or Path(path).name)

    # ----- reading ------------------------------------------------------------------------------

    def pairs(self, *, annotator: str | None = None) -> list[PreferencePair]:
        """Every comparison with its texts, in the order recorded."""
        with self.engine.connect() as conn:
            return list(_pairs(conn, annotator))

    def ratings(self, response_id: int | None = None) -> list[Rating]:
        """The ratings of one response, or all of them, in the order recorded."""
        query = sa.select(ratings).order_by(ratings.c.id)
        if response_id is not None:
            query = query.where(ratings.c.response_id == response_id)
        with self.engine.connect() as conn:
            return [Rating(**row._mapping) for row in conn.execute(query)]

    def export_pairs(self, path: str | os.PathLike[str],
                     keep: Callable[[PreferencePair], bool] | None = None) -> int:
        """Write every comparison (that `keep` keeps) as a prompt/chosen/rejected JSONL row
        (atomically); returns the count written."""
        with self.engine.connect() as conn:
            pairs = _pairs(conn, None)
            return write_jsonl_atomic(path, (p.to_json() for p in pairs if keep is None or keep(p)))

    def stats(self) -> FeedbackStats:
        with self.engine.connect() as conn:
            count = {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                     for t in (prompts, responses, comparisons, ratings)}
            verdicts = conn.execute(sa.select(comparisons.c.annotator, comparisons.c.chosen_response_id,
                                              comparisons.c.rejected_response_id)
                                    .order_by(comparisons.c.created_at, comparisons.c.id))
            agreement = pairwise_agreement(Verdict(*row) for row in verdicts)
            return FeedbackStats(**count, annotators=_annotator_counts(conn), agreement=agreement,
                                 model_ratings=_model_ratings(conn))


# ----- helpers, each inside the caller's transaction ------------------------------------------------

def _insert(conn: sa.Connection, table: sa.Table, **values: object) -> int:
    return conn.execute(sa.insert(table).values(**values)).inserted_primary_key[0]


def _require(conn: sa.Connection, table: sa.Table, id_: int, field: str) -> sa.Row:
    row = conn.execute(sa.select(table).where(table.c.id == id_)).first()
    if row is None:
        raise ValueError(f"{field} {id_!r} does not exist")
    return row


def _prompt_id(conn: sa.Connection, text: Content, source: str) -> int:
    stored = encode_content(text)
    digest = content_digest(stored)
    found = conn.execute(sa.select(prompts.c.id).where(prompts.c.text_sha256 == digest)).scalar()
    if found is not None:
        return found
    return _insert(conn, prompts, text=stored, text_sha256=digest, source=source, created_at=utc_now())


def _response_id(conn: sa.Connection, prompt_id: int, text: Content, model: str) -> int:
    stored = encode_content(text)
    digest = content_digest(stored)
    found = conn.execute(sa.select(responses.c.id).where(
        responses.c.prompt_id == prompt_id, responses.c.text_sha256 == digest, responses.c.model == model,
    )).scalar()
    if found is not None:
        return found
    return _insert(conn, responses, prompt_id=prompt_id, text=stored, text_sha256=digest, model=model,
                   created_at=utc_now())


def _add_row(conn: sa.Connection, row: PairInput | RatingInput, source: str) -> bool:
    """Add one imported judgement; False if the store already holds exactly it."""
    prompt_id = _prompt_id(conn, row.prompt, source)
    if isinstance(row, PairInput):
        table, values = comparisons, dict(
            prompt_id=prompt_id, chosen_response_id=_response_id(conn, prompt_id, row.chosen, row.chosen_model),
            rejected_response_id=_response_id(conn, prompt_id, row.rejected, row.rejected_model),
            annotator=row.annotator, created_at=row.created_at, note=row.note)
    else:
        table, values = ratings, dict(
            response_id=_response_id(conn, prompt_id, row.response, row.model), score=row.rating,
            scale=row.scale, annotator=row.annotator, created_at=row.created_at)
    same = sa.and_(*(table.c[name].is_(None) if value is None else table.c[name] == value
                     for name, value in values.items()))
    if conn.execute(sa.select(table.c.id).where(same).limit(1)).first() is not None:
        return False
    _insert(conn, table, **values)
    return True


def _prompt(conn: sa.Connection, id_: int) -> Prompt:
    row = conn.execute(sa.select(prompts).where(prompts.c.id == id_)).one()
    return Prompt(id=row.id, text=decode_content(row.text), source=row.source, created_at=row.created_at)


def _response(conn: sa.Connection, id_: int) -> Response:
    row = conn.execute(sa.select(responses).where(responses.c.id == id_)).one()
    return Response(id=row.id, prompt_id=row.prompt_id, text=decode_content(row.text), model=row.model,
                    created_at=row.created_at)


def _comparison(conn: sa.Connection, id_: int) -> Comparison:
    return Comparison(**conn.execute(sa.select(comparisons).where(comparisons.c.id == id_)).one()._mapping)


def _rating(conn: sa.Connection, id_: int) -> Rating:
    return Rating(**conn.execute(sa.select(ratings).where(ratings.c.id == id_)).one()._mapping)


def _pairs(conn: sa.Connection, annotator: str | None) -> Iterator[PreferencePair]:
    chosen, rejected = responses.alias("chosen"), responses.alias("rejected")
    query = (
        sa.select(comparisons.c.id, prompts.c.text, chosen.c.text, rejected.c.text, chosen.c.model,
                  rejected.c.model, comparisons.c.annotator, comparisons.c.created_at, comparisons.c.note)
        .join_from(comparisons, prompts, comparisons.c.prompt_id == prompts.c.id)
        .join(chosen, comparisons.c.chosen_response_id == chosen.c.id)
        .join(rejected, comparisons.c.rejected_response_id == rejected.c.id)
        .order_by(comparisons.c.id)
    )
    if annotator is not None:
        query = query.where(comparisons.c.annotator == annotator)
    for id_, prompt, chosen_text, rejected_text, chosen_model, rejected_model, who, when, note in conn.execute(query):
        yield PreferencePair(comparison_id=id_, prompt=decode_content(prompt), chosen=decode_content(chosen_text),
                             rejected=decode_content(rejected_text), chosen_model=chosen_model,
                             rejected_model=rejected_model, annotator=who, created_at=when, note=note)


def _annotator_counts(conn: sa.Connection) -> tuple[AnnotatorCounts, ...]:
    counts: dict[str, list[int]] = {}
    for column, table in enumerate((comparisons, ratings)):
        query = sa.select(table.c.annotator, sa.func.count()).group_by(table.c.annotator)
        for annotator, n in conn.execute(query):
            counts.setdefault(annotator, [0, 0])[column] = n
    return tuple(AnnotatorCounts(name, *counts[name]) for name in sorted(counts))


def _model_ratings(conn: sa.Connection) -> tuple[ModelRating, ...]:
    query = (
        sa.select(responses.c.model, ratings.c.scale, sa.func.count(), sa.func.avg(ratings.c.score))
        .join_from(ratings, responses, ratings.c.response_id == responses.c.id)
        .group_by(responses.c.model, ratings.c.scale)
        .order_by(responses.c.model, ratings.c.scale)
    )
    return tuple(ModelRating(model, scale, n, float(mean)) for model, scale, n, mean in conn.execute(query))
