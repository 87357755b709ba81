"""The one place that talks to the database: SQLite by default, PostgreSQL by URL.

Holds the human-feedback store (prompts, responses, pairwise choices and
ratings, each traceable to its annotator and time). Imports nothing
model-specific, so every layer may use it.
"""

from heron.store.feedback import FeedbackStore
from heron.store.records import (
    Comparison, Content, ImportCounts, PairInput, PreferencePair, Prompt, Rating, RatingInput, Response,
)
from heron.store.stats import Agreement, AnnotatorCounts, FeedbackStats, ModelRating, format_stats

__all__ = [
    "Agreement",
    "AnnotatorCounts",
    "Comparison",
    "Content",
    "FeedbackStats",
    "FeedbackStore",
    "ImportCounts",
    "ModelRating",
    "PairInput",
    "PreferencePair",
    "Prompt",
    "Rating",
    "RatingInput",
    "Response",
    "format_stats",
]
