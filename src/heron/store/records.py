"""What goes into and comes out of the feedback store.

Out: frozen records of stored rows (`Prompt`, `Response`, `Comparison`,
`Rating`) and of a comparison with its texts (`PreferencePair`, one row of the
prompt/chosen/rejected export). In: `PairInput` and `RatingInput`, one line
of an import each, checked when built. Every write, whether an `add_*` call or an
imported line, passes through the same `check_*` functions, whose errors name
the field at fault (`'annotator' is empty`).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone

Message = dict[str, str]
Content = str | list[Message]  # plain text, or chat messages [{"role": ..., "content": ...}, ...]

CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")  # the chat template's (tokenizer/bpe.py)
UNKNOWN_MODEL = "unknown"  # the model of an imported response whose row names none
DEFAULT_SCALE = "rating"  # the scale of a rating whose row names none


# ----- stored rows ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prompt:
    id: int
    text: Content
    source: str  # where it came from: an imported file's name, "api", ...
    created_at: datetime


@dataclass(frozen=True)
class Response:
    id: int
    prompt_id: int
    text: Content
    model: str  # the model id or hash that produced it
    created_at: datetime


@dataclass(frozen=True)
class Comparison:
    """One human choice: `chosen` was preferred to `rejected`, both answers to one prompt."""

    id: int
    prompt_id: int
    chosen_response_id: int
    rejected_response_id: int
    annotator: str
    created_at: datetime  # timezone-aware, UTC
    note: str | None


@dataclass(frozen=True)
class Rating:
    id: int
    response_id: int
    score: float
    scale: str  # the scale or rubric the score is on ("1-5", "helpfulness", ...)
    annotator: str
    created_at: datetime  # timezone-aware, UTC


@dataclass(frozen=True)
class PreferencePair:
    """A comparison with its texts: one row of the prompt/chosen/rejected export."""

    comparison_id: int
    prompt: Content
    chosen: Content
    rejected: Content
    chosen_model: str
    rejected_model: str
    annotator: str
    created_at: datetime
    note: str | None

    def to_json(self) -> dict[str, object]:
        """The JSONL row: TRL's prompt/chosen/rejected keys first, then provenance."""
        return {
            "prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
            "annotator": self.annotator, "comparison_id": self.comparison_id,
            "created_at": self.created_at.isoformat(),
            "chosen_model": self.chosen_model, "rejected_model": self.rejected_model, "note": self.note,
        }


# ----- import lines -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PairInput:
    """A comparison given by its texts, as on a prompt/chosen/rejected line;
    checked when built. The prompt and responses are found or added."""

    prompt: Content
    chosen: Content
    rejected: Content
    annotator: str
    created_at: datetime  # or ISO 8601 text with an offset; kept in UTC
    chosen_model: str = UNKNOWN_MODEL
    rejected_model: str = UNKNOWN_MODEL
    note: str | None = None

    def __post_init__(self) -> None:
        for field in ("prompt", "chosen", "rejected"):
            object.__setattr__(self, field, check_content(getattr(self, field), field, reply=field != "prompt"))
        for field in ("annotator", "chosen_model", "rejected_model"):
            object.__setattr__(self, field, check_name(getattr(self, field), field))
        object.__setattr__(self, "created_at", check_time(self.created_at, "created_at"))
        check_note(self.note)
        if reply_text(self.chosen) == reply_text(self.rejected):  # see FeedbackStore on ties
            raise ValueError("'chosen' and 'rejected' are the same text; ties are not recorded")


@dataclass(frozen=True)
class RatingInput:
    """A rating given by its texts, as on a prompt/response/rating line;
    checked when built. The prompt and response are found or added."""

    prompt: Content
    response: Content
    rating: float  # stored as the Rating's score
    annotator: str
    created_at: datetime  # or ISO 8601 text with an offset; kept in UTC
    model: str = UNKNOWN_MODEL
    scale: str = DEFAULT_SCALE

    def __post_init__(self) -> None:
        for field in ("prompt", "response"):
            object.__setattr__(self, field, check_content(getattr(self, field), field, reply=field != "prompt"))
        for field in ("annotator", "model", "scale"):
            object.__setattr__(self, field, check_name(getattr(self, field), field))
        object.__setattr__(self, "rating", check_score(self.rating, "rating"))
        object.__setattr__(self, "created_at", check_time(self.created_at, "created_at"))


@dataclass(frozen=True)
class ImportCounts:
    comparisons: int  # added
    ratings: int  # added
    already_stored: int = 0  # lines repeating a stored judgement exactly, skipped


# ----- checks -----------------------------------------------------------------------------------

def check_name(value: object, field: str) -> str:
    """A non-empty string (annotator, model, scale, source), surrounding spaces removed."""
    if not isinstance(value, str):
        raise ValueError(f"'{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"'{field}' is empty")
    return value.strip()


def check_note(value: object, field: str = "note") -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"'{field}' must be a string or null, got {type(value).__name__}")
    return value


def check_content(value: object, field: str, *, reply: bool = False) -> Content:
    """Non-empty text, or a non-empty list of {"role", "content"} messages with string values
    and the chat template's roles (CHAT_ROLES; a system turn only first). A `reply` given as
    messages is one assistant message, as alignment reads a reply (TRL's conversational form):
    a row training would refuse is refused here, so an export can always be trained on."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"'{field}' is empty")
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{field}' must be a non-empty string or a non-empty list of chat messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f"'{field}'[{i}] must be an object with exactly 'role' and 'content'")
        if not all(isinstance(message[key], str) for key in ("role", "content")):
            raise ValueError(f"'{field}'[{i}]: 'role' and 'content' must be strings")
        if message["role"] not in CHAT_ROLES or (message["role"] == "system" and i):
            raise ValueError(f"'{field}'[{i}]: role {message['role']!r}; expected one of {', '.join(CHAT_ROLES)} "
                             "(system first only)")
    if reply and (len(value) != 1 or value[0]["role"] != "assistant"):
        raise ValueError(f"'{field}': a reply is text, or one assistant message; got {len(value)} message(s) "
                         f"from {', '.join(m['role'] for m in value)}")
    # Rebuilt in a fixed key order, so equal conversations encode to equal JSON.
    return [{"role": m["role"], "content": m["content"]} for m in value]


def reply_text(reply: Content) -> str:
    """A checked reply's text, whichever form holds it (text, or one assistant message): the
    text alignment trains on, so two replies alike here are a tie whatever their forms."""
    return reply if isinstance(reply, str) else reply[0]["content"]


def check_score(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"'{field}' must be a finite number, got {value!r}")
    return float(value)


def check_time(value: object, field: str) -> datetime:
    """A timezone-aware datetime (or ISO 8601 text with an offset), returned in UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"'{field}' is not an ISO 8601 time: {value!r}") from None
    if not isinstance(value, datetime):
        raise ValueError(f"'{field}' must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"'{field}' has no timezone ({value.isoformat()}); give one, e.g. +00:00")
    return value.astimezone(timezone.utc)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


# ----- stored form of a text --------------------------------------------------------------------

def encode_content(content: Content) -> str:
    """The stored form: JSON, so plain text and chat messages share one column."""
    return json.dumps(content, ensure_ascii=False, separators=(",", ":"))


def decode_content(stored: str) -> Content:
    return json.loads(stored)


def content_digest(encoded: str) -> str:
    """sha256 of the stored form: texts are looked up by digest, since long text
    columns cannot carry a unique index on every backend (PostgreSQL's btree limit)."""
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()
