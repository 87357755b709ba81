"""The weight files of a Hugging Face folder, read one tensor at a time.

A folder holds `model.safetensors`, or shards listed in
`model.safetensors.index.json`, or the legacy `pytorch_model.bin` (sharded
through `pytorch_model.bin.index.json`). `WeightFiles` maps every tensor name
to a loader: indexing reads that tensor from disk into fresh memory and keeps
nothing, so a converter that copies tensor by tensor into a model holds about
one copy of the weights.

Why safetensors are parsed here rather than opened with `safetensors.safe_open`:
safe_open memory-maps the file, and every page read stays resident (and
counted in the process's RSS) until the file is closed, so importing one
large single-file checkpoint peaks at twice its size. The format is a
little-endian u64 header length, a JSON header of name -> dtype, shape and
byte range, then the bytes (https://github.com/huggingface/safetensors); a
plain `readinto` of each range keeps only the model's own copy. Writing still
goes through the safetensors package.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from heron.govern.digest import MODEL_FILE as SAFETENSORS_FILE  # the name a Heron checkpoint's weights have too

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_HEADER_LIMIT = 100 * 2**20  # the safetensors package refuses headers over 100 MB too


class WeightFileError(ValueError):
    """A weight file or index that cannot be read; the message names the file and tensor."""


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset
    nbytes: int


def read_safetensors_header(file: Path) -> dict[str, _Entry]:
    """Name -> entry for every tensor of one safetensors file, checked against its size."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightFileError(f"{file}: too short to be a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_HEADER_LIMIT, size - 8):
            raise WeightFileError(f"{file}: header length {length} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeightFileError(f"{file}: unreadable safetensors header ({err})") from err
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = (int(v) for v in info["data_offsets"])
            shape = tuple(int(n) for n in info["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise WeightFileError(f"{file}: tensor {name}: malformed header entry {info!r}") from err
        if min(shape, default=0) < 0 or not 0 <= begin <= end:
            raise WeightFileError(f"{file}: tensor {name}: shape {shape} or data offsets {[begin, end]} out of range")
        want = dtype.itemsize * math.prod(shape)
        if end - begin != want:
            raise WeightFileError(f"{file}: tensor {name}: {end - begin} bytes for shape {shape} of {info['dtype']} "
                                  f"({want} expected)")
        if base + end > size:
            raise WeightFileError(f"{file}: tensor {name} ends at byte {base + end}, past the end of the file "
                                  f"({size} bytes): truncated?")
        entries[name] = _Entry(file, dtype, shape, base + begin, want)
    return entries


def _read(entry: _Entry, out: torch.Tensor) -> torch.Tensor:
    """The entry's bytes into `out` (contiguous, of its dtype and size); returns `out`."""
    if entry.nbytes:
        with entry.file.open("rb") as f:
            f.seek(entry.start)
            got = f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        if got != entry.nbytes:
            raise WeightFileError(f"{entry.file}: read {got} of {entry.nbytes} bytes at {entry.start}")
    return out


class WeightFiles(Mapping[str, torch.Tensor]):
    """Every tensor of a folder's weight files by name; `files[name]` reads it from disk.

    `shape(name)` and `dtype(name)` answer without reading. Legacy `.bin`
    files are pickles, loaded with `weights_only=True` (no code runs) and
    memory-mapped, so they too are read tensor by tensor.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._entries: dict[str, _Entry] = {}
        self._pickled: dict[str, torch.Tensor] = {}  # name -> mmap-backed tensor, from .bin files
        files = weight_files(self.folder)
        for file in files:
            if file.suffix == ".safetensors":
                found = read_safetensors_header(file)
            else:
                found = _load_bin(file)
            for name in found:
                if name in self._entries or name in self._pickled:
                    raise WeightFileError(f"{file}: tensor {name} is also in another weight file")
            (self._entries if file.suffix == ".safetensors" else self._pickled).update(found)
        self.files = files

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._entries:
            entry = self._entries[name]
            return _read(entry, torch.empty(entry.shape, dtype=entry.dtype))
        if name in self._pickled:
            return self._pickled[name].clone()
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._entries or name in self._pickled

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read tensor `name` into `out`, a contiguous tensor of its dtype and size (any shape)."""
        entry = self._entries.get(name)
        if entry is None:
            out.copy_(self[name].view(out.shape))
            return
        if not out.is_contiguous() or out.dtype != entry.dtype or out.numel() != math.prod(entry.shape):
            raise ValueError(f"{name}: cannot read {entry.dtype} {entry.shape} into {out.dtype} {tuple(out.shape)}")
        _read(entry, out)

    def __iter__(self) -> Iterator[str]:
        yield from self._entries
        yield from self._pickled

    def __len__(self) -> int:
        return len(self._entries) + len(self._pickled)

    def shape(self, name: str) -> torch.Size:
        entry = self._entries.get(name)
        return torch.Size(entry.shape) if entry else self._pickled[name].shape

    def dtype(self, name: str) -> torch.dtype:
        entry = self._entries.get(name)
        return entry.dtype if entry else self._pickled[name].dtype

    def nbytes(self) -> int:
        """Bytes of tensor data in all files."""
        return sum(e.nbytes for e in self._entries.values()) + sum(
            t.numel() * t.element_size() for t in self._pickled.values())


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder, safetensors preferred; errors name what is missing."""
    for single, index in ((SAFETENSORS_FILE, SAFETENSORS_INDEX), (BIN_FILE, BIN_INDEX)):
        if (folder / index).is_file():
            return _indexed_files(folder, index)
        if (folder / single).is_file():
            return [folder / single]
    raise WeightFileError(f"{folder}: no weight files ({SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} "
                          f"or {BIN_INDEX})")


def _indexed_files(folder: Path, index: str) -> list[Path]:
    try:
        weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise WeightFileError(f"{folder / index}: not a shard index with a weight_map ({err})") from err
    files = []
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise WeightFileError(f"{folder / index}: tensor {name} is in {shard!r}, which is not a file in the folder")
        path = folder / shard
        if not path.is_file():
            raise WeightFileError(f"{path}: missing shard (the index {index} lists tensor {name} in it)")
        if path not in files:
            files.append(path)
    return files


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - unpickling raises many types; all mean "unreadable"
        raise WeightFileError(f"{file}: not a readable PyTorch state dict ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightFileError(f"{file}: expected a dict of tensors")
    return state


__all__ = ["WeightFileError", "WeightFiles", "read_safetensors_header", "weight_files"]
