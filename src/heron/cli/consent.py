"""`heron consent grant|withdraw|check|history`: the consent registry from the command line.

    heron consent grant alice training --db runs/consent.db --source web-form --notice "privacy v3"
    heron consent check alice training --db runs/consent.db       # exit 0: in force; 1: not
    heron consent withdraw alice training --db runs/consent.db --source "support ticket 4711"
    heron consent history alice --db runs/consent.db              # her records as JSON (GDPR Arts. 15, 20)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from heron.cli.options import add_overwrite, lasting_database, new_output
from heron.store.atomic import write_text_atomic
from heron.govern.consent import PURPOSES, ConsentRegistry

DB_HELP = "SQLite file or database URL (sqlite:///..., postgresql://...)"
USER_HELP = "the user's id: the person whose consent it is"


def register(verbs: argparse._SubParsersAction) -> None:
    """Add `heron consent` to the CLI's verbs."""
    consent = verbs.add_parser("consent", help="per-user, per-purpose consent: grant, withdraw, check, history"
                               ).add_subparsers(dest="action", required=True)
    purpose_help = f"an open vocabulary of lower-case keys; well-known: {', '.join(PURPOSES)}"
    p = consent.add_parser("grant", help="record that a user gave consent for a purpose")
    _user_purpose(p, purpose_help)
    p.add_argument("--source", default="cli", help="how the consent was collected (default: %(default)s)")
    p.add_argument("--notice", default=None, help="the version of the notice the user was shown")
    p.add_argument("--expires", default=None, metavar="TIME", help="when it lapses, ISO 8601 with an offset")
    p.add_argument("--controller", default=None, help="who the consent is given to")
    p.add_argument("--pii-category", dest="pii_categories", action="append", default=[],
                   help="a kind of personal data it covers (repeatable)")
    p.add_argument("--at", default=None, metavar="TIME", help="when it was given, if not now (ISO 8601, offset)")
    p.set_defaults(handler=grant)
    p = consent.add_parser("withdraw", help="record that a user withdrew consent for a purpose")
    _user_purpose(p, purpose_help)
    p.add_argument("--source", default="cli", help="how the withdrawal was received (default: %(default)s)")
    p.add_argument("--at", default=None, metavar="TIME", help="when it was withdrawn, if not now")
    p.set_defaults(handler=withdraw)
    p = consent.add_parser("check", help="whether a user's consent for a purpose is in force (exit 0) or not (1)")
    _user_purpose(p, purpose_help)
    p.add_argument("--at", default=None, metavar="TIME", help="the moment to check (default: now)")
    p.set_defaults(handler=check)
    p = consent.add_parser("history", help="a user's consent records and their events, as JSON")
    p.add_argument("user", help=USER_HELP)
    p.add_argument("purpose", nargs="?", default=None, help="only this purpose")
    p.add_argument("--db", type=lasting_database, required=True, help=DB_HELP)
    p.add_argument("--out", default=None, help="write the JSON to this file instead of printing it")
    add_overwrite(p)
    p.set_defaults(handler=history)


def _user_purpose(p: argparse.ArgumentParser, purpose_help: str) -> None:
    p.add_argument("user", help=USER_HELP)
    p.add_argument("purpose", help=purpose_help)
    p.add_argument("--db", type=lasting_database, required=True, help=DB_HELP)


def grant(args: argparse.Namespace) -> int:
    with ConsentRegistry.open(args.db, controller=args.controller) as registry:
        event = registry.grant(args.user, args.purpose, source=args.source, notice=args.notice,
                               expires_at=args.expires, at=args.at, pii_categories=args.pii_categories)
    print(f"granted: {event.user_id} / {event.purpose} at {event.at.isoformat()} (record {event.record_id})")
    return 0


def withdraw(args: argparse.Namespace) -> int:
    with ConsentRegistry.open(args.db, create=False) as registry:
        event = registry.withdraw(args.user, args.purpose, source=args.source, at=args.at)
    print(f"withdrawn: {event.user_id} / {event.purpose} at {event.at.isoformat()} (record {event.record_id})")
    return 0


def check(args: argparse.Namespace) -> int:
    with ConsentRegistry.open(args.db, create=False) as registry:
        status = registry.status(args.user, args.purpose, at=args.at)
    print(f"{'yes' if status.in_force else 'no'}: {args.user} / {args.purpose}: {status.why()}")
    return 0 if status.in_force else 1


def history(args: argparse.Namespace) -> int:
    target = None if args.out is None else new_output(Path(args.out), args.db, "consent registry", args.overwrite)
    with ConsentRegistry.open(args.db, create=False) as registry:
        text = json.dumps(registry.export(args.user, purpose=args.purpose), indent=2, ensure_ascii=False) + "\n"
    if target is None:
        print(text, end="")
    else:
        print(f"wrote {write_text_atomic(target, text)}")
    return 0
