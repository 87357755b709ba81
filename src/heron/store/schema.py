"""The feedback tables, in SQLAlchemy Core so one definition serves SQLite and PostgreSQL.

Integrity lives in the schema, not only in the code that writes:
- a comparison's two responses must answer the comparison's own prompt
  (composite foreign keys onto responses (id, prompt_id));
- a comparison of a response with itself is refused (`ck_comparisons_no_tie`);
- annotators, models and scales are never empty.
Texts are stored once: a prompt is unique by its text, a response by (prompt,
text, model), both looked up by the sha256 of the stored JSON.
"""
from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa

# Named constraints, so errors and migrations read the same on every backend.
NAMING = {
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
}
metadata = sa.MetaData(naming_convention=NAMING)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC time on every backend: SQLite keeps no offset, so
    times go in converted to UTC and come back marked as UTC."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}: the store keeps timezone-aware times")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _not_empty(column: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(f"{column} <> ''", name=f"{column}_not_empty")


prompts = sa.Table(
    "prompts", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("text", sa.Text, nullable=False),  # JSON: a string or a list of chat messages
    sa.Column("text_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

responses = sa.Table(
    "responses", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("prompt_id", sa.Integer, sa.ForeignKey("prompts.id"), nullable=False, index=True),
    sa.Column("text", sa.Text, nullable=False),  # JSON, as prompts.text
    sa.Column("text_sha256", sa.String(64), nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("prompt_id", "text_sha256", "model"),
    sa.UniqueConstraint("id", "prompt_id"),  # the target of the comparisons' composite keys
    _not_empty("model"),
)

comparisons = sa.Table(
    "comparisons", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("prompt_id", sa.Integer, sa.ForeignKey("prompts.id"), nullable=False),  # ix_comparisons_verdict indexes it
    sa.Column("chosen_response_id", sa.Integer, nullable=False),
    sa.Column("rejected_response_id", sa.Integer, nullable=False),
    sa.Column("annotator", sa.Text, nullable=False, index=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("note", sa.Text, nullable=True),
    sa.ForeignKeyConstraint(["chosen_response_id", "prompt_id"], ["responses.id", "responses.prompt_id"]),
    sa.ForeignKeyConstraint(["rejected_response_id", "prompt_id"], ["responses.id", "responses.prompt_id"]),
    sa.CheckConstraint("chosen_response_id <> rejected_response_id", name="no_tie"),
    _not_empty("annotator"),
    # An import looks each row up by these before adding it (feedback._add_row): one seek, not a
    # scan of every comparison of the prompt. Named, as the convention's name passes PostgreSQL's 63.
    sa.Index("ix_comparisons_verdict", "prompt_id", "chosen_response_id", "rejected_response_id", "annotator"),
)

ratings = sa.Table(
    "ratings", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("response_id", sa.Integer, sa.ForeignKey("responses.id"), nullable=False, index=True),
    sa.Column("score", sa.Double, nullable=False),
    sa.Column("scale", sa.Text, nullable=False),
    sa.Column("annotator", sa.Text, nullable=False, index=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    _not_empty("scale"),
    _not_empty("annotator"),
)
