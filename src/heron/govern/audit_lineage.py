"""A checkpoint's history joined with the audit records that wrote each step.

    steps, history = audit_lineage("runs/q/model", log=AuditLog.open("runs/audit.db"))
    print(format_lineage(steps, history))

The history comes from the lineage.json links (`heron.govern.history`:
quantized_from, pruned_from, alignment base, distillation teacher, imported
source) back to the stage that trained on data. Each step's folder hash, of
every file as it is now (not trusting the lineage manifest's hashes, as
recording does: weights changed in place would pass), is looked up among
the records' outputs, so a step shows who made it, when, and the hashes of
what it read, data files included; a file whose
contents differ from what its lineage.json records is named. A record that
rewrote the folder in place (a model card written into it reads the folder
as it was and writes it as it is) leads on to the records that made the
folder as it was, back to the one that made the weights.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from heron.govern.audit import AuditLog, Record, audit_log
from heron.govern.digest import folder_file_hashes, folder_sha256, listing_sha256
from heron.govern.history import History, Stage, alignment_data, read_history, training_data


@dataclass(frozen=True)
class LineageStep:
    stage: Stage  # the checkpoint folder, its lineage and the kind of stage that wrote it
    sha256: str  # the folder's hash, as an audit record's output would carry it
    records: tuple[Record, ...]  # the audit records that wrote this folder, its in-place rewrites first
    altered: tuple[str, ...] = ()  # what differs from the lineage manifest: "model.safetensors: sha256 ..."


def audit_lineage(checkpoint: str | os.PathLike[str], *, log: AuditLog | None,
                  resolve: Callable[[Path], Path] = Path) -> tuple[list[LineageStep], History]:
    """The steps from `checkpoint` back to its data, newest first, each with its audit records.

    `resolve` maps a recorded path to a checkpoint folder (the CLI passes
    train/checkpoint.py's resolve_checkpoint, which accepts run folders)."""
    history = read_history(resolve(Path(checkpoint)), resolve=resolve)
    steps = []
    for stage in history.stages:
        files = folder_file_hashes(stage.path, trust_lineage=False)
        digest = listing_sha256(files)
        steps.append(LineageStep(stage, digest, tuple(writers(log, digest)) if log is not None else (),
                                 tuple(altered(stage, files))))
    return steps, history


def altered(stage: Stage, files: dict[str, str]) -> list[str]:
    """The files whose contents are not what the stage's lineage.json records, each with both hashes."""
    manifest = stage.lineage.get("files")
    if not isinstance(manifest, dict):
        return []
    found = []
    for name, entry in sorted(manifest.items()):
        recorded = entry.get("sha256") if isinstance(entry, dict) else None
        if files.get(name) != recorded:
            found.append(f"{name}: sha256 {files.get(name, 'missing')}, lineage.json records {recorded}")
    return found


def writers(log: AuditLog, sha256: str) -> list[Record]:
    """The records that wrote a folder of this hash, newest first, each in-place rewrite
    followed by what wrote the folder it read."""
    found: dict[int, Record] = {}
    seen: set[str] = set()
    pending = [sha256]
    while pending:
        digest = pending.pop()
        if digest in seen:
            continue
        seen.add(digest)
        for record in log.produced(digest):
            found[record.seq] = record
            out = next(a for a in record.outputs.values() if a.sha256 == digest)
            pending += [a.sha256 for a in record.inputs.values() if a.kind == "folder" and a.path == out.path]
    return [found[seq] for seq in sorted(found, reverse=True)]


def record_if_missing(folder: str | os.PathLike[str], record: Callable[[Path], object]) -> bool:
    """Append with `record` the audit record of `folder` when the log is on and no record wrote the
    folder as it is now (or as it was before documents were written into it): a rerun of the
    command that wrote it makes good what a kill after the folder left out. True when written."""
    log = audit_log()
    if log is None or writers(log, folder_sha256(folder)):
        return False
    record(Path(folder))
    return True


def format_lineage(steps: list[LineageStep], history: History) -> str:
    lines = []
    for depth, step in enumerate(steps):
        stage, pad = step.stage, "  " * depth
        made = f" ({stage.kind.made} {stage.parent})" if stage.parent and stage.kind.made else ""
        lines.append(f"{pad}{stage.path}: {stage.kind.name}{made}")
        lines.append(f"{pad}  folder sha256 {step.sha256}; weights sha256 {stage.model_sha256 or '-'}")
        lines += [f"{pad}  ALTERED since its lineage.json was written: {what}" for what in step.altered]
        for facts in filter(None, (training_data(stage), alignment_data(stage))):
            pinned = f", revision {facts.revision}" if facts.revision else ""
            lines.append(f"{pad}  data: {facts.name}{pinned}")
        if not step.records:
            lines.append(f"{pad}  audit: no record wrote this folder")
        for record in step.records:
            lines.append(f"{pad}  audit: record {record.seq} {record.event} at {record.time} by {record.actor}")
            for role, item in sorted(record.inputs.items()):
                where = f" {item.path}" if item.path else ""
                lines.append(f"{pad}    read {role}: {item.kind}{where} sha256 {item.sha256}")
    if history.unreadable is not None:
        pad = "  " * len(steps)
        lines.append(f"{pad}{history.unreadable}: not followed ({history.why_unreadable})")
    if (origin := history.hugging_face) is not None:
        pad = "  " * len(steps)
        lines.append(f"{pad}{origin.path}: a Hugging Face {origin.model_type} folder; its history is outside Heron")
    return "\n".join(lines)


__all__ = ["LineageStep", "altered", "audit_lineage", "format_lineage", "record_if_missing", "writers"]
