"""`heron convert`: Hugging Face folders to Heron checkpoints and back.

An imported checkpoint's lineage records where it came from: the source
folder, its model_type, and the sha256 of every file read, so the model can
be traced back to the exact weights it was converted from.
"""
from __future__ import annotations

from pathlib import Path

from heron.interop.families import Family
from heron.interop.files import WeightFiles
from heron.interop.hf_folder import CONFIG_FILE, load_hf_config, load_hf_folder, read_hf_config, save_hf_folder
from heron.tokenizer.bpe import TOKENIZER_FILE
from heron.tokenizer.pretrained import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from heron.train.checkpoint import load_model_folder, save_model_folder, sha256_file


def import_hf(source: str | Path, target: str | Path) -> Path:
    """Convert a Hugging Face folder into a Heron checkpoint folder at `target`."""
    source = Path(source)
    family, _ = load_hf_config(source)
    model, tokenizer = load_hf_folder(source)
    read = [source / CONFIG_FILE, *WeightFiles(source).files]
    read += [source / name for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE) if (source / name).is_file()]
    lineage = {"source": {
        "kind": "huggingface", "path": str(source.resolve()), "model_type": read_hf_config(source)["model_type"],
        "family": family.name, "files": {f.name: sha256_file(f) for f in read},
    }}
    return save_model_folder(target, model, tokenizer=tokenizer, lineage=lineage)


def export_hf(checkpoint: str | Path, target: str | Path, family: str | None = None) -> Family:
    """Write a Heron checkpoint as a Hugging Face folder; returns the family used."""
    model, tokenizer = load_model_folder(checkpoint)
    return save_hf_folder(model, target, tokenizer, family=family)


__all__ = ["export_hf", "import_hf"]
