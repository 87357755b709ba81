"""Presidio recognisers and NLP engine for Heron's PII detection, all offline.

Presidio (`presidio_analyzer`) runs a registry of recognisers over a text and
an NLP engine whose tokens and lemmas let its context enhancer raise a match's
score when words such as "phone" or "ssn" stand near it. Its default NLP
engine needs a spaCy model, which cannot be downloaded here, so
`TokenizerNlpEngine` runs spaCy's rule-based English tokenizer
(`spacy.blank("en")`, shipped in the spaCy wheel) and gives lowercased tokens
as lemmas: context words still work, named-entity recognition is not asked
of it (names are `pii_names`'s job). Presidio's context enhancer looks for
each match's token from the start of the text, and its keywords in a list;
`OffsetContextEnhancer` bisects on the token offsets and `Keywords` answers
from a set, so a long text costs time linear in its length, not quadratic.

Presidio's built-ins are used where they fit: phone numbers (the
`phonenumbers` library's matcher, validated per region, 7-15 digits), IPv4/IPv6 (regex +
`ipaddress` validation), IBANs (per-country format + ISO 13616 mod-97 check),
US SSNs (made stricter: areas 900-999 are never issued) and emails. The email
recogniser validates the domain with `tldextract`, whose default extractor
fetches the public-suffix list over the network on first use; here it reads
the snapshot bundled in the `tldextract` wheel (`suffix_list_urls=()`) and
caches nothing on disk.

Heron's own: payment cards (IIN prefix, 13-19 digits, Luhn), dates in common
numeric and month-name formats (validated), ages over 89 (HIPAA Safe Harbor,
45 CFR 164.514(b)(2)(i)(C)) only next to age words, medical record and
account numbers only after their labels, US street addresses, and URLs (the
built-in one flags file names such as `train.py` and keeps a sentence's final
full stop).
"""
from __future__ import annotations

import sys
from bisect import bisect_right
from functools import lru_cache
from typing import Iterable, Iterator

import regex as re

from heron.govern.pii_lexicon import STREET_SUFFIXES
from heron.govern.presidio import (EmailRecognizer, EntityRecognizer, IbanRecognizer, IpRecognizer,
                                   LemmaContextAwareEnhancer, NlpArtifacts, NlpEngine, Pattern, PatternRecognizer,
                                   PhoneRecognizer, RecognizerResult, UsSsnRecognizer)

CASE_SENSITIVE = re.DOTALL | re.MULTILINE  # Presidio's default adds IGNORECASE


class TokenizerNlpEngine(NlpEngine):
    """spaCy's rule-based English tokenizer, no model: tokens, and lowercased tokens as lemmas."""

    def __init__(self) -> None:
        self.nlp = None

    def load(self) -> None:
        import spacy

        self.nlp = spacy.blank("en")
        # spaCy's 1,000,000-character limit guards its parser's and NER's memory (about 1 GB per 100,000
        # characters); the tokenizer alone is linear in the text, so longer texts are let through
        self.nlp.max_length = sys.maxsize

    def is_loaded(self) -> bool:
        return self.nlp is not None

    def process_text(self, text: str, language: str) -> NlpArtifacts:
        doc = self.nlp(text)
        artifacts = NlpArtifacts(entities=[], tokens=doc, tokens_indices=[t.idx for t in doc],
                                 lemmas=[t.lower_ for t in doc], nlp_engine=self, language=language, scores=[])
        artifacts.keywords = Keywords(artifacts.keywords)
        return artifacts

    def process_batch(self, texts: Iterable[str], language: str, batch_size: int = 1, n_process: int = 1,
                      **kwargs: object) -> Iterator[tuple[str, NlpArtifacts]]:
        for text in texts:
            yield text, self.process_text(text, language)

    def is_stopword(self, word: str, language: str) -> bool:
        return self.nlp.vocab[word].is_stop

    def is_punct(self, word: str, language: str) -> bool:
        return self.nlp.vocab[word].is_punct

    def get_supported_entities(self) -> list[str]:
        return []

    def get_supported_languages(self) -> list[str]:
        return ["en"]


class Keywords(list):
    """Presidio's keyword list, answering `in` from a set: its context enhancer asks of each word
    near each match whether it is a keyword anywhere in the text, which a list answers in time
    linear in the text. Built once and never changed."""

    def __init__(self, words: Iterable[str]) -> None:
        super().__init__(words)
        self.members = frozenset(self)

    def __contains__(self, word: object) -> bool:
        return word in self.members


class OffsetContextEnhancer(LemmaContextAwareEnhancer):
    """Presidio's lemma context enhancer, finding a match's token by bisection on the token offsets.

    Presidio walks the tokens from the start of the text for every match, time quadratic in the
    text (85 s for 6,000 matches in 194 KB). The token it stops at is the first that ends after the
    match's start: the last token starting at or before it, or the next one where the start falls
    in the space after that token (tokens are never empty and come in text order)."""

    @staticmethod
    def _find_index_of_match_token(word: str, start: int, tokens, tokens_indices: list[int]) -> int:
        i = bisect_right(tokens_indices, start) - 1
        if i < 0 or tokens_indices[i] + len(tokens[i]) <= start:
            i += 1
        if i >= len(tokens_indices):  # Presidio's error, word for word
            raise ValueError("Did not find word '" + word + "' in the list of tokens although it is expected to be "
                             "found")
        return i


# ----- checksums ----------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """The Luhn check (ISO/IEC 7812-1 annex B): double every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def luhn_check_digit(body: str) -> str:
    """The digit that makes `body + digit` pass the Luhn check."""
    return str(next(d for d in range(10) if luhn_valid(body + str(d))))


def iban_check_digits(country: str, bban: str) -> str:
    """ISO 13616 check digits: 98 - (BBAN + country + "00", letters as 10..35) mod 97."""
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{98 - int(numeric) % 97:02d}"


# ----- recognisers -------------------------------------------------------------------


@lru_cache(maxsize=1)
def _offline_tld_extract():
    import tldextract

    return tldextract.TLDExtract(cache_dir=None, suffix_list_urls=())  # the wheel's snapshot; no fetch, no cache


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's email recogniser, its domain checked against the bundled public-suffix snapshot."""

    def validate_result(self, pattern_text: str) -> bool:
        return _offline_tld_extract()(pattern_text).fqdn != ""


class StrictSsnRecognizer(UsSsnRecognizer):
    """Presidio's SSN recogniser, also rejecting areas 900-999 (never issued as SSNs; ITINs use them)."""

    def invalidate_result(self, pattern_text: str) -> bool:
        digits = "".join(c for c in pattern_text if c.isdigit())
        return super().invalidate_result(pattern_text) or digits[0] == "9"


class E164PhoneRecognizer(PhoneRecognizer):
    """Presidio's phone recogniser (the `phonenumbers` matcher), keeping only matches of 7-15 digits:
    E.164 numbers have at most 15, and shorter ones are extensions or codes that some national
    plans happen to accept (a 16-digit card reference, "#334367")."""

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts = None) -> list[RecognizerResult]:
        return [r for r in super().analyze(text, entities, nlp_artifacts)
                if 7 <= sum(c.isdigit() for c in text[r.start:r.end]) <= 15]


class CardRecognizer(PatternRecognizer):
    """Payment card numbers: a network's first digit (2-6), 13-19 digits, and the Luhn check."""

    PATTERNS = [Pattern("card", r"(?<![\w-])(?:3[47]\d{2}([ -]?)\d{6}\1\d{5}"
                                r"|[2-6]\d{3}([ -]?)\d{4}\2\d{4}\2\d{1,4}(?:\2\d{3})?)(?![\w-])", 0.3)]
    CONTEXT = ["card", "credit", "debit", "visa", "mastercard", "amex", "cardholder"]

    def __init__(self) -> None:
        super().__init__("CREDIT_CARD", patterns=self.PATTERNS, context=self.CONTEXT,
                         global_regex_flags=CASE_SENSITIVE)

    def validate_result(self, pattern_text: str) -> bool:
        digits = re.sub(r"\D", "", pattern_text)
        return 13 <= len(digits) <= 19 and luhn_valid(digits)


_MONTH = (r"(?=[A-Z])(?i:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
          r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\b\.?")
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
_YEAR = r"(?:19|20)\d{2}"
# A time of day after an ISO date ("T" or one space, hh:mm, seconds, fraction, zone), so a timestamp is
# one date, not a date and a dangling "T10:00".
_ISO_TIME = r"(?:[T ](?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:\.\d+)?)?(?:Z|[+-](?:[01]\d|2[0-3]):?[0-5]\d)?(?![\d:]))?"


class DateRecognizer(PatternRecognizer):
    """Dates: ISO (with a time of day, if one follows), numeric day/month/year in either order (one
    part <= 12), and month names."""

    PATTERNS = [
        Pattern("iso", rf"(?<![\d.-]){_YEAR}([-/.])(?:0?[1-9]|1[0-2])\1(?:0?[1-9]|[12]\d|3[01])(?!\d){_ISO_TIME}", 0.6),
        # "." only with a four-digit year: 1.2.10 is a version number.
        Pattern("numeric", rf"(?<![\d./-])\d{{1,2}}(?:([-/])\d{{1,2}}\1(?:{_YEAR}|\d{{2}})|\.\d{{1,2}}\.{_YEAR})"
                           r"(?![\d/-]|\.\d)", 0.5),
        Pattern("month day year", rf"\b{_MONTH}\s+{_DAY}\b(?:,?\s+{_YEAR}\b)?", 0.6),
        Pattern("day month year", rf"\b(?:the\s+)?{_DAY}\s+(?:of\s+)?{_MONTH}(?:,?\s+{_YEAR}\b)?", 0.6),
        Pattern("dd-mon-yyyy", rf"\b{_DAY}-{_MONTH}-{_YEAR}\b", 0.6),
        Pattern("month year", rf"\b{_MONTH}\s+{_YEAR}\b", 0.5),
    ]
    CONTEXT = ["date", "dob", "born", "birth", "admitted", "discharged", "seen", "visit"]

    def __init__(self) -> None:
        super().__init__("DATE", patterns=self.PATTERNS, context=self.CONTEXT, global_regex_flags=CASE_SENSITIVE)

    def validate_result(self, pattern_text: str) -> bool | None:
        """None (keep the pattern's score) for a real day and month, False otherwise."""
        if re.search(r"[A-Za-z]", pattern_text) or re.match(r"\d{4}", pattern_text):
            return None  # the month is a name, or ISO: the pattern bounds it
        a, b = (int(x) for x in re.split(r"[-/.]", pattern_text)[:2])
        return None if min(a, b) <= 12 and max(a, b) <= 31 else False


_OVER_89 = r"(?:9\d|1[01]\d)"  # 90-119


def after_label(label: str, separator: str, value: str, then: str = "") -> str:
    r"""`value` where `label`, then spaces around at most one `separator` character, stands before it.

    The label is a look-behind, which `regex` matches backwards at every position it is tried. Written
    as `\s*[:]?\s*`, a run of k spaces splits between the two `\s*` in k + 1 ways, each tried when the
    label is not there: k^2 steps for each of the k positions in the run (a 1,600-space run took over
    5 s; at Presidio's 60 s regex timeout the matches not yet found are dropped). `(?:\s*[:])?\s*`
    is the same language, matched one way; the look-ahead, the value itself, lets the look-behind be
    tried only where a value starts. Both leave the matches as they were (tests/govern/test_pii_scale.py).
    """
    return rf"(?i)(?={value})(?<=\b(?:{label})(?:\s*[{separator}])?\s*{then}){value}"


class AgeRecognizer(PatternRecognizer):
    """Ages over 89 (HIPAA Safe Harbor: ages 90+ are identifiers), only beside an age word."""

    PATTERNS = [
        Pattern("age before", after_label(r"age[ds]?|aged", ":=|", rf"{_OVER_89}(?!\d)"), 0.7),
        Pattern("age after", rf"(?i)(?<!\d){_OVER_89}(?=\s?-?\s?(?:years?|yrs?)[- ]?old\b|\s?y/?o\b"
                             r"|\s?years?\s+of\s+age\b)", 0.7),
    ]

    def __init__(self) -> None:
        super().__init__("AGE", patterns=self.PATTERNS, global_regex_flags=CASE_SENSITIVE)


class LabelledNumberRecognizer(PatternRecognizer):
    """A number that is personal data only after its label ("MRN:", "account no."): the label,
    in a look-behind, is the context; the span is the number alone."""

    def __init__(self, entity: str, label: str, value: str, score: float = 0.85) -> None:
        pattern = Pattern(entity.lower(), after_label(label, ":#.|", rf"{value}(?![\w-])", r"(?:is\s+)?"), score)
        super().__init__(entity, patterns=[pattern], global_regex_flags=CASE_SENSITIVE)


def mrn_recognizer() -> LabelledNumberRecognizer:
    label = (r"mrn|medical\s+record(?:\s+(?:number|no\.?|num|#))?|med\.?\s*rec\.?(?:\s*(?:no\.?|#))?"
             r"|chart\s+(?:number|no\.?|#)")
    return LabelledNumberRecognizer("MRN", label, r"(?:[A-Z]{1,3}-?)?\d[\d-]{4,14}\d")


def account_recognizer() -> LabelledNumberRecognizer:
    label = r"(?:bank\s+)?(?:account|acct|a/c)\.?(?:\s+(?:number|no\.?|num|#))?"
    return LabelledNumberRecognizer("ACCOUNT", label, r"(?:\d{6,20}|\d{2,6}(?:-\d{1,8}){1,4})")


_SUFFIX = "|".join(sorted(STREET_SUFFIXES, key=len, reverse=True))
_STREET_WORD = r"(?:\p{Lu}[\p{L}'’-]*|\d+(?:st|nd|rd|th))"


class AddressRecognizer(PatternRecognizer):
    """US street addresses: number, street name, USPS suffix, then an optional unit and
    an optional "City, ST 12345"."""

    PATTERNS = [Pattern("us street", rf"\b\d{{1,6}}(?:\s+[NSEW]\.?)?(?:\s+{_STREET_WORD}){{1,4}}\s+(?:{_SUFFIX})\b"
                                     r"(?:,?\s+(?:Apt|Apartment|Suite|Ste|Unit|#)\.?\s?[A-Za-z0-9-]+)?"
                                     r"(?:,\s+\p{Lu}[\p{L}.-]*(?:\s+\p{Lu}[\p{L}.-]*){0,3},\s+[A-Z]{2}\s+\d{5}"
                                     r"(?:-\d{4})?)?", 0.7)]
    CONTEXT = ["address", "live", "lives", "street", "ship", "mail", "billing"]

    def __init__(self) -> None:
        super().__init__("ADDRESS", patterns=self.PATTERNS, context=self.CONTEXT, global_regex_flags=CASE_SENSITIVE)


_URL_END = r"[^\s<>\"'()]*[^\s<>\"'().,;:!?]"  # a sentence's final punctuation is not part of it
_TLDS = "com|org|net|edu|gov|io|dev|ai|app|co|uk|de|fr|nl|eu|info|biz|health|us|ca|au|ch|se|me|tv"


class UrlRecognizer(PatternRecognizer):
    """URLs with a scheme or www., and bare domains on common TLDs (not file names like main.py)."""

    PATTERNS = [
        Pattern("scheme", rf"(?i)\b(?:https?|ftp)://{_URL_END}", 0.6),
        Pattern("www", rf"(?i)(?<![\w.@-])www\d{{0,3}}\.{_URL_END}", 0.6),
        Pattern("bare domain", rf"(?i)(?<![\w.@/-])(?:[a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?\.)+(?:{_TLDS})"
                               rf"(?:/{_URL_END})?(?![\w@-])", 0.5),
    ]
    CONTEXT = ["url", "website", "link", "site", "visit"]

    def __init__(self) -> None:
        super().__init__("URL", patterns=self.PATTERNS, context=self.CONTEXT, global_regex_flags=CASE_SENSITIVE)


# Where a number written without its country code is tried (with one, any country's is found). Presidio's
# default also has IL and BR, whose national plans make many bare 8-9 digit numbers valid.
PHONE_REGIONS = ("US", "CA", "GB", "DE", "FR", "IN")


def recognizers() -> list[EntityRecognizer]:
    """Every pattern recogniser, each labelled with Heron's entity name (names: `pii_names`)."""
    return [
        OfflineEmailRecognizer(supported_entity="EMAIL"),
        E164PhoneRecognizer(supported_entity="PHONE", supported_regions=PHONE_REGIONS),
        StrictSsnRecognizer(supported_entity="SSN"),
        IbanRecognizer(supported_entity="IBAN"),
        IpRecognizer(supported_entity="IP_ADDRESS"),
        CardRecognizer(),
        DateRecognizer(),
        AgeRecognizer(),
        mrn_recognizer(),
        account_recognizer(),
        AddressRecognizer(),
        UrlRecognizer(),
    ]
