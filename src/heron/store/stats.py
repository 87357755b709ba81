"""What a feedback store holds, in numbers: counts, who gave what, how often
annotators agree, and the mean rating of each model."""
from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """One annotator's choice between two responses."""

    annotator: str
    chosen: int  # response ids
    rejected: int


@dataclass(frozen=True)
class Agreement:
    items: int  # response pairs judged by two or more annotators
    rate: float | None  # None when no pair was judged twice


@dataclass(frozen=True)
class AnnotatorCounts:
    annotator: str
    comparisons: int
    ratings: int


@dataclass(frozen=True)
class ModelRating:
    model: str
    scale: str
    ratings: int
    mean: float


@dataclass(frozen=True)
class FeedbackStats:
    prompts: int
    responses: int
    comparisons: int
    ratings: int
    annotators: tuple[AnnotatorCounts, ...]
    agreement: Agreement
    model_ratings: tuple[ModelRating, ...]


def pairwise_agreement(verdicts: Iterable[Verdict]) -> Agreement:
    """Observed agreement over the response pairs that two or more annotators judged.

    For each such pair, the share of annotator pairs that picked the same
    response; the rate is the mean of those shares over pairs (Fleiss 1971's
    P-bar, "Measuring nominal scale agreement among many raters", eq. 2-3,
    without the chance correction). A pair is the same whichever side was shown
    first. `verdicts` come oldest first: an annotator who judged a pair more
    than once counts with their latest choice.
    """
    latest: dict[frozenset[int], dict[str, int]] = defaultdict(dict)
    for verdict in verdicts:
        latest[frozenset((verdict.chosen, verdict.rejected))][verdict.annotator] = verdict.chosen
    shares = [_agreeing_share(list(winners.values())) for winners in latest.values() if len(winners) > 1]
    return Agreement(items=len(shares), rate=sum(shares) / len(shares) if shares else None)


def _agreeing_share(winners: list[int]) -> float:
    pairs = list(itertools.combinations(winners, 2))
    return sum(a == b for a, b in pairs) / len(pairs)


def format_stats(stats: FeedbackStats, title: str = "feedback store") -> str:
    """A plain-text report: counts, then a table per annotator and per model."""
    lines = [title]
    for name in ("prompts", "responses", "comparisons", "ratings"):
        lines.append(f"  {name:<12} {getattr(stats, name):>8,}")
    if stats.annotators:
        lines += ["", *_table(("annotator", "comparisons", "ratings"),
                              [(a.annotator, a.comparisons, a.ratings) for a in stats.annotators])]
    agreement = stats.agreement
    lines.append("")
    if agreement.rate is None:
        lines.append("agreement: no response pair was judged by two annotators")
    else:
        lines.append(f"agreement: {agreement.rate:.3f} over {agreement.items} response pair(s) "
                     f"judged by two or more annotators")
    if stats.model_ratings:
        lines += ["", *_table(("model", "scale", "ratings", "mean"),
                              [(m.model, m.scale, m.ratings, f"{m.mean:.3f}") for m in stats.model_ratings])]
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Columns padded to their widest cell; text left-aligned, numbers right-aligned."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(not isinstance(row[i], str) or _is_number(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()
            for row in cells]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
