"""`heron audit ...`: verify, export, lineage, checkpoint and keygen for the audit log.

Registered by cli/main.py (`audit.register(verbs)`); each handler returns an
exit code, and a wrong input is a ValueError or FileNotFoundError that
main() prints as one line (exit 2). `verify` exits 1 when the log is not intact.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from heron.cli.options import add_overwrite, lasting_database, new_output
from heron.store.inputs import existing_input
from heron.govern.audit import AuditLog, LogCheckpoint, log_location, verify_log
from heron.govern.audit_export import FORMATS, export_log, read_export
from heron.govern.audit_keys import generate_keys, load_public_key, load_signing_key
from heron.govern.audit_lineage import audit_lineage, format_lineage
from heron.store.atomic import write_text_atomic

EXPORT_SUFFIXES = {".json": "json", ".csv": "csv"}  # `verify --log FILE` with these reads an export, not a database


def register(verbs: argparse._SubParsersAction) -> None:
    """Add `heron audit ...` to the `heron` verbs."""
    audit = verbs.add_parser("audit", help="the audit log: verify, export, lineage, checkpoint, keygen")
    actions = audit.add_subparsers(dest="action", required=True)

    p = actions.add_parser("verify", help="check the hash chain, checkpoints and signatures (exit 1 if not intact)")
    _add_log(p, also="or an export (.json, .csv)")
    p.add_argument("--public-key", type=Path, default=None, help="Ed25519 public key (PEM) the checkpoints are signed with")
    p.add_argument("--anchor", type=Path, action="append", default=[], metavar="FILE",
                   help="a checkpoint kept outside the log (written by `heron audit checkpoint --out`); repeatable")
    p.set_defaults(handler=verify)

    p = actions.add_parser("export", help="write every record to JSON (with the checkpoints) or CSV")
    p.add_argument("file", type=Path, help="the file to write, or - for standard output")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="default: from the file's suffix (.json, .csv); json on standard output")
    add_overwrite(p)
    _add_log(p)
    p.set_defaults(handler=export)

    p = actions.add_parser("lineage", help="a checkpoint's history back to its data, with the records that wrote it")
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder, or a run folder (its latest checkpoint)")
    _add_log(p)
    p.set_defaults(handler=lineage)

    p = actions.add_parser("checkpoint", help="store a Merkle checkpoint of the log now (optionally signed)")
    p.add_argument("--sign-key", type=Path, default=None, help="Ed25519 private key (PEM) to sign it with")
    p.add_argument("--out", type=Path, default=None, help="also write it to this JSON file, to keep outside the log")
    add_overwrite(p)
    _add_log(p)
    p.set_defaults(handler=checkpoint)

    p = actions.add_parser("keygen", help="write an Ed25519 key pair for signing checkpoints")
    p.add_argument("folder", type=Path, help="the folder to write the private and the public key (PEM) into")
    p.set_defaults(handler=keygen)


def _add_log(parser: argparse.ArgumentParser, also: str | None = None) -> None:
    what = "SQLite file or database URL" + (f", {also}" if also else "")
    parser.add_argument("--log", type=lasting_database, default=None,
                        help=f"{what} (default: $HERON_AUDIT_LOG, else runs/audit.db)")


def _location(args: argparse.Namespace) -> str:
    location = log_location(args.log)
    if location is None:
        raise ValueError("the audit log is off (HERON_AUDIT_LOG=off); name one with --log")
    return location


def _open(args: argparse.Namespace) -> AuditLog:
    location = _location(args)
    if "://" not in location and not Path(location).is_file():
        raise FileNotFoundError(f"no audit log at {location}")
    return AuditLog.open(location, create=False)


def verify(args: argparse.Namespace) -> int:
    public_key = (load_public_key(existing_input(args.public_key, "--public-key", "public key"))
                  if args.public_key is not None else None)
    anchors = [_read_anchor(file) for file in args.anchor]
    if args.log is not None and Path(args.log).suffix.lower() in EXPORT_SUFFIXES:
        rows, checkpoints = read_export(existing_input(Path(args.log), "--log", "audit export"))
        report = verify_log(rows, [*checkpoints, *anchors], public_key=public_key)
        if not checkpoints and not anchors:
            print(f"note: {args.log} holds no checkpoints (a CSV export never does), so records cut from its "
                  "end go unseen; verify a JSON export, or pass --anchor")
    else:
        with _open(args) as log:
            report = log.verify(public_key=public_key, anchors=anchors)
    print(report.summary())
    return 0 if report.ok else 1


def _read_anchor(file: Path) -> LogCheckpoint:
    existing_input(file, "--anchor", "checkpoint file")
    try:
        return LogCheckpoint.from_json(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable, not JSON, or not a checkpoint's fields
        raise ValueError(f"--anchor {file}: not a checkpoint written by `heron audit checkpoint --out` "
                         f"({type(err).__name__}: {err})") from None


def export(args: argparse.Namespace) -> int:
    if str(args.file) == "-":
        with _open(args) as log:
            count = export_log(log, sys.stdout, args.format or "json")
        print(f"wrote {count} audit records to standard output", file=sys.stderr)
        return 0
    new_output(args.file, _location(args), "audit log", args.overwrite)
    fmt = args.format or EXPORT_SUFFIXES.get(args.file.suffix.lower())
    if fmt is None:
        raise ValueError(f"{args.file}: cannot tell the format from its suffix; end it in .json or .csv, "
                         "or pass --format")
    with _open(args) as log:
        count = export_log(log, args.file, fmt)
    print(f"wrote {count} audit records to {args.file} ({fmt})")
    return 0


def lineage(args: argparse.Namespace) -> int:
    from heron.train.checkpoint import resolve_checkpoint

    location = log_location(args.log)
    log = None
    if args.log is not None or (location is not None and ("://" in location or Path(location).is_file())):
        log = _open(args)  # a log named with --log must be there; the default one may not be
    try:
        steps, history = audit_lineage(args.checkpoint, log=log, resolve=resolve_checkpoint)
        intact = log is None or log.verify().ok
    finally:
        if log is not None:
            log.close()
    print(format_lineage(steps, history))
    if log is None:
        print(f"(no audit log at {location}: records not shown)")
    elif not intact:
        print(f"warning: the audit log {location} is NOT intact (see `heron audit verify`): "
              "the records above may have been altered")
    altered = [step.stage.path for step in steps if step.altered]
    if altered:
        print(f"error: files of {', '.join(map(str, altered))} are NOT what their lineage.json records (ALTERED "
              "above): the weights or files were changed after they were written")
    return 1 if altered else 0


def checkpoint(args: argparse.Namespace) -> int:
    key = (load_signing_key(existing_input(args.sign_key, "--sign-key", "private key"))
           if args.sign_key is not None else None)
    if args.out is not None:  # before the checkpoint is stored: a bad --out leaves the log as it was
        if args.out.is_dir():
            raise IsADirectoryError(f"--out {args.out}: is a folder; name a file to write")
        new_output(args.out, _location(args), "audit log", args.overwrite)
    with _open(args) as log:
        made = log.checkpoint(sign_key=key)
    signed = "signed" if made.signature else "unsigned"
    print(f"checkpoint {made.id}: {made.size} records, root {made.root} ({signed})")
    if args.out is not None:
        write_text_atomic(args.out, json.dumps(made.to_json(), indent=1) + "\n")
        print(f"wrote {args.out}: keep it away from the log, and pass it to `heron audit verify --anchor`")
    return 0


def keygen(args: argparse.Namespace) -> int:
    private, public = generate_keys(args.folder)
    print(f"private key: {private} (sign with it: heron audit checkpoint --sign-key, or $HERON_AUDIT_SIGN_KEY)\n"
          f"public key:  {public} (verify with it: heron audit verify --public-key)")
    return 0


__all__ = ["register"]
