"""SHA-256 of what a run read and wrote: files, folders, JSON descriptions.

- a file: the hash of its bytes;
- a folder: the hash of its listing, one line `relative/path\\0<sha256 of the file>\\n`
  per file, sorted by path (posix separators), so the same files give the same
  hash wherever the folder lies and whatever order the disk lists them in;
- a JSON value (a data description such as a shard folder's metadata): the
  hash of its canonical JSON.

A checkpoint folder lists the sha256 and size of every file but itself in
its lineage.json; `folder_sha256` reuses those (when the size still matches)
instead of reading gigabytes of weights a second time, so recording a
checkpoint costs one small file read. The result is the same hash a full
read gives as long as the manifest is honest, and `heron.load` checks it
on every load.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A checkpoint folder's files (DESIGN.md, "The core contract"), named here, at the bottom layer,
# for every layer that writes or reads one: train/checkpoint.py, interop/, govern/.
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"  # a Hugging Face folder's single weights file has the same name
TOKENIZER_FILE = "tokenizer.json"  # Hugging Face tokenizers' format
LINEAGE_FILE = "lineage.json"
METRICS_FILE = "metrics.jsonl"  # the per-step log a training or alignment run writes in its folder
QUANTIZATION_FILE = "quantization.json"  # a quantised checkpoint's scheme and layers (compress/checkpoint.py)
SPARSITY_FILE = "sparsity.json"  # a sparse checkpoint's packed layers (compress/sparse_store.py)

PathLike = str | os.PathLike[str]


def canonical_json(value: Any) -> str:
    """One text per JSON value: sorted keys, no spaces, UTF-8 as is, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def json_value(value: Any) -> Any:
    """`value` as plain JSON: tuples become lists, paths strings, numpy-style
    numbers Python ones, and NaN or infinity the strings "nan", "inf"
    (canonical JSON has no NaN). Anything else is a TypeError naming its type."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else str(float(value))
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON: {value!r:.80}")


def json_sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(json_value(value)).encode("utf-8")).hexdigest()


def file_sha256(file: PathLike) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def listing_sha256(files: Mapping[str, str]) -> str:
    """The hash of a folder listing {relative posix path: sha256 of the file}."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode("utf-8"))
    return digest.hexdigest()


def folder_sha256(folder: PathLike, *, trust_lineage: bool = True) -> str:
    """The listing hash of every file under `folder` (`folder_file_hashes`)."""
    return listing_sha256(folder_file_hashes(folder, trust_lineage=trust_lineage))


def folder_file_hashes(folder: PathLike, *, trust_lineage: bool = True) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (symlinked folders are not followed).

    With `trust_lineage`, files that the folder's lineage.json lists with their size unchanged
    take the sha256 recorded there (recording a checkpoint just written need not read its
    weights twice); every other file is read. An audit reads them all: weights changed in
    place, at the same size, would pass on the manifest's word."""
    root = Path(folder)
    known = _manifest(root) if trust_lineage else {}
    files: dict[str, str] = {}
    for here, dirs, names in os.walk(root):
        dirs.sort()
        for name in names:
            path = Path(here) / name
            if not path.is_file():  # a broken link, a socket, ...
                continue
            rel = path.relative_to(root).as_posix()
            recorded = known.get(rel)
            files[rel] = recorded[0] if recorded and recorded[1] == path.stat().st_size else file_sha256(path)
    return files


def _manifest(folder: Path) -> dict[str, tuple[str, int]]:
    """{file name: (sha256, bytes)} from a checkpoint's lineage.json; {} when there is none."""
    try:
        files = json.loads((folder / LINEAGE_FILE).read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {name: (entry["sha256"], entry["bytes"]) for name, entry in files.items()
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)}


def model_hash(checkpoint: PathLike) -> str | None:
    """The sha256 of a checkpoint's weights file, as its lineage.json records it; None when it records none."""
    recorded = _manifest(Path(checkpoint)).get(MODEL_FILE)
    return recorded[0] if recorded else None


@dataclass(frozen=True)
class Artifact:
    """What one input or output of an event was: its hash, what kind of thing
    was hashed ("file", "folder" or "json") and, for files and folders, where it lay."""

    kind: str
    sha256: str
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Artifact:
        return cls(kind=data["kind"], sha256=data["sha256"], path=data.get("path"))

    @classmethod
    def listing(cls, folder: PathLike, files: Mapping[str, str]) -> Artifact:
        """A folder given by the hashes of the files that were read from it, {relative path: sha256}."""
        return cls("folder", listing_sha256(files), str(Path(folder).resolve()))


ArtifactLike = Artifact | Mapping[str, Any] | PathLike


def artifact(value: ArtifactLike) -> Artifact:
    """An Artifact as given; a path (file or folder) hashed; a mapping hashed as JSON."""
    if isinstance(value, Artifact):
        return value
    if isinstance(value, Mapping):
        return Artifact("json", json_sha256(value))
    path = Path(value)
    if path.is_file():
        return Artifact("file", file_sha256(path), str(path.resolve()))
    if path.is_dir():
        return Artifact("folder", folder_sha256(path), str(path.resolve()))
    raise FileNotFoundError(f"{path}: nothing to hash here")


__all__ = ["CONFIG_FILE", "LINEAGE_FILE", "METRICS_FILE", "MODEL_FILE", "QUANTIZATION_FILE", "SPARSITY_FILE",
           "TOKENIZER_FILE", "Artifact", "ArtifactLike",
           "artifact", "canonical_json", "file_sha256", "folder_file_hashes", "folder_sha256", "json_sha256",
           "json_value", "listing_sha256", "model_hash"]
