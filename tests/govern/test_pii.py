"""PII detection and redaction (heron.govern.pii): known sentences with exact spans, checksum
near-misses, distractors, each operator's exact output, pseudonym keys and scopes, no network, the
synthetic corpus's offsets, and recall on a small held-out corpus.

One engine (and one training of the name model, a few seconds) serves the module."""
import hashlib
import hmac
import random
import socket
import subprocess
import sys

import numpy as np
import pytest

from heron.govern import pii_names, pii_recognizers
from heron.govern.pii import ENTITIES, STRUCTURED, PiiEngine, Span, mask, redact, resolve_overlaps
from heron.govern.pii_corpus import TEMPLATES, Counts, f_beta, generate, score, score_one
from heron.govern.pii_lexicon import first_names, last_names, split_of
from heron.govern.pii_names import NameSettings, default_name_model, tokenize
from heron.govern.pii_recognizers import iban_check_digits, luhn_check_digit, luhn_valid
from heron.govern.pii_surrogates import surrogate


@pytest.fixture(scope="module")
def engine() -> PiiEngine:
    return PiiEngine()


def found(engine: PiiEngine, text: str) -> list[tuple[str, str]]:
    return [(s.entity, s.text) for s in engine.find(text)]


# ----- each type, exact spans -------------------------------------------------------------

KNOWN = [
    ("Email me at maria.lopez+news@mail.example.co.uk today.", [("EMAIL", "maria.lopez+news@mail.example.co.uk")]),
    ("Call (415) 555-0132 or +44 20 7946 0958.", [("PHONE", "(415) 555-0132"), ("PHONE", "+44 20 7946 0958")]),
    ("My SSN is 536-22-8741.", [("SSN", "536-22-8741")]),
    ("Card: 4111 1111 1111 1111, Amex 3782-822463-10005.",
     [("CREDIT_CARD", "4111 1111 1111 1111"), ("CREDIT_CARD", "3782-822463-10005")]),
    ("Pay to GB82 WEST 1234 5698 7654 32 or DE89370400440532013000.",
     [("IBAN", "GB82 WEST 1234 5698 7654 32"), ("IBAN", "DE89370400440532013000")]),
    ("Seen from 203.0.113.7 and 2001:db8::8a2e:370:7334.", [("IP_ADDRESS", "203.0.113.7"),
                                                           ("IP_ADDRESS", "2001:db8::8a2e:370:7334")]),
    ("Docs at https://example.com/docs?id=3. Also www.heron.dev.", [("URL", "https://example.com/docs?id=3"),
                                                                    ("URL", "www.heron.dev")]),
    ("Born March 14, 1931; admitted 2024-03-14, discharged 03/18/2024 and 14-MAR-2024.",
     [("DATE", "March 14, 1931"), ("DATE", "2024-03-14"), ("DATE", "03/18/2024"), ("DATE", "14-MAR-2024")]),
    ("Logged 2024-03-14T10:22:31Z, then 2024-03-15 08:05; build 2024-03-16T.",  # a timestamp is one date
     [("DATE", "2024-03-14T10:22:31Z"), ("DATE", "2024-03-15 08:05"), ("DATE", "2024-03-16")]),
    ("A 93-year-old woman; age: 101.", [("AGE", "93"), ("AGE", "101")]),
    ("MRN: 00482913. Account no. 4829-1177-03.", [("MRN", "00482913"), ("ACCOUNT", "4829-1177-03")]),
    ("Ship to 1600 Pennsylvania Avenue, Washington, DC 20500.",
     [("ADDRESS", "1600 Pennsylvania Avenue, Washington, DC 20500")]),
    ("Thanks, Lena Fischer", [("PERSON", "Lena Fischer")]),
    ("Meeting with Priya Raman on Friday.", [("PERSON", "Priya Raman")]),
]


@pytest.mark.parametrize("text, expected", KNOWN, ids=[e[0][0] for _, e in KNOWN])
def test_each_type_is_found_with_exact_spans(engine, text, expected):
    spans = engine.find(text)
    assert [(s.entity, s.text) for s in spans] == expected
    assert all(text[s.start:s.end] == s.text and 0 < s.score <= 1 for s in spans)


def test_every_entity_has_a_known_sentence():
    assert {e for _, expected in KNOWN for e, _ in expected} == set(ENTITIES)


# ----- checksums and near misses ----------------------------------------------------------


def test_luhn_and_iban_checks_against_published_numbers():
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112") and not luhn_valid("79927398710")
    assert luhn_check_digit("7992739871") == "3"
    assert iban_check_digits("GB", "WEST12345698765432") == "82"  # the ECBS example IBAN
    assert iban_check_digits("DE", "370400440532013000") == "89"


@pytest.mark.parametrize("text", [
    "Card: 4111 1111 1111 1112.",  # one digit off: Luhn fails
    "Card: 4111 1111 1111 1121.",  # two digits swapped... and still failing
    "Pay to GB83 WEST 1234 5698 7654 32.",  # check digits off by one
    "Pay to GB82 WEST 1234 5698 7654 33.",  # last digit off
    "My SSN is 000-22-8741.",  # area 000, never issued
    "My SSN is 666-22-8741.",  # area 666, never issued
    "My SSN is 936-22-8741.",  # area 9xx: ITINs, not SSNs
    "My SSN is 536-00-8741.",  # group 00
])
def test_checksum_and_validity_near_misses_are_rejected(engine, text):
    assert found(engine, text) == []


def test_invalid_dates_are_rejected(engine):
    assert found(engine, "Codes 13/13/2024 and 2024-13-01 and 32/01/2024.") == []


# ----- distractors ------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "We upgraded Python to 3.11.4 and Kubernetes to v1.29 on Monday; tracking 123456789 shipped in March.",
    "A 45-year-old man took Tylenol 500 mg; see Cardiology. Age 67. Ref 4111 1111 1111 1112.",
    "Open main.py and notes.md in Jupyter; 12 tests pass at 10:30 in 2019 for $1,249.00 (ticket #48213).",
])
def test_distractors_are_not_flagged(engine, text):
    assert found(engine, text) == []


# ----- operators --------------------------------------------------------------------------

SENTENCE = "Lena Fischer paid with 4111 1111 1111 1111 from 203.0.113.7."


def test_tag_operator(engine):
    assert engine.redact(SENTENCE) == "<PERSON> paid with <CREDIT_CARD> from <IP_ADDRESS>."
    assert redact(SENTENCE) == "<PERSON> paid with <CREDIT_CARD> from <IP_ADDRESS>."  # the module's default engine


def test_redacting_redacted_text_changes_nothing(engine):
    """The name model took "IP_ADDRESS", "URL", "CREDIT_CARD" in a row of tags for names: "<<PERSON>>"."""
    text = "Lena Fischer logged in from 192.168.1.20 and 2001:db8::1 and fe80::1ff:fe23:4567:890a and ::1 today"
    once = engine.redact(text)
    assert once == "<PERSON> logged in from <IP_ADDRESS> and <IP_ADDRESS> and <IP_ADDRESS> and <IP_ADDRESS> today"
    assert engine.redact(once) == once
    for entity in ENTITIES:
        tags = f"Contact <{entity}>, or <{entity}> and <{entity}>."
        assert engine.find(tags) == [] and engine.redact(tags) == tags, entity
    assert found(engine, "<URL>Lena Fischer") == [("PERSON", "Lena Fischer")]  # beside a tag is still found


def test_redact_operator(engine):
    assert engine.redact(SENTENCE, "redact") == " paid with  from ."


def test_mask_operator(engine):
    assert engine.redact(SENTENCE, "mask") == "**** ******* paid with **** **** **** 1111 from ***.*.***.*."
    assert mask("IBAN", "GB82 WEST 1234 5698 7654 32") == "**** **** **** **** **54 32"
    assert mask("EMAIL", "a.b@c.io") == "*.*@*.**"


def test_pseudonym_operator_known_answer(engine):
    """A known-answer vector: pseudonyms stay the same across versions, or old ones stop matching."""
    text = "SSN 536-22-8741 from 2001:db8::1 on 2024-03-14."
    assert engine.redact(text, "pseudonym", scope="study-1", secret=b"k") == \
        "SSN 927-43-4194 from 2001:db8:7af:d6b4:275b:1cf4:d99f:db70 on 1984-07-01."


def test_operator_errors(engine):
    with pytest.raises(ValueError, match="secret"):
        engine.redact(SENTENCE, "pseudonym")
    with pytest.raises(ValueError, match="unknown operator"):
        engine.redact(SENTENCE, "shred")
    with pytest.raises(ValueError, match="unknown PII entities"):
        PiiEngine(entities=["PERSON", "SHOE_SIZE"])


# ----- pseudonyms -------------------------------------------------------------------------

VALUES = [("PERSON", "Lena Fischer"), ("EMAIL", "lena@fischer.de"), ("PHONE", "(415) 555-0132"),
          ("SSN", "536-22-8741"), ("CREDIT_CARD", "4111 1111 1111 1111"), ("IBAN", "GB82 WEST 1234 5698 7654 32"),
          ("IP_ADDRESS", "203.0.113.7"), ("IP_ADDRESS", "2001:db8::1"), ("URL", "https://heron.dev/docs"),
          ("DATE", "March 14, 1931"), ("DATE", "03/14/31"), ("DATE", "2024-03-14T10:22:31.5+02:00"), ("AGE", "93"),
          ("MRN", "MR00482913"), ("ACCOUNT", "4829-1177-03"),
          ("ADDRESS", "1600 Pennsylvania Avenue, Washington, DC 20500")]


@pytest.mark.parametrize("entity, value", VALUES, ids=[f"{e}:{v}" for e, v in VALUES])
def test_pseudonyms_consistent_in_scope_and_different_across_scopes_and_secrets(entity, value):
    fake = surrogate(entity, value, "scope-a", b"secret-1")
    assert fake == surrogate(entity, value, "scope-a", b"secret-1")
    assert fake != value
    others = {surrogate(entity, value, "scope-b", b"secret-1"), surrogate(entity, value, "scope-a", b"secret-2")}
    assert fake not in others


def test_pseudonyms_keep_the_type(engine):
    for entity, value in VALUES:
        fake = surrogate(entity, value, "s", b"k")
        if entity in {"SSN", "AGE", "MRN", "ACCOUNT"}:  # SSNs go to the never-issued 9xx; the rest need a label
            continue
        assert found(engine, f"Value: {fake}")[-1][0] == entity, (entity, fake)
    card = surrogate("CREDIT_CARD", "4111 1111 1111 1111", "s", b"k")
    assert luhn_valid(card.replace(" ", "")) and card[0] == "4" and len(card) == 19
    iban = surrogate("IBAN", "GB82 WEST 1234 5698 7654 32", "s", b"k").replace(" ", "")
    assert iban[:2] == "GB" and iban_check_digits("GB", iban[4:]) == iban[2:4]


def test_same_value_in_other_layouts_gets_the_same_digits():
    a = surrogate("PHONE", "(415) 555-0132", "s", b"k")
    b = surrogate("PHONE", "415-555-0132", "s", b"k")
    assert a[0] == "(" and "-" in b and [c for c in a if c.isdigit()] == [c for c in b if c.isdigit()]
    assert surrogate("PERSON", "Lena Fischer", "s", b"k") == surrogate("PERSON", "Lena  FISCHER", "s", b"k")


def test_pseudonyms_cannot_be_recomputed_without_the_secret():
    """The surrogate is a function of HMAC(secret, ...): guessing secrets does not reproduce it."""
    fake = surrogate("PERSON", "Lena Fischer", "s", b"the real secret")
    guesses = [b"", b"s", b"secret", b"heron", b"Lena Fischer", *(bytes([i]) for i in range(256))]
    assert all(surrogate("PERSON", "Lena Fischer", "s", g) != fake for g in guesses)
    # and the seed is exactly HMAC-SHA256 (RFC 2104) of the scope, entity and normalised value
    digest = hmac.new(b"k", "s\x1fPERSON\x1flena fischer".encode(), hashlib.sha256).digest()
    rng = random.Random(int.from_bytes(digest, "big"))
    assert surrogate("PERSON", "Lena Fischer", "s", b"k") == f"{rng.choice(first_names())} {rng.choice(last_names())}"


# ----- offline ----------------------------------------------------------------------------


def test_nothing_touches_the_network(monkeypatch):
    """Build an engine from scratch and run it with every way out of the process recorded (and
    refused): tldextract would fetch the public-suffix list, and swallow a failure, on first use."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    pii_recognizers._offline_tld_extract.cache_clear()
    engine = PiiEngine(names=default_name_model())
    assert found(engine, "Mail lena@fischer.example.co.uk or visit https://heron.dev") == \
        [("EMAIL", "lena@fischer.example.co.uk"), ("URL", "https://heron.dev")]
    assert attempts == []


# ----- overlaps ---------------------------------------------------------------------------


def test_overlaps_keep_the_outer_span_then_the_higher_score():
    email = Span("EMAIL", 0, 20, 1.0, "")
    inner = Span("URL", 10, 20, 0.9, "")
    a, b = Span("PHONE", 30, 40, 0.4, ""), Span("ACCOUNT", 35, 45, 0.85, "")
    assert resolve_overlaps([inner, b, email, a]) == [email, b]


def test_crossing_spans_of_equal_score_keep_the_longer():
    short, long = Span("PHONE", 0, 10, 0.5, ""), Span("ACCOUNT", 5, 20, 0.5, "")
    assert resolve_overlaps([short, long]) == [long]
    assert resolve_overlaps([long, short]) == [long]


# ----- the corpus -------------------------------------------------------------------------


def test_corpus_offsets_are_exact_and_seeded():
    for split in ("train", "dev", "test"):
        examples = generate(300, seed=5, split=split)
        assert examples == generate(300, seed=5, split=split)
        for ex in examples:
            assert all(ex.text[s.start:s.end] == s.text and s.text for s in ex.spans)
            assert all(a.end <= b.start for a, b in zip(ex.spans, ex.spans[1:]))
    assert [e.text for e in generate(50, seed=5)] != [e.text for e in generate(50, seed=6)]
    assert not any(e.template.held_out for e in generate(300, seed=5, split="train"))
    assert {e.template.index for e in generate(len(TEMPLATES), seed=5)} == {t.index for t in TEMPLATES}


def test_held_out_names_are_never_seen_in_training():
    settings = NameSettings()
    train_tokens = {t.text.lower() for ex in generate(settings.examples, seed=settings.seed, split="train")
                    for s in ex.spans
                    if s.entity == "PERSON" for t in tokenize(s.text)}
    test_tokens = {t.text.lower() for ex in generate(300, seed=11, split="test") for s in ex.spans
                   if s.entity == "PERSON" for t in tokenize(s.text) if t.text[0].isalpha() and len(t.text) > 1}
    assert test_tokens and not train_tokens & test_tokens
    assert all(split_of(n) == "test" for n in first_names("test") + last_names("test"))
    vocab = default_name_model().vocab
    assert not any(f"w={name}" in vocab for name in test_tokens)  # the model holds no test name


def test_scoring_counts_overlaps_and_exact_matches():
    gold = [Span("PERSON", 0, 12, 1, ""), Span("EMAIL", 20, 30, 1, "")]
    predicted = [Span("PERSON", 5, 12, 0.9, ""), Span("PHONE", 20, 30, 0.4, ""), Span("DATE", 40, 44, 0.6, "")]
    counts = score_one(gold, predicted)
    assert counts["PERSON"] == Counts(gold=1, found=1, exact=0, predicted=1, correct=1)
    assert counts["EMAIL"] == Counts(gold=1) and counts["PHONE"] == Counts(predicted=1)
    assert f_beta(0.5, 1.0) == pytest.approx(5 * 0.5 / (4 * 0.5 + 1))


# Sentences outside the corpus's templates, where the model alone was sure of only part of
# a name, or of a word beside it.
OUTSIDE_TEMPLATES = [
    ("Call John Smith at 415-555-0132.", [("PERSON", "John Smith"), ("PHONE", "415-555-0132")]),
    ("Email from Robert Brown about the invoice.", [("PERSON", "Robert Brown")]),
    ("I met Sarah Williams and David Miller yesterday.", [("PERSON", "Sarah Williams"), ("PERSON", "David Miller")]),
    ("The award goes to Hannah Schmidt for her research.", [("PERSON", "Hannah Schmidt")]),
    # Surnames that are also common words: the whole name, or the surname leaks.
    ("Dear Dr. Sarah Green, your results are in.", [("PERSON", "Sarah Green")]),
    ("Neil Young and Emma Stone met in Leeds.", [("PERSON", "Neil Young"), ("PERSON", "Emma Stone")]),
    ("I spoke with Mrs. White yesterday.", [("PERSON", "White")]),
    # A sentence's first word: a first name is taken in, a verb opening a request is not.
    ("Mary Ann Jones called.", [("PERSON", "Mary Ann Jones")]),
    ("Contact Mary Jones about it.", [("PERSON", "Mary Jones")]),
    ("Server down; Mary Jones is on call.", [("PERSON", "Mary Jones")]),
]


@pytest.mark.parametrize("text, expected", OUTSIDE_TEMPLATES, ids=[t for t, _ in OUTSIDE_TEMPLATES])
def test_names_outside_the_templates(engine, text, expected):
    assert found(engine, text) == expected


TITLE_CASE = [  # (text, each token's p(name), the names found)
    ("Call John Smith at noon", [0.0, 0.9, 0.1, 0.0, 0.0], ["John Smith"]),  # the sure first name takes its surname
    ("from Robert Brown about", [0.0, 0.05, 0.9, 0.0], ["Robert Brown"]),  # ... and the other way round
    ("I met Sarah Williams", [0.0, 0.3, 0.9, 0.9], ["Sarah Williams"]),  # a lower-case edge word is shed
    ("Yesterday Paul Walker left", [0.0, 0.9, 0.9, 0.0], ["Paul Walker"]),  # a sentence's first word is not taken
    ("Then. Paul Walker left", [0.0, 0.0, 0.0, 0.9, 0.0], ["Paul Walker"]),  # a first name opening a sentence
    ("Contact Paul Walker now", [0.3, 0.9, 0.9, 0.0], ["Paul Walker"]),  # ... not a verb opening a request
    ("x; Paul Walker left", [0.0, 0.0, 0.1, 0.9, 0.0], ["Paul Walker"]),  # a semicolon does not end a sentence
    ("asked John, Smith said", [0.0, 0.9, 0.0, 0.0, 0.0], ["John"]),  # punctuation between: two things
    ("John\nSmith", [0.9, 0.0], ["John"]),  # a name never runs across lines
    ("ask John About it", [0.0, 0.9, 0.0, 0.0], ["John"]),  # a common word is not a surname
    ("my name is ana lima", [0.0, 0.0, 0.0, 0.9, 0.9], ["ana lima"]),  # lower-case names stay as found
    ("ask NASA John", [0.0, 0.0, 0.9], ["John"]),  # capitals alone are not title case
    ("Dear Sarah Green, hi", [0.0, 0.9, 0.1, 0.0, 0.0], ["Sarah Green"]),  # a surname may be a common word
    ("ask Sarah Monday now", [0.0, 0.9, 0.1, 0.0], ["Sarah"]),  # ... not a weekday
    ("Adolf V. Young signed", [0.9, 0.9, 0.5, 0.1, 0.0], ["Adolf V. Young"]),  # across a middle initial
    ("Emma Stone met Jack Black", [0.9, 0.4, 0.3, 0.9, 0.1], ["Emma Stone", "Jack Black"]),  # split at "met"
    ("Ludwig van Beethoven wrote", [0.9, 0.3, 0.3, 0.0], ["Ludwig van Beethoven"]),  # ... not at a particle
    ("Mrs. White called", [0.0, 0.0, 0.1, 0.0], ["White"]),  # after a personal title: a name
    ("see Dr. Monday", [0.0, 0.0, 0.0, 0.1], []),  # ... unless a non-name
]


@pytest.mark.parametrize("text, probabilities, names", TITLE_CASE, ids=[t for t, _, _ in TITLE_CASE])
def test_names_are_held_to_title_case(monkeypatch, text, probabilities, names):
    model = default_name_model()
    assert len(tokenize(text)) == len(probabilities)
    monkeypatch.setattr(model, "token_probabilities", lambda tokens: np.array(probabilities))
    assert [text[start:end] for start, end, _ in model.find(text)] == names


def test_recall_on_a_small_held_out_corpus(engine):
    """The benchmark's targets on 300 examples of held-out names and distractors (bench_pii.py: 3,000)."""
    counts = score(generate(300, seed=11, split="test"), engine.find)
    for entity in STRUCTURED:
        assert counts[entity].gold >= 10 and counts[entity].recall >= 0.95, (entity, counts[entity])
    assert counts["PERSON"].recall >= 0.85, counts["PERSON"]
    total = sum(counts.values(), Counts())
    assert total.precision >= 0.9, total


def test_the_name_model_is_kept_under_a_key_and_trained_over_when_damaged(tmp_path, monkeypatch):
    """The cached weights are the trained ones, bit for bit; damage or "off" means training."""
    monkeypatch.setenv(pii_names.CACHE_ENV, str(tmp_path))
    trained = default_name_model()  # this process's model, trained or loaded before
    default_name_model.cache_clear()
    try:
        written = default_name_model()
        file, = tmp_path.glob("pii_names-*.npz")
        default_name_model.cache_clear()
        loaded = default_name_model()
        assert loaded.vocab == written.vocab == trained.vocab
        assert np.array_equal(loaded.weights, trained.weights)
        file.write_bytes(b"not an npz file")
        default_name_model.cache_clear()
        assert np.array_equal(default_name_model().weights, trained.weights)
        assert file.stat().st_size > 100  # written again
        monkeypatch.setenv(pii_names.CACHE_ENV, "off")
        file.unlink()
        default_name_model.cache_clear()
        default_name_model()
        assert not list(tmp_path.iterdir())
    finally:
        default_name_model.cache_clear()


def test_presidio_loads_without_torch_or_transformers_and_leaves_them_importable():
    code = ("import sys\nfrom heron.govern.pii import PiiEngine\n"
            "print(PiiEngine(entities=['EMAIL']).find('a@b.org')[0].entity)\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
            "import torch, transformers\nprint(torch.tensor([1]).item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["EMAIL", "False False", "1"]
