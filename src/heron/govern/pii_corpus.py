"""A labelled synthetic corpus for PII detection, generated in code, and its scorer.

    examples = generate(500, seed=1, split="test")   # held-out names and distractors
    counts = score(examples, engine.find)             # {entity: Counts}

Templates in four registers (chat messages, clinical notes, emails, forms)
have slots: entity slots ({PERSON}, {EMAIL}, ...) are filled with generated
values and labelled with their exact character offsets; distractor slots
({TECH}, {VERSION}, {NINE}, ...) are filled with things that look like
personal data and are not: capitalised products and drugs, weekdays, version
strings, nine-digit tracking numbers, ages under 90, 16-digit references that
fail the Luhn check. Values are drawn from a seeded `random.Random`, so a
seed gives the same corpus on every machine.

`split` picks the names and distractors (`pii_lexicon`): the name recogniser
trains on `generate(..., split="train")`, which also leaves out every fourth
template (`Template.held_out`); evaluation uses `split="test"`, all templates.
So measured name recall is on names, capitalised distractors and (for a
quarter of the templates) sentence frames the recogniser never saw.

Scoring (`score`) is per entity type with overlap matching, as in the i2b2
de-identification evaluations' lenient measure: a planted span is found when
a predicted span of the same type overlaps it; a predicted span is correct
when it overlaps a planted span of the same type. Exact-boundary recall is
counted too (`Counts.exact`).
"""
from __future__ import annotations

import ipaddress
import random
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import phonenumbers

from heron.govern.pii import Span
from heron.govern.pii_lexicon import (DEPARTMENTS, DRUGS, EPONYMS, MONTHS, ORGS, STREET_SUFFIXES, TECH, WEEKDAYS, Split,
                                      common_words, distractors, first_names, last_names)
from heron.govern.pii_recognizers import iban_check_digits, luhn_check_digit, luhn_valid


@dataclass(frozen=True)
class Template:
    kind: str  # chat, clinical, email, form
    text: str
    index: int

    @property
    def held_out(self) -> bool:
        """Left out of the name recogniser's training corpus."""
        return self.index % 4 == 3


@dataclass(frozen=True)
class Example:
    text: str
    spans: tuple[Span, ...]  # planted, in text order; score 1
    template: Template


_TEMPLATES = {
    "chat": (
        "hi, this is {PERSON} - my new number is {PHONE}, call me after {TIME}.",
        "can you send the {TECH} logs to {EMAIL}? thanks",
        "{FIRST} here. my card {CARD} got declined on {WEEKDAY}, can you check?",
        "hey {FIRST}, the {TECH} build {VERSION} is failing again, see {URL}",
        "my ssn is {SSN} and my birthday is {DATE}",
        "Ping {PERSON} about ticket {TICKET}; the box at {IP} is down since {TIME}.",
        "lol {FIRST} said the {ORG} interview is on {WEEKDAY} at {TIME}",
        "Please wire {AMOUNT} to {IBAN} (account holder {PERSON}).",
        "new laptop from {ORG}, ip {IP}, reset the {TECH} password for {EMAIL}",
        "i live at {ADDRESS}, drop it off before {WEEKDAY} pls",
        "tracking number {NINE}, order total {AMOUNT}. {TECH} says it ships {WEEKDAY}",
        "upgraded {TECH} to {VERSION} and {TECH} to {VERSION}; {COUNT} tests pass in {FILE}",
        "my name is {PERSON_LC} and my email is {EMAIL}",
        "thanks {FIRST_LC}! see you {WEEKDAY}",
        "{FIRST} and {FIRST} are reviewing the {TECH} migration in {MONTH}",
        "Please call {PERSON} at {PHONE} before {TIME}.",
        "ask {FIRST} about the {TECH} outage, they were on call {WEEKDAY}",
        "Meeting with {PERSON} and {PERSON} moved to {WEEKDAY} at {TIME}.",
        "cc {PERSON} - {FIRST} will take over the {TECH} upgrade",
        "Thanks to {PERSON} for fixing the {TECH} build!",
        "{PERSON} will present the {ORG} results on {WEEKDAY}.",
        "Can {FIRST} sign off on {TICKET}? {FIRST} is out until {MONTH}.",
    ),
    "clinical": (
        "Patient {PERSON} (MRN {MRN}), a {AGE}-year-old {SEX}, was seen in {DEPT} on {DATE}.",
        "Dr. {LAST} reviewed the {DEPT} results; started {DRUG} {DOSE} daily.",
        "Pt is a {YOUNG_AGE}-year-old {SEX} with {CONDITION}, referred by Dr. {LAST}. Follow-up {DATE}.",
        "DOB: {DATE}. Age: {AGE}. Medical record number: {MRN}. Address: {ADDRESS}.",
        "{PERSON} called from {PHONE} to report side effects of {DRUG}.",
        "Discussed with daughter {PERSON}; patient aged {AGE} lives alone at {ADDRESS}.",
        "Seen by {PERSON}, MD, in {DEPT}. Next MRI scheduled for {DATE}.",
        "History of {EPONYM} disease; on {DRUG} {DOSE} since {YEAR}. Room {COUNT}.",
        "Emergency contact: {PERSON}, {PHONE}.",
        "Mrs. {LAST} reports {COUNT} episodes since {WEEKDAY}; {DRUG} continued, {DEPT} consult placed.",
        "{AGE} y/o {SEX} admitted {DATE} with {CONDITION}. MRN: {MRN}.",
        "Nurse {FIRST} noted BP 142/88 at {TIME}; {YOUNG_AGE} year old {SEX}, {DRUG} held.",
        "Spoke with {PERSON} ({RELATION}) regarding discharge planning.",
        "Attending: {PERSON}. Resident: Dr. {LAST}.",
        "{PERSON}, a {YOUNG_AGE}-year-old {SEX}, presents with {CONDITION}.",
    ),
    "email": (
        "Dear {PERSON},\n\nThank you for your order placed on {DATE}. Your receipt was sent to {EMAIL}.\n\n"
        "Best regards,\n{PERSON}",
        "Hi {FIRST},\nPlease find the invoice for account {ACCOUNT} attached. Payment of {AMOUNT} is due "
        "{WEEKDAY}.\nThanks,\n{FIRST}",
        "From: {PERSON} <{EMAIL}>\nTo: {EMAIL}\nSubject: {TECH} migration\n\nThe {TECH} cluster at {IP} will be "
        "upgraded to {VERSION} on {DATE}.",
        "Hello team,\n{PERSON} from {ORG} will join the {MONTH} review. Agenda: {URL}",
        "Your {ORG} card {CARD} was charged {AMOUNT} on {DATE}. Questions? Call {PHONE}.",
        "Please update my direct deposit: IBAN {IBAN}, account holder {PERSON}.",
        "Hi all, the {TECH} and {TECH} licences renew in {MONTH}; ticket {TICKET} tracks it. - {FIRST}",
        "Reminder: {PERSON} is out {WEEKDAY}. For urgent {ORG} issues email {EMAIL} or visit {URL}.",
        "Good morning {LAST_TITLE},\nYour bank account {ACCOUNT} will be debited {AMOUNT} on {DATE}.\nKind regards,"
        "\n{PERSON}\n{ORG}",
        "We noticed a sign-in from {IP} on {DATE}. If this wasn't you, reset your password at {URL}.",
        "Hi {FIRST} and {FIRST},\nLooping in {PERSON} from {ORG}.\nCheers,\n{FIRST}",
        "Dear {LAST_TITLE},\nYour appointment with Dr. {LAST} is confirmed for {DATE}.",
    ),
    "form": (
        "Name: {PERSON}\nDate of birth: {DATE}\nSSN: {SSN}\nPhone: {PHONE}\nEmail: {EMAIL}",
        "Full name: {LAST_COMMA_FIRST}\nAddress: {ADDRESS}\nAccount no.: {ACCOUNT}",
        "Patient name | {PERSON} | MRN | {MRN} | Age | {AGE}",
        "Cardholder: {PERSON}; Card number: {CARD}; Billing address: {ADDRESS}",
        "Login from {IP} at {TIME} by user {EMAIL}; client {TECH} {VERSION}",
        "Proxy: {IP4}:{PORT}\nUser: {EMAIL}\nSeen: {DATE}",
        "Website: {URL}\nContact: {PERSON}\nTel: {PHONE}",
        "Ref: {BADCARD}\nProduct: {TECH} {VERSION}\nAmount: {AMOUNT}\nStatus: shipped {WEEKDAY}",
        "Applicant: {PERSON}\nSocial security number: {SSN}\nEmployer: {ORG}\nStart date: {DATE}",
        "Beneficiary: {PERSON}\nIBAN: {IBAN}\nReference: {TICKET}",
        "Device: {TECH}\nIPv6: {IP6}\nOwner: {EMAIL}\nLast seen: {DATE}",
        "Ordering physician: Dr. {PERSON}\nDepartment: {DEPT}\nMedication: {DRUG} {DOSE}\nPatient age: {YOUNG_AGE}",
        "Signed: {PERSON}\nWitness: {PERSON}\nDate: {DATE}",
        "Emergency contact name: {PERSON}; relationship: {RELATION}; phone: {PHONE}",
    ),
}
TEMPLATES = tuple(Template(kind, text, i) for i, (kind, text) in
                  enumerate((k, t) for k, ts in _TEMPLATES.items() for t in ts))


# ----- values --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pools:
    """The names and distractors one split draws from."""

    first: tuple[str, ...]
    last: tuple[str, ...]
    tech: tuple[str, ...]
    orgs: tuple[str, ...]
    drugs: tuple[str, ...]
    departments: tuple[str, ...]
    eponyms: tuple[str, ...]

    @classmethod
    def of(cls, split: Split) -> Pools:
        return cls(first_names(split), last_names(split), *(distractors(words, split) for words in
                                                             (TECH, ORGS, DRUGS, DEPARTMENTS, EPONYMS)))


def _person(rng: random.Random, p: Pools) -> str:
    first, last = rng.choice(p.first), rng.choice(p.last)
    form = rng.random()
    if form < 0.15:
        return f"{first} {rng.choice(string.ascii_uppercase)}. {last}"
    if form < 0.25:
        return f"{first} {rng.choice(p.first)} {last}"
    if form < 0.30:
        return f"{first} {last}-{rng.choice(p.last)}"
    return f"{first} {last}"


def _email(rng: random.Random, p: Pools) -> str:
    from heron.govern.pii_surrogates import ascii_fold

    first, last = (ascii_fold(rng.choice(names)).lower().replace("'", "") for names in (p.first, p.last))
    company = rng.choice(sorted(common_words())) + rng.choice(("", "corp", "labs", "health", "group"))
    domain = rng.choice((f"{company}.com", f"{company}.org", f"{company}.io", f"{company}.co.uk", "gmail.com",
                         "outlook.com", "yahoo.com", "proton.me", "icloud.com", f"{company}.edu"))
    local = rng.choice((f"{first}.{last}", f"{first[0]}{last}", f"{first}{last}{rng.randrange(100)}",
                        f"{last}.{first}", f"{first}_{last}", f"{first}", f"{first}+{rng.choice(('news', 'work'))}"))
    if rng.random() < 0.1:
        domain = f"mail.{domain}"
    email = f"{local}@{domain}"
    return email.title() if rng.random() < 0.1 else email


def _valid_number(rng: random.Random, region: str) -> phonenumbers.PhoneNumber:
    kind = rng.choice((phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE))
    example = phonenumbers.example_number_for_type(region, kind)
    national = str(example.national_number)
    while True:  # randomise the subscriber digits until the number is valid again
        digits = national[:3] + "".join(str(rng.randrange(10)) for _ in national[3:])
        number = phonenumbers.parse(digits, region)
        if phonenumbers.is_valid_number(number):
            return number


def _phone(rng: random.Random, p: Pools) -> str:
    region = rng.choice(("US", "US", "US", "GB", "DE", "FR", "IN", "CA"))
    number = _valid_number(rng, region)
    if region in ("US", "CA"):
        n = str(number.national_number)
        return rng.choice((f"({n[:3]}) {n[3:6]}-{n[6:]}", f"{n[:3]}-{n[3:6]}-{n[6:]}", f"{n[:3]}.{n[3:6]}.{n[6:]}",
                           f"+1 {n[:3]} {n[3:6]} {n[6:]}", f"+1-{n[:3]}-{n[3:6]}-{n[6:]}", f"({n[:3]}){n[3:6]}-{n[6:]}",
                           f"{n[:3]} {n[3:6]} {n[6:]}", f"1-{n[:3]}-{n[3:6]}-{n[6:]}"))
    style = rng.choice((phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.NATIONAL))
    return phonenumbers.format_number(number, style)


def _ssn(rng: random.Random, p: Pools) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    group, serial = rng.randrange(1, 100), rng.randrange(1, 10000)
    sep = rng.choice(("-", "-", "-", " "))
    return f"{area:03d}{sep}{group:02d}{sep}{serial:04d}"


def _card(rng: random.Random, p: Pools) -> str:
    network = rng.choice(("visa", "mastercard", "mastercard2", "amex", "discover"))
    prefix, length = {"visa": ("4", 16), "mastercard": (str(rng.randrange(51, 56)), 16),
                      "mastercard2": (str(rng.randrange(2221, 2721)), 16), "amex": (rng.choice(("34", "37")), 15),
                      "discover": ("6011", 16)}[network]
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    digits = body + luhn_check_digit(body)
    sep = rng.choice((" ", "-", ""))
    groups = (digits[:4], digits[4:10], digits[10:]) if length == 15 else [digits[i:i + 4] for i in range(0, 16, 4)]
    return sep.join(groups)


def _bad_card(rng: random.Random, p: Pools) -> str:
    while True:
        digits = rng.choice("45") + "".join(str(rng.randrange(10)) for _ in range(15))
        if not luhn_valid(digits):
            return " ".join(digits[i:i + 4] for i in range(0, 16, 4))


# BBAN layouts (ISO 13616 registry): n digits, a upper-case letters, c either.
_BBANS = {"GB": "4a14n", "DE": "18n", "FR": "10n11c2n", "ES": "20n", "NL": "4a10n", "IT": "1a10n12c", "CH": "5n12c",
          "BE": "12n"}


def _iban(rng: random.Random, p: Pools) -> str:
    country = rng.choice(sorted(_BBANS))
    bban = ""
    for count, kind in re.findall(r"(\d+)([nac])", _BBANS[country]):
        alphabet = {"n": string.digits, "a": string.ascii_uppercase, "c": string.digits}[kind]
        bban += "".join(rng.choice(alphabet) for _ in range(int(count)))
    iban = country + iban_check_digits(country, bban) + bban
    return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.7 else iban


def _ip(rng: random.Random, p: Pools) -> str:
    return _ip6(rng, p) if rng.random() < 0.3 else _ip4(rng, p)


def _ip4(rng: random.Random, p: Pools) -> str:
    return f"{rng.choice([a for a in range(1, 224) if a != 127])}.{rng.randrange(256)}.{rng.randrange(256)}." \
           f"{rng.randrange(1, 255)}"


def _ip6(rng: random.Random, p: Pools) -> str:
    address = ipaddress.IPv6Address(rng.getrandbits(128) & ~(0xFFFFFFFF << 32) if rng.random() < 0.5 else
                                    rng.getrandbits(128))
    return address.compressed if rng.random() < 0.7 else address.exploded


def _url(rng: random.Random, p: Pools) -> str:
    words = sorted(common_words())
    host = f"{rng.choice(words)}{rng.choice(('', '-' + rng.choice(words)))}"
    path = rng.choice(("", f"/{rng.choice(words)}", f"/{rng.choice(words)}/{rng.randrange(1000)}",
                       f"/p?id={rng.randrange(10**6)}"))
    tld = rng.choice(("com", "org", "net", "io", "dev", "co.uk"))
    return rng.choice((f"https://www.{host}.{tld}{path}", f"https://{host}.{tld}{path}", f"http://{host}.{tld}{path}",
                       f"www.{host}.{tld}{path}", f"{host}.{tld}{path or '/' + rng.choice(words)}",
                       f"https://{host}.{tld}:{rng.choice((8080, 8443, 3000))}{path}", f"HTTPS://{host.upper()}.{tld}"))


def _date(rng: random.Random, p: Pools) -> str:
    y, m, d = rng.randrange(1930, 2026), rng.randrange(1, 13), rng.randrange(1, 29)
    month = MONTHS[m - 1]
    ordinal = f"{d}{'th' if 10 <= d <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d % 10, 'th')}"
    return rng.choice((f"{m:02d}/{d:02d}/{y}", f"{m}/{d}/{y}", f"{d:02d}/{m:02d}/{y}", f"{y}-{m:02d}-{d:02d}",
                       f"{month} {d}, {y}", f"{month[:3]} {d}, {y}", f"{d} {month} {y}",
                       f"{d:02d}-{month[:3].upper()}-{y}", f"{month} {d}", f"{m}/{d}/{y % 100:02d}",
                       f"{d:02d}.{m:02d}.{y}", f"{month} {ordinal}, {y}", f"{y}/{m:02d}/{d:02d}",
                       f"{month[:3]}. {d}, {y}", f"{ordinal} of {month} {y}", f"{month} {ordinal}"))


def _mrn(rng: random.Random, p: Pools) -> str:
    n = rng.randrange(7, 11)
    digits = "".join(str(rng.randrange(10)) for _ in range(n))
    return rng.choice((digits, f"MR{digits}", f"{digits[:3]}-{digits[3:5]}-{digits[5:]}"))


def _account(rng: random.Random, p: Pools) -> str:
    digits = "".join(str(rng.randrange(10)) for _ in range(rng.randrange(8, 13)))
    return digits if len(digits) < 10 or rng.random() < 0.7 else f"{digits[:4]}-{digits[4:8]}-{digits[8:]}"


_STREETS = ("Oak", "Maple", "Cedar", "Pine", "Elm", "Main", "Park", "Lake", "Hill", "Washington", "Lincoln", "Sunset",
            "River", "Church", "Mill", "Spring", "Center", "Highland", "Chestnut", "Walnut", "Willow", "Meadow")
_CITIES = ("Portland", "Austin", "Denver", "Boston", "Phoenix", "Madison", "Raleigh", "Tucson", "Omaha", "Buffalo",
           "Spokane", "Albany", "Salem", "Dayton", "Fresno", "Boise", "Eugene", "Savannah", "Tacoma", "Reno")
_STATES = ("OR", "TX", "CO", "MA", "AZ", "WI", "NC", "NE", "NY", "WA", "ID", "GA", "NV", "OH", "CA")


def _address(rng: random.Random, p: Pools) -> str:
    n = rng.randrange(1, 20000)
    street = rng.choice((rng.choice(_STREETS), rng.choice(p.last), f"{rng.randrange(2, 99)}th",
                         f"{rng.choice(_STREETS)} {rng.choice(('Ridge', 'View', 'Creek', 'Grove'))}"))
    address = f"{n} {rng.choice(('', 'N ', 'S ', 'E ', 'W '))}{street} {rng.choice(STREET_SUFFIXES)}"
    if rng.random() < 0.25:
        address += f", {rng.choice(('Apt', 'Suite', 'Unit'))} {rng.randrange(1, 500)}{rng.choice(('', 'B'))}"
    if rng.random() < 0.6:
        address += f", {rng.choice(_CITIES)}, {rng.choice(_STATES)} {rng.randrange(10000, 99999)}"
    return address


ValueFn = Callable[[random.Random, Pools], str]
ENTITY_SLOTS: dict[str, tuple[str, ValueFn]] = {
    "PERSON": ("PERSON", _person),
    "PERSON_LC": ("PERSON", lambda rng, p: f"{rng.choice(p.first)} {rng.choice(p.last)}".lower()),
    "FIRST": ("PERSON", lambda rng, p: rng.choice(p.first)),
    "FIRST_LC": ("PERSON", lambda rng, p: rng.choice(p.first).lower()),
    "LAST": ("PERSON", lambda rng, p: rng.choice(p.last)),
    "LAST_COMMA_FIRST": ("PERSON", lambda rng, p: f"{rng.choice(p.last)}, {rng.choice(p.first)}"),
    "EMAIL": ("EMAIL", _email), "PHONE": ("PHONE", _phone), "SSN": ("SSN", _ssn), "CARD": ("CREDIT_CARD", _card),
    "IBAN": ("IBAN", _iban), "IP": ("IP_ADDRESS", _ip), "IP4": ("IP_ADDRESS", _ip4), "IP6": ("IP_ADDRESS", _ip6),
    "URL": ("URL", _url),
    "DATE": ("DATE", _date), "AGE": ("AGE", lambda rng, p: str(rng.randrange(90, 106))), "MRN": ("MRN", _mrn),
    "ACCOUNT": ("ACCOUNT", _account), "ADDRESS": ("ADDRESS", _address),
}
# Slots whose text is part of a labelled span but framed by fixed words, e.g. "Mr. {LAST}".
PREFIXED_SLOTS: dict[str, tuple[Callable[[random.Random], str], str]] = {
    "LAST_TITLE": (lambda rng: rng.choice(("Mr. ", "Ms. ", "Mrs. ", "Dr. ", "Mx. ")), "LAST"),
}
DISTRACTOR_SLOTS: dict[str, ValueFn] = {
    "TECH": lambda rng, p: rng.choice(p.tech), "ORG": lambda rng, p: rng.choice(p.orgs),
    "DRUG": lambda rng, p: rng.choice(p.drugs), "DEPT": lambda rng, p: rng.choice(p.departments),
    "EPONYM": lambda rng, p: rng.choice(p.eponyms),
    "WEEKDAY": lambda rng, p: rng.choice(WEEKDAYS), "MONTH": lambda rng, p: rng.choice(MONTHS),
    "VERSION": lambda rng, p: rng.choice((f"{rng.randrange(1, 12)}.{rng.randrange(30)}.{rng.randrange(20)}",
                                          f"v{rng.randrange(1, 6)}.{rng.randrange(20)}",
                                          f"{rng.randrange(1, 4)}.{rng.randrange(12)}.{rng.randrange(9)}-rc"
                                          f"{rng.randrange(1, 4)}")),
    "TICKET": lambda rng, p: rng.choice((f"#{rng.randrange(1000, 999999)}",
                                         f"{rng.choice(('OPS', 'HR', 'ENG', 'IT'))}-{rng.randrange(10, 9999)}")),
    "AMOUNT": lambda rng, p: rng.choice((f"${rng.randrange(5, 20000):,}.{rng.randrange(100):02d}",
                                         f"€{rng.randrange(5, 5000)}", f"{rng.randrange(5, 900)} USD")),
    "TIME": lambda rng, p: rng.choice((f"{rng.randrange(1, 13)}:{rng.randrange(60):02d}",
                                       f"{rng.randrange(1, 13)}pm", f"{rng.randrange(7, 12)}:30 am")),
    "YOUNG_AGE": lambda rng, p: str(rng.randrange(18, 90)),
    "COUNT": lambda rng, p: str(rng.randrange(2, 500)),
    "PORT": lambda rng, p: str(rng.choice((22, 80, 443, 3128, 8080))),
    "YEAR": lambda rng, p: str(rng.randrange(1990, 2026)),
    "DOSE": lambda rng, p: f"{rng.choice((5, 10, 20, 25, 50, 100, 250, 500))} mg",
    "NINE": lambda rng, p: "".join(str(rng.randrange(10)) for _ in range(9)),
    "BADCARD": _bad_card,
    "FILE": lambda rng, p: rng.choice(("main.py", "train.py", "notes.md", "config.yaml", "setup.sh", "app.js")),
    "SEX": lambda rng, p: rng.choice(("man", "woman", "male", "female")),
    "RELATION": lambda rng, p: rng.choice(("son", "daughter", "spouse", "mother", "father", "sister", "friend")),
    "CONDITION": lambda rng, p: rng.choice(("type 2 diabetes", "hypertension", "COPD", "atrial fibrillation",
                                            "asthma", "chronic kidney disease")),
}


def fill(template: Template, rng: random.Random, pools: Pools) -> Example:
    """One example: the template's slots filled, entity slots labelled with exact offsets."""
    parts: list[str] = []
    spans: list[Span] = []
    length = 0
    for literal, slot, _, _ in string.Formatter().parse(template.text):
        parts.append(literal)
        length += len(literal)
        if slot is None:
            continue
        if slot in PREFIXED_SLOTS:
            prefix, slot = PREFIXED_SLOTS[slot][0](rng), PREFIXED_SLOTS[slot][1]
            parts.append(prefix)
            length += len(prefix)
        if slot in ENTITY_SLOTS:
            entity, make = ENTITY_SLOTS[slot]
            value = make(rng, pools)
            spans.append(Span(entity, length, length + len(value), 1.0, value))
        else:
            value = DISTRACTOR_SLOTS[slot](rng, pools)
        parts.append(value)
        length += len(value)
    return Example("".join(parts), tuple(spans), template)


def generate(n: int, seed: int, split: Split = "test", templates: Iterable[Template] | None = None,
             pools: Pools | None = None) -> list[Example]:
    """`n` examples, templates in turn (shuffled per seed); `split` picks names and distractors
    (unless `pools` gives them). With split="train" the held-out templates are left out unless
    `templates` says otherwise."""
    rng = random.Random(seed)
    pools = Pools.of(split) if pools is None else pools
    chosen = list(templates) if templates is not None else [t for t in TEMPLATES
                                                            if split != "train" or not t.held_out]
    order = rng.sample(chosen, len(chosen))
    return [fill(order[i % len(order)], rng, pools) for i in range(n)]


# ----- scoring -------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """One entity type's tallies over a corpus."""

    gold: int = 0  # planted spans
    found: int = 0  # planted spans overlapped by a prediction of the same type
    exact: int = 0  # planted spans predicted with exactly their boundaries
    predicted: int = 0
    correct: int = 0  # predictions overlapping a planted span of the same type

    @property
    def recall(self) -> float:
        return self.found / self.gold if self.gold else 1.0

    @property
    def exact_recall(self) -> float:
        return self.exact / self.gold if self.gold else 1.0

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 1.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int, ...]:
        return self.gold, self.found, self.exact, self.predicted, self.correct


def f_beta(precision: float, recall: float, beta: float = 2.0) -> float:
    """F-beta (van Rijsbergen): beta = 2 weighs recall four times as much as precision."""
    b2 = beta * beta
    return (1 + b2) * precision * recall / (b2 * precision + recall) if precision + recall else 0.0


def _overlaps(a: Span, b: Span) -> bool:
    return a.entity == b.entity and a.start < b.end and b.start < a.end


def score_one(gold: Iterable[Span], predicted: Iterable[Span]) -> dict[str, Counts]:
    gold, predicted = list(gold), list(predicted)
    counts: dict[str, Counts] = {}
    for g in gold:
        found = any(_overlaps(g, p) for p in predicted)
        exact = any(p.entity == g.entity and (p.start, p.end) == (g.start, g.end) for p in predicted)
        counts[g.entity] = counts.get(g.entity, Counts()) + Counts(1, int(found), int(exact))
    for p in predicted:
        counts[p.entity] = counts.get(p.entity, Counts()) + Counts(predicted=1,
                                                                   correct=int(any(_overlaps(p, g) for g in gold)))
    return counts


def score(examples: Iterable[Example], find: Callable[[str], list[Span]]) -> dict[str, Counts]:
    """Per-type counts of `find` over the examples (overlap matching; see the module's docstring)."""
    total: dict[str, Counts] = {}
    for example in examples:
        for entity, c in score_one(example.spans, find(example.text)).items():
            total[entity] = total.get(entity, Counts()) + c
    return dict(sorted(total.items()))


def overall(counts: dict[str, Counts]) -> Counts:
    return sum(counts.values(), Counts())
