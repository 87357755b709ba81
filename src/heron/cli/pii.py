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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from heron.cli.options import text_or_file
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
    p.add_argument("--scope", default="",
                   help="pseudonym: values map to the same fake within one scope (default: the empty scope)")
    p.add_argument("--secret-env", default=SECRET_ENV, metavar="VAR",
                   help="pseudonym: environment variable holding the secret key (default %(default)s)")
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
    secret = None
    if args.operator == "pseudonym":
        secret = os.environ.get(args.secret_env)
        if not secret:
            raise ValueError(f"--operator pseudonym: set the secret key in ${args.secret_env}")
    text, fmt = text_or_file(args.text), _format(args)
    fields = [f.strip() for f in args.fields.split(",") if f.strip()] if args.fields is not None else None
    if fields is not None and fmt == "text":
        raise ValueError("--fields: names keys of JSON records; give --format json or jsonl (or a .json or "
                         ".jsonl file)")
    engine = _engine(args)
    if fmt == "text":
        redacted = engine.redact(text, args.operator, scope=args.scope, secret=secret)
        print(redacted, end="" if redacted.endswith("\n") else "\n")  # a file's own last newline, not a second
        return 0

    def redact_value(value: Any) -> str:
        return json.dumps(engine.redact_json(value, args.operator, fields=fields, scope=args.scope, secret=secret),
                          ensure_ascii=False, indent=2 if fmt == "json" else None)

    where = "<stdin>" if args.text == "-" else args.text
    if fmt == "json":
        print(redact_value(_parse_json(text, where)))
        return 0
    for lineno, line in enumerate(text.splitlines(), start=1):  # a line at a time: the first bad one fails early
        print(redact_value(_parse_json(line, f"{where}:{lineno}")) if line.strip() else line)
    return 0


def _format(args: argparse.Namespace) -> str:
    if args.format != "auto":
        return args.format
    suffix = Path(args.text).suffix.lower() if args.text != "-" and Path(args.text).is_file() else ""
    return {".json": "json", ".jsonl": "jsonl"}.get(suffix, "text")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno}); "
                         "--format text redacts it as plain text") from None
