"""Consistent pseudonyms: the same value, scope and secret always give the same surrogate.

A surrogate is drawn from a random stream seeded by
HMAC-SHA256(secret, scope ␟ entity ␟ normalised value) (RFC 2104), so within
one scope a person is always the same fake person, another scope or secret
gives another one, and without the secret nobody can recompute the mapping
(HMAC is a pseudo-random function: the output says nothing of the input
unless the key is known). Values are normalised before hashing (case and
spacing for text, digits only for numbers), so "(415) 555-0132" and
"415-555-0132" get the same surrogate digits, each keeping its own layout.

Surrogates keep the type and layout but point nowhere real where a reserved
range exists: emails and web sites at example.com/.org/.net (RFC 2606),
IPv6 in 2001:db8::/32 (RFC 3849), IPv4 in the private 10.0.0.0/8 (RFC 1918),
SSNs in area 9xx (never issued as SSNs). Cards keep their network's first
digit and pass the Luhn check; IBANs keep their country and pass mod 97.
Dates get a different day, month and year in the same written form (a
timestamp's time of day another time); every day-or-month number becomes 1-12,
so numeric dates stay valid in either order.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
import re
import unicodedata
from collections.abc import Callable

from heron.govern.pii_lexicon import MONTHS, STREET_SUFFIXES, first_names, last_names
from heron.govern.pii_recognizers import iban_check_digits, luhn_check_digit

# The most common US place names: a surrogate address names no particular town.
TOWNS = ("Springfield", "Franklin", "Greenville", "Clinton", "Fairview", "Salem", "Madison", "Georgetown", "Arlington",
         "Marion", "Oxford", "Riverside", "Ashland", "Jackson", "Milton", "Newport", "Auburn", "Dayton", "Lexington")
STATES = ("AL", "AK", "AZ", "AR", "CA", "CO", "CT", "DE", "FL", "GA", "HI", "ID", "IL", "IN", "IA", "KS", "KY", "LA",
          "ME", "MD", "MA", "MI", "MN", "MS", "MO", "MT", "NE", "NV", "NH", "NJ", "NM", "NY", "NC", "ND", "OH", "OK",
          "OR", "PA", "RI", "SC", "SD", "TN", "TX", "UT", "VT", "VA", "WA", "WV", "WI", "WY")
NUMERIC = frozenset({"PHONE", "SSN", "CREDIT_CARD", "ACCOUNT", "MRN", "IBAN", "AGE"})


def normalise(entity: str, value: str) -> str:
    """What counts as the same value: digits and letters of numbers, casefolded words of text."""
    if entity in NUMERIC:
        return re.sub(r"[^0-9A-Za-z]", "", value).upper()
    return " ".join(value.casefold().split())


def keyed_stream(secret: bytes, scope: str, entity: str, value: str) -> random.Random:
    """A random stream seeded by HMAC-SHA256(secret, scope ␟ entity ␟ normalised value)."""
    message = "\x1f".join((scope, entity, normalise(entity, value))).encode()
    return random.Random(int.from_bytes(hmac.new(secret, message, hashlib.sha256).digest(), "big"))


def ascii_fold(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def _same_shape(value: str, rng: random.Random) -> str:
    """Each digit to a random digit, each letter to a random letter of the same case; separators kept."""
    def swap(c: str) -> str:
        if c.isdigit():
            return str(rng.randrange(10))
        if c.isalpha():
            letter = chr(ord("A") + rng.randrange(26))
            return letter if c.isupper() else letter.lower()
        return c
    return "".join(map(swap, value))


def _person(value: str, rng: random.Random) -> str:
    first, last = rng.choice(first_names()), rng.choice(last_names())
    words = value.replace(",", " ").split()
    if "," in value:
        fake = f"{last}, {first}"
    elif len(words) == 1:
        fake = first if value in first_names() else last
    elif len(words) == 2:
        fake = f"{first} {last}"
    else:
        fake = f"{first} {chr(ord('A') + rng.randrange(26))}. {last}"
    return fake.lower() if value.islower() else fake


def _email(value: str, rng: random.Random) -> str:
    first, last = (ascii_fold(rng.choice(names)).lower() for names in (first_names(), last_names()))
    return f"{first}.{last}{rng.randrange(100)}@example.{rng.choice(('com', 'org', 'net'))}"


def _phone(value: str, rng: random.Random) -> str:
    head = re.match(r"\+\d+", value)  # keep the country code
    body = value[head.end():] if head else value
    fake = _same_shape(body, rng)
    first = next((i for i, c in enumerate(fake) if c.isdigit()), None)
    if first is not None and not head:  # a national number starting 0 or 1 reads as a prefix; avoid it
        fake = fake[:first] + str(rng.randrange(2, 10)) + fake[first + 1:]
    return (head.group() if head else "") + fake


def _ssn(value: str, rng: random.Random) -> str:
    fake = _same_shape(value, rng)
    return "9" + fake[1:]  # area 9xx: never issued


def _card(value: str, rng: random.Random) -> str:
    digits = [i for i, c in enumerate(value) if c.isdigit()]
    fake = list(value[0] + _same_shape(value[1:], rng))
    body = "".join(fake[i] for i in digits[:-1])
    fake[digits[-1]] = luhn_check_digit(body)
    return "".join(fake)


def _iban(value: str, rng: random.Random) -> str:
    compact = re.sub(r"\s", "", value).upper()
    bban = _same_shape(compact[4:], rng)
    new = compact[:2] + iban_check_digits(compact[:2], bban) + bban
    if " " not in value:
        return new
    return " ".join(new[i:i + 4] for i in range(0, len(new), 4))


def _ip(value: str, rng: random.Random) -> str:
    if ":" in value:
        return str(ipaddress.IPv6Address((0x20010DB8 << 96) | rng.getrandbits(96)))
    return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _url(value: str, rng: random.Random) -> str:
    scheme = re.match(r"(?i)[a-z]+://", value)
    host = f"site-{rng.getrandbits(24):06x}.example.{rng.choice(('com', 'org', 'net'))}"
    path = f"/{rng.getrandbits(32):08x}" if re.search(r"\w/\S", value) else ""
    return (scheme.group() if scheme else "www." if value.lower().startswith("www.") else "") + host + path


ISO_TIME = re.compile(r"(?<=\d)([T ])(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-][\d:]+)?$")  # after an ISO date


def _date(value: str, rng: random.Random) -> str:
    time = ISO_TIME.search(value)
    if time:  # a timestamp: another date, and another time of day in the same form (the zone kept)
        sep, _, _, seconds, fraction, zone = time.groups()
        fake = f"{_date(value[:time.start()], rng)}{sep}{rng.randrange(24):02d}:{rng.randrange(60):02d}"
        if seconds is not None:
            fake += f":{rng.randrange(60):02d}"
        if fraction is not None:
            fake += "." + "".join(str(rng.randrange(10)) for _ in fraction[1:])
        return fake + (zone or "")
    has_name = bool(re.search(r"[A-Za-z]{3}", value))
    short_year = not has_name and not re.search(r"\d{4}", value)  # 3/14/24: the last number is a year
    month = rng.randrange(12)

    def swap(m: re.Match) -> str:
        token = m.group()
        if token.isalpha():
            if token.lower() in ("the", "of", "st", "nd", "rd", "th"):
                return token
            name = MONTHS[month]
            name = name if token.capitalize() in MONTHS else name[:3]  # full name or abbreviation
            return name.upper() if token.isupper() else name
        digits = re.match(r"\d+", token).group()
        if len(digits) == 4:
            return str(rng.randrange(1930, 2021))
        if short_year and m.end() == len(value):
            return f"{rng.randrange(100):02d}"  # a two-digit year
        n = rng.randrange(1, 29 if has_name else 13)
        text = f"{n:0{len(digits)}d}"
        if token[len(digits):]:  # ordinal
            text += "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
        return text

    return re.sub(r"\d+(?:st|nd|rd|th)?|[A-Za-z]+", swap, value)


def _address(value: str, rng: random.Random) -> str:
    fake = f"{rng.randrange(1, 9999)} {rng.choice(last_names())} {rng.choice(STREET_SUFFIXES)}"
    if re.search(r"\b(?:Apt|Apartment|Suite|Ste|Unit|#)", value):
        fake += f", Apt {rng.randrange(1, 40)}"
    if re.search(r"\b[A-Z]{2}\s+\d{5}", value):
        fake += f", {rng.choice(TOWNS)}, {rng.choice(STATES)} {rng.randrange(10000, 99999)}"
    return fake


SURROGATES: dict[str, Callable[[str, random.Random], str]] = {
    "PERSON": _person, "EMAIL": _email, "PHONE": _phone, "SSN": _ssn, "CREDIT_CARD": _card, "IBAN": _iban,
    "IP_ADDRESS": _ip, "URL": _url, "DATE": _date, "ADDRESS": _address,
    "AGE": lambda value, rng: str(rng.choice([a for a in range(90, 110) if str(a) != value.strip()])),
    "MRN": _same_shape, "ACCOUNT": _same_shape,
}


def surrogate(entity: str, value: str, scope: str, secret: bytes) -> str:
    """The pseudonym of `value` (an `entity`) in `scope` under `secret`."""
    return SURROGATES[entity](value, keyed_stream(secret, scope, entity, value))
