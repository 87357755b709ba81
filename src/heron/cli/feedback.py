"""`heron feedback import|export|stats`: the human-feedback store from the command line.

    heron feedback import batch1.jsonl --db runs/feedback.db --annotator alice
    heron feedback export runs/pairs.jsonl --db runs/feedback.db [--consent runs/consent.db]
    heron feedback stats --db runs/feedback.db
"""
from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from heron.cli.options import add_overwrite, lasting_database, new_output, not_the_source
from heron.store.inputs import existing_input
from heron.govern.consent import ConsentRegistry, check_key
from heron.store import FeedbackStore, format_stats
from heron.store.jsonl import read_feedback_jsonl
from heron.store.records import PreferencePair, utc_now

DEFAULT_PURPOSE = "training"  # the consent a feedback export needs unless --purpose names another


def register(verbs: argparse._SubParsersAction) -> None:
    """Add `heron feedback` to the CLI's verbs."""
    actions = verbs.add_parser("feedback", help="the human-feedback store: import, export, stats").add_subparsers(
        dest="action", required=True)
    p = actions.add_parser("import", help="add comparisons and ratings from a JSONL file (all lines or none)")
    p.add_argument("file", type=Path, help="prompt/chosen/rejected or prompt/response/rating rows")
    p.add_argument("--db", type=lasting_database, required=True,
                   help="SQLite file or database URL (sqlite:///..., postgresql://...)")
    p.add_argument("--annotator", required=True, help="who gave the feedback (a row's own 'annotator' wins)")
    p.add_argument("--source", default=None, help="where the prompts came from (default: the file's name)")
    p.set_defaults(handler=feedback_import)
    p = actions.add_parser("export", help="write every comparison as prompt/chosen/rejected JSONL for DPO and RM")
    p.add_argument("file", type=Path, help="the JSONL file to write")
    p.add_argument("--db", type=lasting_database, required=True, help="SQLite file or database URL")
    p.add_argument("--consent", type=lasting_database, default=None, metavar="REGISTRY",
                   help="a consent registry (heron consent): leave out the comparisons of annotators "
                        "without consent in force for --purpose")
    p.add_argument("--purpose", default=None,
                   help=f"with --consent: the consent purpose an export needs (default {DEFAULT_PURPOSE})")
    add_overwrite(p)
    p.set_defaults(handler=feedback_export)
    p = actions.add_parser("stats", help="counts, annotators, agreement and mean rating per model")
    p.add_argument("--db", type=lasting_database, required=True, help="SQLite file or database URL")
    p.set_defaults(handler=feedback_stats)


def feedback_import(args: argparse.Namespace) -> int:
    existing_input(args.file, "file", "JSONL file")
    # Every line read and checked before the store is opened: a bad file must not leave a new, empty store.
    rows = read_feedback_jsonl(args.file, annotator=args.annotator, now=utc_now())
    with FeedbackStore.open(args.db) as store:
        counts = store.import_rows(rows, source=args.source or args.file.name)
        skipped = (f"; skipped {counted(counts.already_stored, 'line')} repeating a stored or earlier judgement"
                   if counts.already_stored else "")
        print(f"imported {counted(counts.comparisons, 'comparison')} and {counted(counts.ratings, 'rating')} "
              f"from {args.file} into {store.url}{skipped}")
    return 0


def counted(n: int, noun: str) -> str:
    """'1 rating', '2 ratings'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def feedback_export(args: argparse.Namespace) -> int:
    if args.purpose is not None and args.consent is None:
        raise ValueError("--purpose: names the consent an export needs, which only --consent REGISTRY checks; "
                         "give --consent too")
    target = new_output(args.file, args.db, "feedback store", args.overwrite)
    if args.consent is not None:
        target = not_the_source(target, args.consent, "consent registry")
    with FeedbackStore.open(args.db, create=False) as store, _consented(args) as consented:
        count = store.export_pairs(target, consented)
    print(f"wrote {count} prompt/chosen/rejected pairs to {args.file}")
    if consented is not None and consented.refused:
        left = ", ".join(f"{who} ({n})" for who, n in sorted(consented.refused.items()))
        print(f"left out {sum(consented.refused.values())} comparisons by annotators without consent for "
              f"{consented.purpose!r} in force: {left}")
    return 0


class _Consented:
    """Keeps a comparison when its annotator's consent for the purpose is in force at export
    time (read once per annotator); counts what it leaves out, by annotator."""

    def __init__(self, registry: ConsentRegistry, purpose: str) -> None:
        self.registry, self.purpose = registry, check_key(purpose, "purpose")
        self.decided: dict[str, bool] = {}
        self.refused: Counter[str] = Counter()

    def __call__(self, pair: PreferencePair) -> bool:
        if pair.annotator not in self.decided:
            self.decided[pair.annotator] = self.registry.has_consent(pair.annotator, self.purpose)
        if not self.decided[pair.annotator]:
            self.refused[pair.annotator] += 1
        return self.decided[pair.annotator]


@contextmanager
def _consented(args: argparse.Namespace) -> Iterator[_Consented | None]:
    if args.consent is None:
        yield None
        return
    with ConsentRegistry.open(args.consent, create=False) as registry:
        yield _Consented(registry, args.purpose or DEFAULT_PURPOSE)


def feedback_stats(args: argparse.Namespace) -> int:
    with FeedbackStore.open(args.db, create=False) as store:
        print(format_stats(store.stats(), title=f"feedback store {store.url}"))
    return 0


__all__ = ["register"]
