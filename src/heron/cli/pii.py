"""`heron pii find|redact TEXT`: personal data in a text, found or replaced (heron.govern.pii).

    heron pii find notes.txt                          # one JSON object per span
    heron pii redact "Call Ana Lima at 415-555-0132"  # Call <PERSON> at <PHONE>
    heron pii redact notes.txt --operator mask
    heron pii redact feedback.jsonl --fields prompt,chosen,rejected > shared.jsonl   # still valid JSONL
    HERON_PII_SECRET=... heron pii redact - --operator pseudonym --scope study-7 < notes.txt

The pseudonym secret is read from an environment variable, never from the
command line, where other users' `ps` and the shell's history would see it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from heron.cli.options import could_be_a_path, text_or_file
from heron.govern.pii import ENTITIES, PiiEngine

SECRET_ENV = "HERON_PII_SECRET"


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the `pii` verb to the CLI's verbs."""
    actions = verbs.add_parser("pii", help="find or redact personal data (names, emails, ids, ...) in text")
    actions = actions.add_subparsers(dest="action", required=True)
    p = actions.add_parser("find", help="print each piece of personal data as a JSON line")
    _add_common(p)
    p.set_defaults(handler=find)
    p = actions.add_parser("redact", help="print the text with personal data replaced")
    _add_common(p)
    p.add_argument("--operator", choices=["tag", "redact", "mask", "pseudonym"], default="tag",
                   help="tag: <EMAIL>; redact: remove; mask: ****-1111; pseudonym: a consistent fake of the same type "
                        "(default %(default)s)")
    p.add_argument("--scope", default=None,
                   help="pseudonym: values map to the same fake within one scope (default: the empty scope)")
    p.add_argument("--secret-env", default=None, metavar="VAR",
                   help=f"pseudonym: environment variable holding the secret key (default {SECRET_ENV})")
    p.add_argument("--format", choices=["auto", "text", "json", "jsonl"], default="auto",
                   help="json, jsonl: redact the strings inside, keys and structure kept, so the output is "
                        "still valid JSON; auto: by the file's suffix (.json, .jsonl), else text "
                        "(default %(default)s)")
    p.add_argument("--fields", default=None, metavar="K1,K2",
                   help="json, jsonl: redact only the strings under these keys, at any depth (default: every "
                        "string)")
    p.set_defaults(handler=redact)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the text, a file holding it, or - for standard input")
    p.add_argument("--entities", default=None, metavar="E1,E2",
                   help=f"types to look for (default all: {','.join(ENTITIES)}); AGE is an age over 89 "
                        "beside an age word, as HIPAA's Safe Harbor counts ages")


def _engine(args: argparse.Namespace) -> PiiEngine:
    return PiiEngine(entities=args.entities.split(",") if args.entities else None)


def find(args: argparse.Namespace) -> int:
    for span in _engine(args).find(text_or_file(args.text)):
        print(json.dumps(asdict(span), ensure_ascii=False))
    return 0


def redact(args: argparse.Namespace) -> int:
    secret, scope = None, "" if args.scope is None else args.scope
    if args.operator == "pseudonym":
        variable = SECRET_ENV if args.secret_env is None else args.secret_env
        secret = os.environ.get(variable)
        if not secret:
            raise ValueError(f"--operator pseudonym: set the secret key in ${variable}")
    for flag in ("scope", "secret_env"):
        if args.operator != "pseudonym" and getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')}: applies to --operator pseudonym only, "
                             f"not {args.operator}")
    text, fmt = text_or_file(args.text), _format(args)
    fields = _fields(args.fields)
    if fields is not None and fmt == "text":
        raise ValueError("--fields: names keys of JSON records; give --format json or jsonl (or a .json or "
                         ".jsonl file)")
    engine = _engine(args)
    if fmt == "text":
        redacted = engine.redact(text, args.operator, scope=scope, secret=secret)
        print(redacted, end="" if redacted.endswith("\n") else "\n")  # a file's own last newline, not a second
        return 0

    def redact_value(value: Any, where: str) -> str:
        try:
            return json.dumps(engine.redact_json(value, args.operator, fields=fields, scope=scope, secret=secret),
                              ensure_ascii=False, indent=2 if fmt == "json" else None)
        except RecursionError:
            raise _too_deep(where) from None

    where = args.text if _reads_a_file(args.text) else "<stdin>" if args.text == "-" else "<text>"
    keys: set[str] = set()
    if fmt == "json":
        values = [(where, _parse_json(text, where, keys))]
    else:  # lines end at "\n" alone: JSON strings may hold U+2028 and the like raw, which splitlines() cuts at
        lines = text.removesuffix("\n").split("\n") if text else []
        values = [(f"{where}:{n}", _parse_json(line, f"{where}:{n}", keys) if line.strip() else None)
                  for n, line in enumerate((line.removesuffix("\r") for line in lines), start=1)]
    unseen = [f for f in fields or () if f not in keys]
    if unseen:  # a typo would print the strings it meant to redact: refused before anything is written
        raise ValueError(f"--fields: no key {', '.join(map(repr, unseen))} in {where}; nothing would be redacted "
                         "under it")
    for here, value in values:
        print("" if value is None and fmt == "jsonl" else redact_value(value, here))
    return 0


def _fields(text: str | None) -> list[str] | None:
    """--fields K1,K2 as keys; one naming no key (an unset shell variable) would redact nothing."""
    if text is None:
        return None
    fields = [f.strip() for f in text.split(",") if f.strip()]
    if not fields:
        raise ValueError(f"--fields: names no key ({text!r}); give K1,K2, or leave it out to redact every string")
    return fields


def _format(args: argparse.Namespace) -> str:
    if args.format != "auto":
        return args.format
    suffix = Path(args.text).suffix.lower() if _reads_a_file(args.text) else ""
    return {".json": "json", ".jsonl": "jsonl"}.get(suffix, "text")


def _reads_a_file(argument: str) -> bool:
    return could_be_a_path(argument) and Path(argument).is_file()


def _parse_json(text: str, where: str, keys: set[str]) -> Any:
    """The JSON value in `text`, adding every object key in it to `keys`. NaN and Infinity are refused:
    Python's json reads them, but they are not JSON, so the redacted output would not be either."""
    def not_json(constant: str) -> Any:
        raise ValueError(f"{where}: holds {constant}, which is not JSON (the output must be); "
                         "--format text redacts it as plain text")

    def record_keys(obj: dict[str, Any]) -> dict[str, Any]:
        keys.update(obj)
        return obj

    try:
        return json.loads(text, parse_constant=not_json, object_hook=record_keys)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno}); "
                         "--format text redacts it as plain text") from None
    except RecursionError:
        raise _too_deep(where) from None


def _too_deep(where: str) -> ValueError:
    return ValueError(f"{where}: JSON nested too deeply (beyond Python's recursion limit of "
                      f"{sys.getrecursionlimit()}); --format text redacts it as plain text")
