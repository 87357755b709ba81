"""`heron convert`: Hugging Face folders to Heron checkpoints and back.

An imported checkpoint's lineage records where it came from: the source
folder, its model_type, and the sha256 of every file read, so the model can
be traced back to the exact weights it was converted from.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from heron.core.transformer import Transformer
from heron.govern.audit import record_event
from heron.govern.digest import LINEAGE_FILE, Artifact, model_hash
from heron.govern.history import read_json
from heron.interop.families import Family
from heron.interop.files import WeightFiles
from heron.interop.hf_folder import CONFIG_FILE, load_hf_config, load_hf_folder, read_hf_config, save_hf_folder
from heron.tokenizer import Tokenizer
from heron.train.checkpoint import (
    load_model_folder,
    refuse_finished,
    require_new_folder,
    resolve_checkpoint,
    save_model_folder,
    sha256_file,
)


def import_hf(source: str | Path, target: str | Path) -> Path:
    """Convert a Hugging Face folder into a Heron checkpoint folder at `target`. Run again after
    a kill that came between the folder and its audit record, it writes that record."""
    source = Path(source)
    refuse_finished(target, lambda lineage: imported_from(lineage) == str(source.resolve()), record_imported)
    target = require_new_folder(target, source)
    family, _ = load_hf_config(source)
    model, tokenizer = load_hf_folder(source)
    # every file read, the tokenizer's templates and generation_config.json too, by its path in the folder
    read = [source / CONFIG_FILE, *WeightFiles(source).files, *(tokenizer.files if tokenizer is not None else ())]
    lineage = {"source": {
        "kind": "huggingface", "path": str(source.resolve()), "model_type": read_hf_config(source)["model_type"],
        "family": family.name, "files": {Path(os.path.relpath(f, source)).as_posix(): sha256_file(f) for f in read},
    }}
    folder = save_model_folder(target, model, tokenizer=tokenizer, lineage=lineage)
    record_imported(folder)
    return folder


def record_imported(folder: Path) -> None:
    """Append the `convert.from_hf` record of the imported checkpoint at `folder`, from its lineage:
    the source folder named by the hashes of the files read from it."""
    origin = read_json(folder / LINEAGE_FILE)["source"]
    record_event("convert.from_hf", inputs={"source": Artifact.listing(origin["path"], origin["files"])},
                 outputs={"checkpoint": folder}, model_hash=model_hash(folder), parameters=origin)


def imported_from(lineage: dict) -> str | None:
    """The Hugging Face folder an imported checkpoint's lineage names; None for other checkpoints."""
    origin = lineage.get("source")
    return origin.get("path") if isinstance(origin, dict) and origin.get("kind") == "huggingface" else None


def export_hf(checkpoint: str | Path, target: str | Path, family: str | None = None,
              load: Callable[[str | Path], tuple[Transformer, Tokenizer | None]] = load_model_folder) -> Family:
    """Write a Heron checkpoint as a Hugging Face folder; returns the family used. `load` reads
    the checkpoint (`heron.load`, from above this layer, reads pruned ones too)."""
    model, tokenizer = load(checkpoint)
    used = save_hf_folder(model, target, tokenizer, family=family)
    source = resolve_checkpoint(checkpoint)
    record_event("convert.to_hf", inputs={"checkpoint": source}, outputs={"folder": target},
                 model_hash=model_hash(source), parameters={"family": used.name})
    return used


__all__ = ["export_hf", "import_hf", "imported_from", "record_imported"]
