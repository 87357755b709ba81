"""Word lists for PII detection: personal names, common words, and capitalised non-names.

Names come from Faker's person providers (offline lists shipped in the wheel),
pooled over Latin-script locales so the names are not only Anglo ones. Each
name string falls in the `train` (60%), `dev` (10%) or `test` (30%) split by a
hash of the string, so the split does not depend on list order or on the
Faker version's other names, and a name is in one split whether it is used as
a first name or a surname. The name recogniser (`pii_names`) learns from
`train` names only, its settings were chosen on `dev` names, and its recall is
measured on `test` names, which neither step saw.

Left out of both splits: names that are also common English words (Faker's
lorem word list: Green, Young, Hope, May...) and words Heron uses as
capitalised non-names (weekdays, months, street suffixes, products), so that
no label in the synthetic corpus contradicts a word's ordinary use.

The capitalised non-names ("distractors") are split the same way: the corpus
the recogniser trains on draws `train` distractors and the evaluation draws
`test` ones, so a low false-positive rate is not memorisation either.
"""
from __future__ import annotations

import hashlib
import importlib
import re
from functools import lru_cache
from typing import Literal

Split = Literal["train", "dev", "test", "all"]
TEST_SHARE = 0.3  # of names and distractors held out for measuring the name recogniser
DEV_SHARE = 0.1  # held out for choosing its settings

# Latin-script locales of Faker's person provider (others write names in scripts the
# corpus's templates would not mix with English).
NAME_LOCALES = ("en_US", "en_GB", "en_IE", "en_IN", "en_NZ", "es_ES", "de_DE", "fr_FR", "it_IT", "nl_NL",
                "sv_SE", "tr_TR", "yo_NG", "sw", "tw_GH", "id_ID", "pt_BR", "pl_PL")

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
MONTH_ABBREVIATIONS = tuple(m[:3] for m in MONTHS) + ("Sept",)
# USPS street suffixes (Publication 28, appendix C1), the common ones, full and abbreviated.
STREET_SUFFIXES = ("Street", "St", "Avenue", "Ave", "Road", "Rd", "Boulevard", "Blvd", "Lane", "Ln", "Drive", "Dr",
                   "Court", "Ct", "Place", "Pl", "Way", "Terrace", "Ter", "Circle", "Cir", "Parkway", "Pkwy",
                   "Highway", "Hwy", "Square", "Sq", "Trail", "Trl")

# Capitalised words that are not people: what a naive "capitalised word = name" rule flags.
TECH = ("Python", "JavaScript", "TypeScript", "Rust", "Kotlin", "Kubernetes", "Docker", "Linux", "Ubuntu", "Debian",
        "Windows", "Excel", "PowerPoint", "Slack", "Zoom", "GitHub", "GitLab", "Jira", "Confluence", "Postgres",
        "MySQL", "SQLite", "Redis", "Kafka", "Spark", "Hadoop", "Tableau", "Salesforce", "Photoshop", "Chrome",
        "Firefox", "Safari", "Android", "iPhone", "iPad", "MacBook", "ThinkPad", "Jenkins", "Terraform", "Ansible",
        "Grafana", "Prometheus", "Nginx", "Django", "Flask", "React", "Angular", "NumPy", "Pandas", "PyTorch",
        "TensorFlow", "Jupyter", "Heron", "Outlook", "Gmail", "Teams", "Dropbox", "Notion", "Figma", "Trello",
        "Bitbucket", "Azure", "Lambda", "Vercel", "Heroku", "Postman", "Airflow", "Snowflake", "Databricks")
ORGS = ("Acme", "Google", "Microsoft", "Amazon", "Apple", "Oracle", "IBM", "Intel", "Nvidia", "Tesla", "Boeing",
        "Pfizer", "Moderna", "Walgreens", "CVS", "Medicare", "Medicaid", "Aetna", "Cigna", "Kaiser", "UnitedHealth",
        "Costco", "Walmart", "Target", "FedEx", "UPS", "Verizon", "Comcast", "Netflix", "Spotify", "Uber", "Lyft",
        "Airbnb", "Stripe", "PayPal", "Deloitte", "Accenture", "Siemens", "Philips", "Unilever")
DRUGS = ("Tylenol", "Advil", "Lipitor", "Metformin", "Lisinopril", "Amoxicillin", "Ibuprofen", "Zoloft", "Xanax",
         "Prozac", "Ventolin", "Humira", "Eliquis", "Warfarin", "Insulin", "Aspirin", "Prednisone", "Synthroid",
         "Norvasc", "Plavix", "Keytruda", "Ozempic", "Atorvastatin", "Omeprazole", "Gabapentin", "Losartan")
DEPARTMENTS = ("Cardiology", "Radiology", "Oncology", "Neurology", "Pediatrics", "Orthopedics", "Dermatology",
               "Urology", "Nephrology", "Psychiatry", "Endocrinology", "Gastroenterology", "Rheumatology",
               "Hematology", "Pulmonology", "Ophthalmology")
# Verbs that open a request ("Contact Mary Jones about it"), written with a capital there beside a
# name that is not part of it. Verbs that are also names (Bill, Mark, Grant, Page, Will) are left out.
IMPERATIVES = ("Contact", "Email", "Phone", "Telephone", "Text", "Message", "Fax", "Notify", "Inform", "Remind",
               "Invite", "Thank", "Congratulate", "Welcome", "Introduce", "Update", "Brief", "Alert", "Warn",
               "Forward", "Refer", "Escalate", "Schedule", "Reschedule", "Assign", "Nominate", "Reimburse", "Pay",
               "Greet", "Tag", "Loop", "Consult", "Interview", "Reassure", "Discharge", "Admit", "Transfer",
               "Approve", "Send", "Bring", "Ask", "Tell", "Call", "Meet", "Visit", "See", "Help", "Find", "Give",
               "Show")
# Other words that open sentences, written with a capital there, that a name may follow ("Yesterday
# Paul called"); common words and function words need no listing (pii_names takes neither into a name).
OPENERS = ("Yesterday", "Tomorrow", "Tonight", "Earlier", "Later", "Meanwhile", "However", "Hopefully",
           "Unfortunately", "Fortunately", "Apparently", "Finally", "Otherwise", "Afterwards", "Sadly", "Luckily",
           "Instead", "Regards", "Cheers", "Thanks", "Hi", "Hello", "Hey", "Dear", "Greetings", "Sorry", "Ping", "Cc",
           "Patient", "Pt", "Nurse", "Doctor", "Resident", "Attending", "Surgeon", "Mom", "Dad", "Mum", "Grandma",
           "Grandpa", "Uncle", "Aunt", "Auntie", "Reminder", "Note", "Urgent")
# Diseases named after people: the eponym is not personal data of a patient.
EPONYMS = ("Parkinson's", "Alzheimer's", "Crohn's", "Hodgkin's", "Graves'", "Addison's", "Cushing's", "Huntington's",
           "Raynaud's", "Tourette's", "Bell's", "Hashimoto's", "Sjogren's", "Meniere's")

# Personal titles before a surname ("Dr. Green", "Mrs White"): what follows is a name even when
# it is also a common word.
HONORIFICS = ("Mr", "Mrs", "Ms", "Mx", "Miss", "Dr", "Prof")
# Lower-case words inside written names ("Ludwig van Beethoven", "Maria de la Cruz").
NAME_PARTICLES = ("van", "von", "der", "den", "de", "del", "della", "di", "da", "das", "dos", "du", "la", "le",
                  "ter", "ten", "bin", "ibn", "al", "el", "y")
# English closed-class words (determiners, pronouns, prepositions, conjunctions, auxiliaries): a
# capitalised one beside a name is a slip of case, never a surname, unlike common content words
# that are also surnames (Green, White, Young, Rich).
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no all both either neither
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs who whom whose
which what about above across after against along among around at before behind below beneath beside between
beyond by despite down during except for from in inside into like near of off on onto out outside over past
since through throughout till to toward towards under until up upon via with within without
and or but nor so yet if then than because although though while whereas unless whether
am is are was were be been being do does did done have has had having can could may might must shall should
will would not too very also just only here there when where why how
""".split())

_NAME_SHAPE = re.compile(r"[^\W\d_]+(?:[-'’][^\W\d_]+)?")


def split_of(word: str) -> str:
    """The split a word falls in, by a hash of it (stable across list orders and Faker versions)."""
    byte = hashlib.sha256(word.encode()).digest()[0]
    return "test" if byte < round(256 * TEST_SHARE) else "dev" if byte < round(256 * (TEST_SHARE + DEV_SHARE)) \
        else "train"


def _split(words: tuple[str, ...], split: Split) -> tuple[str, ...]:
    return words if split == "all" else tuple(w for w in words if split_of(w) == split)


@lru_cache(maxsize=1)
def common_words() -> frozenset[str]:
    """Common English words, lowercased: Faker's lorem list (about 1,000 words)."""
    from faker.providers.lorem.en_US import Provider

    return frozenset(w.lower() for w in Provider.word_list)


@lru_cache(maxsize=1)
def non_names() -> frozenset[str]:
    """Lowercased capitalised words Heron uses as non-names: weekdays, months, street suffixes,
    products, organisations, drugs, departments, eponyms, words that open sentences or requests."""
    words = (*WEEKDAYS, *MONTHS, *MONTH_ABBREVIATIONS, *STREET_SUFFIXES, *TECH, *ORGS, *DRUGS, *DEPARTMENTS,
             *OPENERS, *IMPERATIVES)
    return frozenset(w.lower() for w in words) | {e.split("'")[0].lower() for e in EPONYMS}


@lru_cache(maxsize=1)
def reserved_words() -> frozenset[str]:
    """Lowercased words never drawn as names: the non-names and every common word."""
    return non_names() | common_words()


@lru_cache(maxsize=1)
def _all_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    first: set[str] = set()
    last: set[str] = set()
    for locale in NAME_LOCALES:
        provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        for attr in ("first_names", "first_names_male", "first_names_female"):
            first.update(getattr(provider, attr, ()) or ())
        last.update(getattr(provider, "last_names", ()) or ())
    reserved = reserved_words()

    def keep(name: str) -> bool:
        return (bool(_NAME_SHAPE.fullmatch(name)) and len(name) > 1 and name[0].isupper() and not name.isupper()
                and name.lower() not in reserved)

    return tuple(sorted(filter(keep, first))), tuple(sorted(filter(keep, last)))


@lru_cache(maxsize=1)
def word_surnames() -> tuple[str, ...]:
    """Surnames that are also common English words (Green, White, Young, ...), which the name
    lists leave out; a hard case measured apart (benchmarks/bench_pii.py). Non-names (Street,
    May) are left out here too: Heron reads those as what they usually are."""
    last: set[str] = set()
    for locale in NAME_LOCALES:
        last.update(getattr(importlib.import_module(f"faker.providers.person.{locale}").Provider, "last_names", ()))
    return tuple(sorted(n for n in last if n.lower() in common_words() and n.lower() not in non_names()))


def first_names(split: Split = "all") -> tuple[str, ...]:
    return _split(_all_names()[0], split)


def last_names(split: Split = "all") -> tuple[str, ...]:
    return _split(_all_names()[1], split)


def distractors(words: tuple[str, ...], split: Split = "all") -> tuple[str, ...]:
    """A distractor list's share for a split; a list too small to split is shared whole."""
    part = _split(words, split)
    return part if part else words
