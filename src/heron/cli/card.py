"""`heron card CKPT`: a checkpoint's model card (README.md), or its EU AI Act Annex IV document.

    heron card runs/tiny                              # runs/tiny/checkpoints/step_N/README.md
    heron card runs/tiny --eval results.json --license apache-2.0
    heron card runs/tiny --annex-iv --audit-log runs/audit.db --out docs/annex_iv.md
"""
from __future__ import annotations

import argparse
from pathlib import Path

from heron.cli.options import lasting_database
from heron.store.inputs import existing_input
from heron.govern.annex_iv import write_annex_iv
from heron.govern.audit import AuditLog, log_location
from heron.govern.card import read_evaluations, write_model_card


def register(verbs: argparse._SubParsersAction) -> None:
    """Add `heron card` to the CLI's verbs."""
    p = verbs.add_parser("card", help="write a model card (README.md), or the EU AI Act Annex IV documentation")
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--out", type=Path, default=None,
                   help="file to write (default: README.md, or ANNEX_IV.md, in the checkpoint folder)")
    p.add_argument("--annex-iv", action="store_true",
                   help="write the technical documentation of Annex IV of Regulation (EU) 2024/1689 instead")
    p.add_argument("--eval", dest="evals", type=Path, action="append", default=[], metavar="FILE",
                   help='evaluation results (JSON: [{"task", "dataset", "metrics": {name: value}, "split", '
                        '"revision", "source"}]); repeatable')
    p.add_argument("--license", default=None,
                   help="model card: a Hugging Face license id, e.g. apache-2.0 (default: other, for the provider)")
    p.add_argument("--name", default=None, help="the model's name (default: its recipe's, else its folder's)")
    p.add_argument("--force", action="store_true",
                   help="replace the file even if it was edited since heron card wrote it, or is another file "
                        "(an untouched document is always replaced)")
    p.add_argument("--audit-log", type=lasting_database, default=None,
                   help="Annex IV: where the audit log of the model's events is kept (default: the log normal work "
                        "records to, $HERON_AUDIT_LOG or runs/audit.db, when it exists)")
    p.set_defaults(handler=card)


def card(args: argparse.Namespace) -> int:
    for file in args.evals:  # before the checkpoint is looked for (which loads torch)
        existing_input(file, "--eval", "evaluation results file")
    folder = _resolve(args.checkpoint)
    evaluations = [result for file in args.evals for result in read_evaluations(file)]
    if args.annex_iv:
        if args.license is not None:
            raise ValueError("--license: goes into the model card, not the Annex IV document")
        path = write_annex_iv(folder, args.out, evaluations=evaluations, audit_log=_audit_log(args.audit_log),
                              name=args.name, resolve=_resolve, replace_edited=args.force)
    else:
        if args.audit_log is not None:
            raise ValueError("--audit-log: goes into the Annex IV document (add --annex-iv)")
        path = write_model_card(folder, args.out, evaluations=evaluations, license=args.license, name=args.name,
                                resolve=_resolve, replace_edited=args.force)
    print(f"wrote {path}")
    return 0


def _audit_log(given: str | None) -> str | None:
    """--audit-log, else the log that training, alignment and compression record to, if it exists.
    A file named with --audit-log must be an audit log, as `heron audit verify --log` requires: the
    document would cite it; a database URL is cited as given (checking it would mean connecting)."""
    if given is not None:
        if "://" not in given:
            if not Path(given).is_file():
                raise FileNotFoundError(f"--audit-log: no audit log at {given}")
            try:
                AuditLog.open(given, create=False).close()  # refuses a file that is not a database or no log
            except ValueError as err:
                raise ValueError(f"--audit-log: {err}") from None
        return given
    location = log_location()
    return location if location is not None and ("://" in location or Path(location).is_file()) else None


def _resolve(path: Path) -> Path:
    """The checkpoint a model, run or checkpoints folder names; the path itself when it names none,
    so that the card's own error (or its history's note) says what is missing."""
    from heron.train.checkpoint import CheckpointError, resolve_checkpoint  # torch: imported when a card is made

    try:
        return resolve_checkpoint(path)
    except (CheckpointError, OSError):
        return path
