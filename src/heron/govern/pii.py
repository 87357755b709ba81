"""Find and redact personal data in text, offline.

    engine = PiiEngine()
    text = "Call Maria Gonzalez at 415-555-0132."
    engine.find(text)        # [Span('PERSON', 5, 19, 0.69, 'Maria Gonzalez'), Span('PHONE', 23, 35, 0.4, ...)]
    engine.redact(text)      # "Call <PERSON> at <PHONE>."
    engine.redact(text, "mask")                                  # "Call ***** ******** at ***-***-0132."
    engine.redact(text, "pseudonym", scope="run-7", secret=key)  # "Call Atgun Otto at 722-561-5302." (key b"key")
    redact(text)             # the shared default engine, type tags

One Presidio `AnalyzerEngine` does the finding: pattern recognisers for the
structured types and a learned name recogniser, over an NLP engine that
needs no spaCy model and a public-suffix list that is never fetched
(`pii_recognizers`, `pii_names`). Presidio's `AnonymizerEngine` applies the
operators. Entities (`ENTITIES`) use Heron's short names, so a type tag is
`<EMAIL>`, `<PHONE>`, ...

Overlapping matches are settled before anything is replaced: a match inside
a longer one goes (the domain inside an email, a name inside a street
address), then of two that cross the higher score wins.

How names are recognised, and why: `pii_names`.

Importing this module is cheap; Presidio (and spaCy, which it imports) loads
when the first engine is built.
"""
from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from heron.govern.pii_names import NameModel

ENTITIES = ("PERSON", "EMAIL", "PHONE", "ADDRESS", "DATE", "AGE", "SSN", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "URL",
            "MRN", "ACCOUNT")
# Types with a fixed form (and, for cards and IBANs, a checksum): the recall target is per type.
STRUCTURED = ("EMAIL", "PHONE", "SSN", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "URL", "DATE")
# Types masked down to their last four letters or digits ("****-****-****-1111"); the rest are masked whole.
KEEP_LAST_FOUR = frozenset({"CREDIT_CARD", "IBAN", "ACCOUNT", "SSN", "PHONE", "MRN"})
SCORE_THRESHOLD = 0.4  # Presidio's scale: a bare pattern scores 0.3-0.6, a checksum or context word lifts it
Operator = Literal["tag", "redact", "mask", "pseudonym"]
# What the tag operator writes (`_operator_config`), `<EMAIL>`: text redacted before holds these, none personal.
TYPE_TAG = re.compile("<(?:" + "|".join(ENTITIES) + ")>")


@dataclass(frozen=True)
class Span:
    """One piece of personal data: text[start:end] == self.text."""

    entity: str
    start: int
    end: int
    score: float
    text: str


def resolve_overlaps(spans: Iterable[Span]) -> list[Span]:
    """Non-overlapping spans in text order: drop spans inside longer ones, then of crossing
    spans keep the higher score (the longer on a tie, then the earlier, then the first given).

    O(n log n): a sweep finds the spans inside others, and a prefix-maximum tree over the kept
    spans' starts says whether a span crosses one of them (comparing every pair took 25 s for
    16k spans)."""
    spans = list(spans)
    inside = _inside_others({(s.start, s.end) for s in spans})
    outer = [s for s in spans if (s.start, s.end) not in inside]
    starts = sorted({s.start for s in outer})
    furthest = _PrefixMax(len(starts))  # each kept span's end, at the rank of its start
    kept: list[Span] = []
    for s in sorted(outer, key=lambda s: (-s.score, -(s.end - s.start), s.start)):
        # s crosses a kept k iff k.start < s.end and s.start < k.end
        if furthest.query(bisect_left(starts, s.end)) <= s.start:
            kept.append(s)
            furthest.raise_to(bisect_left(starts, s.start), s.end)
    return sorted(kept, key=lambda s: s.start)


def _inside_others(intervals: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The (start, end) intervals that another contains: by start, the longest first, each is inside
    one seen before it iff the furthest end seen so far reaches its end. (Containing and being a
    different interval is the same as containing and being longer.)"""
    inside: set[tuple[int, int]] = set()
    furthest = -math.inf
    for start, end in sorted(intervals, key=lambda iv: (iv[0], -iv[1])):
        if furthest >= end:
            inside.add((start, end))
        furthest = max(furthest, end)
    return inside


class _PrefixMax:
    """A Fenwick tree of maxima (Fenwick 1994): raise slot i to a value; the maximum over slots < n."""

    def __init__(self, size: int) -> None:
        self.tree = [-math.inf] * (size + 1)

    def raise_to(self, i: int, value: float) -> None:
        i += 1
        while i < len(self.tree):
            self.tree[i] = max(self.tree[i], value)
            i += i & -i

    def query(self, n: int) -> float:
        best = -math.inf
        while n > 0:
            best = max(best, self.tree[n])
            n -= n & -n
        return best


def outside_type_tags(text: str, spans: Iterable[Span]) -> list[Span]:
    """The spans not inside one of the tag operator's own tags in `text`: redacting text that was
    redacted before must leave it as it is, but the name model takes "URL" in "<URL> and <URL>"
    for a name, which made "<<PERSON>> and <<PERSON>>"."""
    tags = [m.span() for m in TYPE_TAG.finditer(text)]
    if not tags:
        return list(spans)
    starts = [start for start, _ in tags]
    kept = []
    for s in spans:
        i = bisect_left(starts, s.start + 1) - 1  # the last tag starting at or before the span
        if not (i >= 0 and s.end <= tags[i][1]):
            kept.append(s)
    return kept


def mask(entity: str, value: str, char: str = "*") -> str:
    """Letters and digits to `char`, separators kept; number-like types keep their last four."""
    keep = 4 if entity in KEEP_LAST_FOUR else 0
    alnum = [i for i, c in enumerate(value) if c.isalnum()]
    hidden = set(alnum[:len(alnum) - keep]) if keep else set(alnum)
    return "".join(char if i in hidden else c for i, c in enumerate(value))


class PiiEngine:
    """Presidio's analyzer with Heron's recognisers, and its anonymizer for the operators.

    entities: the types to look for (default: all of ENTITIES).
    names: the person-name model (default: `pii_names.default_name_model()`, trained on first use).
    """

    def __init__(self, entities: Iterable[str] | None = None, score_threshold: float = SCORE_THRESHOLD,
                 names: NameModel | None = None) -> None:
        from heron.govern.pii_recognizers import OffsetContextEnhancer, TokenizerNlpEngine, recognizers
        from heron.govern.presidio import AnalyzerEngine, AnonymizerEngine, RecognizerRegistry

        self.entities = tuple(ENTITIES if entities is None else entities)
        unknown = sorted(set(self.entities) - set(ENTITIES))
        if unknown:
            raise ValueError(f"unknown PII entities {unknown}; known: {', '.join(ENTITIES)}")
        chosen = [r for r in recognizers() if r.supported_entities[0] in self.entities]
        if "PERSON" in self.entities:
            from heron.govern.pii_names import NameRecognizer, default_name_model

            chosen.append(NameRecognizer(names or default_name_model()))
        self.analyzer = AnalyzerEngine(
            registry=RecognizerRegistry(recognizers=chosen), nlp_engine=TokenizerNlpEngine(),
            default_score_threshold=score_threshold,
            # whole words: Presidio's default substring match lets "card" in "cardiology" raise a card's score
            context_aware_enhancer=OffsetContextEnhancer(context_matching_mode="whole_word"))
        self.anonymizer = AnonymizerEngine()

    def find(self, text: str) -> list[Span]:
        """Personal data in `text`, non-overlapping, in text order."""
        results = self.analyzer.analyze(text, language="en", entities=list(self.entities))
        return resolve_overlaps(outside_type_tags(text, (
            Span(r.entity_type, r.start, r.end, round(r.score, 4), text[r.start:r.end]) for r in results)))

    def redact(self, text: str, operator: Operator = "tag", *, scope: str = "", secret: bytes | str | None = None,
               spans: list[Span] | None = None) -> str:
        """`text` with each span found (or given) replaced:

        tag: `<ENTITY>`; redact: removed; mask: `*` for each letter and digit (number-like types keep
        their last four); pseudonym: a consistent surrogate of the same type, keyed by `secret` and `scope`
        (see `pii_surrogates`; `secret` is required).
        """
        from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

        spans = self.find(text) if spans is None else spans
        configs = {entity: _operator_config(OperatorConfig, operator, entity, scope, secret)
                   for entity in {s.entity for s in spans}}
        results = [RecognizerResult(s.entity, s.start, s.end, s.score) for s in spans]
        return self.anonymizer.anonymize(text, results, configs, merge_entities_with_spaces=False).text

    def redact_json(self, value: Any, operator: Operator = "tag", *, fields: Collection[str] | None = None,
                    scope: str = "", secret: bytes | str | None = None) -> Any:
        """A parsed JSON value with the personal data in its strings replaced (as `redact` does),
        keys, numbers and structure kept, so the result is still the same records: every string, or
        with `fields` only the strings under those keys, at any depth (a feedback export's "prompt"
        and "chosen", not its "created_at" that a re-import parses)."""
        def walk(item: Any, chosen: bool) -> Any:
            if isinstance(item, str):
                return self.redact(item, operator, scope=scope, secret=secret) if chosen and item else item
            if isinstance(item, list):
                return [walk(x, chosen) for x in item]
            if isinstance(item, dict):
                return {key: walk(x, chosen or (fields is not None and key in fields)) for key, x in item.items()}
            return item

        return walk(value, fields is None)


def _operator_config(config: type, operator: Operator, entity: str, scope: str, secret: bytes | str | None):
    if operator == "tag":
        return config("replace", {"new_value": f"<{entity}>"})
    if operator == "redact":
        return config("redact")
    if operator == "mask":
        return config("custom", {"lambda": lambda value: mask(entity, value)})
    if operator == "pseudonym":
        from heron.govern.pii_surrogates import surrogate

        if not secret:
            raise ValueError("the pseudonym operator needs a secret (bytes or str): without one anyone could "
                             "recompute the mapping")
        key = secret.encode() if isinstance(secret, str) else secret
        return config("custom", {"lambda": lambda value: surrogate(entity, value, scope, key)})
    raise ValueError(f"unknown operator {operator!r}; choose tag, redact, mask or pseudonym")


@lru_cache(maxsize=1)
def default_engine() -> PiiEngine:
    """The shared engine behind `redact` (built once per process)."""
    return PiiEngine()


def redact(text: str) -> str:
    """`text` with every kind of personal data replaced by its type tag, e.g. `<EMAIL>`."""
    return default_engine().redact(text)
