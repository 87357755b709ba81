"""PII detection on a labelled synthetic corpus of held-out names (issue 8).

`heron.govern.pii.PiiEngine()` (the default engine: Presidio's analyzer with
Heron's recognisers and its name model, trained here as on any first use)
runs over `pii_corpus.generate(3000, seed=2024, split="test")`: chat
messages, clinical notes, emails and forms with planted values of every
type at exact offsets, plus distractors. Every name and capitalised
distractor in it comes from the `test` split, which the name model never
saw; a quarter of the templates were left out of its training too. Scoring
is per type with overlap matching (a planted span counts as found when a
prediction of the same type overlaps it; a prediction is correct when it
overlaps a planted span of its type); exact-boundary recall is in the table.

Keys: the lowest recall among the structured types (emails, phones, SSNs,
cards, IBANs, IPs, URLs, dates; target 0.95 each), person-name recall
(target 0.85), precision and F2 over all types. A second, smaller corpus
draws every surname from those that are also common English words (Green,
White, Young: `pii_lexicon.word_surnames`, left out of the name lists), where
only exact boundaries count: finding "Sarah" of "Sarah Green" leaks the rest.

    python benchmarks/bench_pii.py [--smoke] [--no-write]
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from common import Result, finish, machine, plan_args
from heron.govern.pii import STRUCTURED, PiiEngine
from heron.govern.pii_corpus import Counts, Pools, f_beta, generate, overall, score
from heron.govern.pii_lexicon import word_surnames
from heron.govern.pii_names import NameSettings, default_name_model

STRUCTURED_TARGET, PERSON_TARGET = 0.95, 0.85


@dataclass(frozen=True)
class Plan:
    examples: int
    seed: int


FULL = Plan(examples=3000, seed=2024)
SMOKE = Plan(examples=60, seed=2024)


def type_table(counts: dict[str, Counts]) -> list[str]:
    rows = ["| type | planted | recall | exact-boundary recall | predicted | precision |",
            "|---|---:|---:|---:|---:|---:|"]
    for entity, c in counts.items():
        mark = " (structured)" if entity in STRUCTURED else ""
        rows.append(f"| {entity}{mark} | {c.gold} | {c.recall:.3f} | {c.exact_recall:.3f} | {c.predicted} | "
                    f"{c.precision:.3f} |")
    return rows


def main() -> None:
    args, plan = plan_args(__doc__, FULL, SMOKE)
    info = machine()
    started = time.perf_counter()
    default_name_model()
    train_s = time.perf_counter() - started
    engine = PiiEngine()
    examples = generate(plan.examples, seed=plan.seed, split="test")
    scored_at = time.perf_counter()
    counts = score(examples, engine.find)
    score_s = time.perf_counter() - scored_at
    held_out = score([e for e in examples if e.template.held_out], engine.find)["PERSON"]
    word_pools = dataclasses.replace(Pools.of("test"), last=word_surnames())
    word_corpus = generate(plan.examples // 3, seed=plan.seed, split="test", pools=word_pools)
    word = score(word_corpus, engine.find)["PERSON"]
    total = overall(counts)
    weakest = min(STRUCTURED, key=lambda e: counts[e].recall)
    corpus = f"{plan.examples:,} examples of pii_corpus.generate(seed={plan.seed}, split='test')"

    results = [
        Result("pii_recall_min_structured", counts[weakest].recall, "",
               f"lowest per-type recall over {', '.join(STRUCTURED)} (here {weakest}), overlap matching, default "
               f"PiiEngine on {corpus}", STRUCTURED_TARGET),
        Result("pii_recall_person", counts["PERSON"].recall, "",
               f"person-name recall, overlap matching, on {counts['PERSON'].gold:,} planted names drawn only from "
               f"the held-out name split (default PiiEngine, {corpus})", PERSON_TARGET),
        Result("pii_precision_overall", total.precision, "",
               f"correct predictions / predictions over all types, overlap matching ({corpus})"),
        Result("pii_f2_overall", f_beta(total.precision, total.recall), "",
               f"F2 of overall precision and recall (recall weighted 4x), overlap matching ({corpus})"),
        Result("pii_exact_recall_person_word_surnames", word.exact_recall, "",
               f"person names found with exactly their boundaries, every surname one that is also a common "
               f"English word ({len(word_surnames())} of them), on {word.gold:,} names in "
               f"{len(word_corpus):,} examples of pii_corpus.generate(seed={plan.seed}, split='test') with "
               f"those surnames; overlap recall {word.recall:.3f}, precision {word.precision:.3f}"),
    ]
    chars = sum(len(e.text) for e in examples)
    settings = NameSettings()
    notes = [
        "Per type (overlap matching; exact-boundary recall also shown):",
        "",
        *type_table(counts),
        "",
        f"Overall: recall {total.recall:.3f}, exact-boundary recall {total.exact_recall:.3f}, precision "
        f"{total.precision:.3f}, F2 {f_beta(total.precision, total.recall):.3f}.",
        f"Person names in the templates left out of the name model's training: recall {held_out.recall:.3f}, "
        f"exact-boundary {held_out.exact_recall:.3f}, precision {held_out.precision:.3f} ({held_out.gold} names).",
        f"Name model: logistic regression over token features, {settings.examples:,} training examples "
        f"(train-split names and templates), {settings.epochs} AdaGrad epochs, word dropout "
        f"{settings.word_dropout}; trained in {train_s:.1f} s. Finding: {plan.examples / score_s:,.0f} examples/s "
        f"({chars / score_s / 1000:,.1f} k characters/s) on one process.",
        "The structured types are scored on the formats the generator writes (listed in pii_corpus), which were "
        "written alongside the recognisers: their recall checks those formats, it does not estimate recall on "
        "real text. Names and distractors are the held-out part: the name model never saw them.",
    ]
    finish(args, "pii", "PII detection and redaction", results, info, notes)


if __name__ == "__main__":
    main()
