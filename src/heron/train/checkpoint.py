"""Checkpoints: folders written atomically, verified on load.

A model folder holds

    config.json          ModelConfig.to_json()
    model.safetensors    weights (a tied alias such as lm_head.weight is stored once)
    tokenizer.json       Hugging Face tokenizers format (absent for synthetic-data runs)
    lineage.json         recipe, data hashes, seed, step, metrics, versions, and the
                         sha256 and size of every other file in the folder

and a training checkpoint adds `trainer_state.pt` (optimizer state keyed by
parameter name, step, RNG states, metrics history) for resuming.

Atomicity: everything is written into a hidden temp sibling, each file and the
folder are fsynced, and only then is the folder renamed into place (rename is
atomic on POSIX). A crash mid-save leaves a `.tmp-*` folder that is never read
and is swept away by the next save (`sweep_partial`; the name carries the
writer's pid, so a save still running in another process keeps its own); a
visible `step_*` folder is always complete. `latest` is a symlink to the newest
checkpoint, replaced atomically.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import platform
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from heron.core.config import ModelConfig
from heron.core.gemm import cpu_gemm_libraries
from heron.core.transformer import Transformer
from heron.govern.digest import CONFIG_FILE, LINEAGE_FILE, MODEL_FILE, QUANTIZATION_FILE, SPARSITY_FILE
from heron.govern.digest import file_sha256 as sha256_file
from heron.govern.audit_lineage import record_if_missing
from heron.govern.digest import model_hash
from heron.store.atomic import fsync_path, process_alive, write_text_atomic
from heron.tokenizer import Tokenizer, load_tokenizer
from heron.tokenizer.bpe import TOKENIZER_FILE
from heron.tokenizer.pretrained import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from heron.tokenizer.pretrained import EXTRA_TEMPLATES_DIR, GENERATION_CONFIG_FILE, TEMPLATE_FILE

RUN_MODEL_DIR = "model"  # the one model of a run that keeps no step checkpoints (an alignment run)
STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"
CHECKPOINTS_DIR = "checkpoints"
REQUIRED_FILES = (CONFIG_FILE, MODEL_FILE, LINEAGE_FILE)
# The files loading a checkpoint (of any kind) reads, and so its manifest must vouch for; and EXTRA_TEMPLATES_DIR/*.
_LOADED_FILES = frozenset({CONFIG_FILE, MODEL_FILE, STATE_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                           GENERATION_CONFIG_FILE, TEMPLATE_FILE, QUANTIZATION_FILE, SPARSITY_FILE})
FORMAT_VERSION = 1
_NUMBER = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() takes '²', which int() refuses
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")  # a Hugging Face folder's weights, single or sharded
_TABLES_FLOOR = 1 << 30  # bytes of position tables any config may ask for, whatever its weights
# A hidden temp (`.tmp-`) or trash (`.trash-`) sibling of the folder or link `name`: the pid of the
# process writing it (older versions' names have none), a random token, and for a folder that a
# replacement moved aside, a count (`_move_in`).
_LEFTOVER = re.compile(r"\.(?P<kind>tmp|trash)-(?P<name>.+?)-(?:(?P<pid>[0-9]+)-)?[0-9a-f]{8}(?:-[0-9]+)?")


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, truncated, corrupted or mismatched."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint read into memory."""

    path: Path
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # full: tied aliases filled back in
    lineage: dict[str, Any]
    trainer_state: dict[str, Any] | None  # None for a model-only folder


# ----- writing --------------------------------------------------------------


def save_model_folder(
    path: str | Path,
    model: nn.Module,
    *,
    tokenizer: Tokenizer | None = None,
    lineage: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    trainer_state: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a model folder atomically and return its path.

    `model` supplies the config and the tied-weight structure; `state_dict`
    (default: the model's own) supplies the values, so distributed callers can
    pass a gathered full state dict. `extra_files` ({name: contents}, such as
    compress/'s quantization.json) are written and hashed with the rest. An existing
    folder is replaced only if it is empty or a model folder whose every file its
    lineage.json lists; any other is refused, as replacing it would delete its files.
    """
    target = require_replaceable(path, _not_from_a_model_folder, "save_model_folder")
    config: ModelConfig = model.config
    values = state_dict if state_dict is not None else model.state_dict()
    with atomic_folder(target) as tmp:
        _write_bytes(tmp / CONFIG_FILE, config.to_json().encode())
        _write_with(tmp / MODEL_FILE, lambda f: _save_weights(values, model, f))
        if tokenizer is not None:
            tokenizer.save(tmp)  # tokenizer.json, and tokenizer_config.json for an imported one
        if trainer_state is not None:
            _write_with(tmp / STATE_FILE, lambda f: torch.save(trainer_state, f))
        for name, data in (extra_files or {}).items():
            _write_bytes(tmp / name, data)
        record = {**base_lineage(), **(lineage or {}), "files": _manifest(tmp)}
        _write_bytes(tmp / LINEAGE_FILE, json.dumps(record, indent=2, sort_keys=True).encode())
    return target


def _not_from_a_model_folder(folder: Path) -> set[str]:
    """The files of `folder` that its lineage.json's manifest does not list (all, without one)."""
    try:
        listed = json.loads((folder / LINEAGE_FILE).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    written = {LINEAGE_FILE, *listed} if isinstance(listed, dict) else set()
    return folder_files(folder) - written


def base_lineage() -> dict[str, Any]:
    """Versions every lineage records, and the libraries of the CPU's fp32 products (core/gemm.py)."""
    return {
        "format": FORMAT_VERSION,
        "heron_version": _heron_version(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cpu_gemm": cpu_gemm_libraries(),
    }


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: source} for parameters registered under more than one name
    (tied embeddings: lm_head.weight -> embed.weight)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _save_weights(values: dict[str, torch.Tensor], model: nn.Module, file) -> None:
    # safetensors refuses tensors that share memory; a tied alias is the same
    # parameter, so store it once and re-tie on load (see `_fill_aliases`).
    aliases = tied_aliases(model)
    kept = {k: v.detach().to("cpu").contiguous() for k, v in values.items() if k not in aliases}
    try:
        data = safetensors.torch.save(kept, metadata={"format": "pt"})
    except RuntimeError as err:  # storage shared other than by tied parameters: a quantised model's codes
        raise ValueError(f"model: its tensors share memory in a way a plain model folder cannot hold ({err}); "
                         "save a quantised model with heron.compress.save_quantized") from None
    file.write(data)


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: sha256 and bytes} of every file under `folder` but lineage.json."""
    return {
        f.relative_to(folder).as_posix(): {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in sorted(folder.rglob("*")) if f.is_file() and f != folder / LINEAGE_FILE
    }


# folder -> the relative paths of its files that the writer about to replace it did not write
Foreign = Callable[[Path], set[str]]


def folder_files(folder: Path) -> set[str]:
    """Relative posix paths of everything under `folder` but subfolders: files and links."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink() or not p.is_dir()}


def require_replaceable(path: str | Path, foreign: Foreign, writer: str) -> Path:
    """`path`, when nothing is there, or it is a folder in which `foreign` finds no file
    that `writer` did not write; else FileExistsError naming them. For writers that replace
    their own earlier output whole (atomic_folder): replacing deletes what the folder holds."""
    target = Path(path)
    if not target.exists() and not target.is_symlink():
        return target
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a folder; give a new folder (or one {writer} wrote)")
    others = sorted(foreign(target))
    if others:
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise FileExistsError(f"{target}: holds files {writer} did not write ({listed}); replacing the folder would "
                              "delete them, so nothing was written: give a new or empty folder")
    return target


def require_new_folder(path: str | Path, source: str | Path | None = None) -> Path:
    """`path`, if nothing is there yet or it is an empty folder; else FileExistsError, so
    that writing a converted or compressed model never replaces its source or anything else.

    With the `source` it is made from, a `path` inside that folder (or inside the checkpoint
    it resolves to) is refused too: the source would then hold its own variant, which its
    size, its copies and anything that walks it would take in."""
    target = Path(path)
    if target.is_file():
        raise FileExistsError(f"{target}: is a file; give a folder path")
    check_parents(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target}: exists and is not empty; write to a new folder")
    if source is not None:
        for folder in {Path(source).resolve(), resolve_checkpoint(source).resolve()}:
            if target.resolve().is_relative_to(folder):
                raise ValueError(f"{target}: inside the source {source}; write to a folder outside it")
    return target


def check_parents(target: Path) -> None:
    """FileExistsError naming the file among `target`'s parents, if one is a file: no folder can
    be made below it (mkdir's bare "[Errno 17] File exists" names the file, not why, and a
    compression found it only once its work was done)."""
    existing = next((parent for parent in target.absolute().parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise FileExistsError(f"{target}: {existing} is a file, so no folder can be made inside it; give another path")


def refuse_finished(target: str | Path, made_from_source: Callable[[dict[str, Any]], bool],
                    record: Callable[[Path], object]) -> None:
    """Return unless `target` is a complete checkpoint whose lineage `made_from_source` accepts
    (the folder an earlier run of the same command finished); then raise the FileExistsError of
    an existing folder, after appending with `record` the audit record a kill between the
    folder and its record left out, if it has none (`record_if_missing`).

    Called before `require_new_folder`, which refuses anything else already at `target`."""
    folder = Path(target)
    if not folder.is_dir():
        return
    try:
        lineage = verify_checkpoint(folder)  # every file as its lineage records it: no record for a damaged folder
    except CheckpointError:
        return
    if not made_from_source(lineage):
        return
    recorded = " (the audit record a kill left it without: now written)" if record_if_missing(folder, record) else ""
    raise FileExistsError(f"{folder}: exists{recorded}; write to a new folder")


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temp sibling folder; on success fsync it and rename it to `target`. What killed
    writes to the same target left beside it goes first (`sweep_partial`); a write of it still
    running in another process is left alone, and the last to finish wins."""
    check_parents(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_partial(target.parent, target.name)
    tmp = target.parent / _hidden_name("tmp", target.name)
    tmp.mkdir()
    try:
        yield tmp
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_in(tmp, target)


def _move_in(tmp: Path, target: Path) -> None:
    """Rename the complete folder `tmp` to `target`. A folder already there is moved aside first
    and deleted only once `tmp` has taken its place, so a kill at any moment leaves a complete
    folder at `target`, or, between the two renames, in `tmp` beside the old one's trash, where
    `sweep_partial` finds it and finishes the move. Another writer's folder renamed in meanwhile
    is moved aside in turn."""
    trashes: list[Path] = []
    while True:
        trash = tmp.with_name(f".trash-{tmp.name.removeprefix('.tmp-')}-{len(trashes)}")
        with suppress(FileNotFoundError):  # nothing there: a first save, or another writer's moved it
            os.replace(target, trash)
            trashes.append(trash)
        try:
            os.replace(tmp, target)
            break
        except OSError as err:  # another writer renamed its folder in since: move that aside too
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    fsync_path(target.parent)
    for trash in trashes:
        shutil.rmtree(trash, ignore_errors=True)


def _hidden_name(kind: str, name: str) -> str:
    """A fresh `.{kind}-{name}-{pid}-{token}` for a temp or trash sibling of `name`: the pid tells
    `sweep_partial` whether the process writing it still runs."""
    return f".{kind}-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _write_bytes(path: Path, data: bytes) -> None:
    _write_with(path, lambda f: f.write(data))


def _write_with(path: Path, write: Callable[[Any], Any]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def remove_folder(path: Path) -> None:
    """Delete a folder so that a crash midway never leaves a half-folder under
    its real name: rename to a hidden trash name first, then delete."""
    trash = path.parent / _hidden_name("trash", path.name)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ----- reading and verifying -------------------------------------------------


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check that a folder is a complete, uncorrupted checkpoint; return its lineage.

    Every file the lineage lists must exist with the recorded size and sha256,
    so truncation and bit flips are both caught, naming the file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no checkpoint folder here")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing; not a complete checkpoint")
    lineage = _read_json(folder / LINEAGE_FILE)
    files = lineage.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CheckpointError(f"{folder / LINEAGE_FILE}: has no file hashes (\"files\") for {MODEL_FILE}")
    unlisted = sorted(name for name in folder_files(folder) if _loaded(name) and name not in files)
    if unlisted:
        raise CheckpointError(f"{folder / LINEAGE_FILE}: lists no hash for {', '.join(unlisted)}, which loading reads")
    for name, record in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(record, dict):
            raise CheckpointError(f"{folder / LINEAGE_FILE}: files[{name!r}] is not a file of the folder with its "
                                  "sha256 and bytes")
        _verify_file(folder / name, record)
    return lineage


def _loaded(name: str) -> bool:
    """Whether loading a checkpoint reads the file `name` (relative to its folder): what its
    manifest must vouch for. A model card written into the folder later need not be listed."""
    return name in _LOADED_FILES or name.startswith(f"{EXTRA_TEMPLATES_DIR}/")


def _verify_file(file: Path, record: dict[str, Any]) -> None:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing, but listed in {LINEAGE_FILE}")
    size = file.stat().st_size
    if size != record.get("bytes"):
        raise CheckpointError(
            f"{file}: {size} bytes, but {LINEAGE_FILE} records {record.get('bytes')} (truncated or replaced)"
        )
    if sha256_file(file) != record.get("sha256"):
        raise CheckpointError(f"{file}: sha256 does not match {LINEAGE_FILE} (corrupted)")


def load_checkpoint(path: str | Path, *, trainer_state: bool = True) -> Checkpoint:
    """Verify and read a checkpoint (weights on CPU).

    A run's latest checkpoint can be deleted while it is read, by the run's next save
    (`keep_last`): then `path` is resolved again and the newer one read, once, rather than
    the deletion reported as damage."""
    for _ in range(2):
        folder = resolve_checkpoint(path)
        step_folder = folder.resolve()  # itself, or the folder the `latest` link points at now
        was_there = step_folder.is_dir()
        try:  # from the step folder: a save can repoint `latest` between this read's file opens
            return replace(_read_checkpoint(step_folder, trainer_state), path=folder)
        except (CheckpointError, OSError) as err:
            if not was_there or step_folder.exists():  # never there, or damaged: not deleted midway
                if trainer_state and isinstance(err, CheckpointError):
                    raise _how_to_go_on(err, step_folder) from err
                raise
            failure = err
    raise CheckpointError(f"{folder}: removed by a newer save while it was read (the run is still saving); "
                          f"load {path} again") from failure


def _how_to_go_on(err: CheckpointError, folder: Path) -> CheckpointError:
    """`err` with the ways past it: a run resumes from its newest checkpoint, so a damaged one
    would stop every restart until it is moved away or the run starts over."""
    return CheckpointError(f"{err}; to resume from the checkpoint before it, move {folder} out of the run's "
                           "checkpoints folder; to start over, pass --no-resume (resume=False)")


def _read_checkpoint(folder: Path, trainer_state: bool) -> Checkpoint:
    lineage = verify_checkpoint(folder)
    config = read_config(folder)
    weights = _load_weights(folder / MODEL_FILE)
    _fill_aliases(weights, build_on_meta(config, {name: tuple(w.shape) for name, w in weights.items()},
                                         folder / MODEL_FILE))
    state = None
    if trainer_state and (folder / STATE_FILE).is_file():
        try:
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing here
            raise CheckpointError(f"{folder / STATE_FILE}: unreadable ({err})") from err
    return Checkpoint(path=folder, config=config, state_dict=weights, lineage=lineage, trainer_state=state)


def load_model_folder(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer | None]:
    """(model in eval mode, tokenizer or None) from a model folder or a run folder.

    The model is rebuilt from config.json alone (`ModelConfig.from_dict` then
    `Transformer`), so nothing about the code that trained it is needed.
    """
    ckpt = load_checkpoint(path, trainer_state=False)
    with torch.device("meta"):  # names and shapes first, before the config's sizes take any memory
        check_weights(Transformer(ckpt.config), ckpt.state_dict, source=ckpt.path / MODEL_FILE)
    model = Transformer(ckpt.config)
    load_weights(model, ckpt.state_dict, source=ckpt.path / MODEL_FILE)
    return model.to(device).eval(), load_tokenizer_if_present(ckpt.path)


def load_tokenizer_if_present(folder: Path, load: Callable[[Path], Tokenizer] = load_tokenizer) -> Tokenizer | None:
    """`load(folder)` when the folder holds a tokenizer.json, else None (a synthetic-data run's
    model has none). `load` is `load_tokenizer` for a Heron folder, `PretrainedTokenizer.load`
    for a Hugging Face one."""
    return load(folder) if (folder / TOKENIZER_FILE).is_file() else None


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], *, source: Path | str = "state dict") -> None:
    """Copy weights into a model, requiring every key and shape to match."""
    check_weights(model, weights, source=source)
    model.load_state_dict(weights, strict=True)


def check_weights(model: nn.Module, weights: dict[str, torch.Tensor], *, source: Path | str = "state dict") -> None:
    """Require every key and shape of `weights` to match `model` (which may be on the meta device)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: keys do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, model expects {tuple(expected[name].shape)}")
        if _kind(value.dtype) != _kind(expected[name].dtype):
            raise CheckpointError(f"{source}: {name} holds {value.dtype}, but the model's is {expected[name].dtype} "
                                  f"({_kind(expected[name].dtype)} numbers); the file was written for another model "
                                  "or altered: save or convert it again")


def non_finite_weights(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of `state` holding NaN or infinite values."""
    return [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def check_finite_source(model: nn.Module, source: str | Path, role: str) -> None:
    """CheckpointError naming the first NaN or infinite weight of a model loaded to be built on
    (quantised, distilled from): everything made from it would be NaN, and the errors that would
    stop the work later (a student's NaN loss at step 1) would blame its own learning rate."""
    bad = non_finite_weights(model.state_dict())
    if bad:
        raise CheckpointError(f"{role}: {source} holds NaN or infinite weights in {len(bad)} tensor(s) (first: "
                              f"{bad[0]}); a run that diverged saved them: use an earlier checkpoint of it")


def _kind(dtype: torch.dtype) -> str:
    """What a dtype's numbers are. Copying between widths of one kind (bf16 into fp32) is a
    conversion; copying across kinds (int32 bits into fp32) turns the weights into garbage."""
    if dtype.is_floating_point:
        return "floating-point"
    if dtype.is_complex:
        return "complex"
    return "boolean" if dtype == torch.bool else "integer"


def read_config(folder: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(_read_json(folder / CONFIG_FILE))
    except ValueError as err:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {err}") from err


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(file, device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err


def build_on_meta(config: ModelConfig, stored: Mapping[str, tuple[int, ...]], source: Path | str) -> Transformer:
    """The model `config` describes, on the meta device (no memory, no init), unless the stored
    tensors (name -> shape) show at once that they cannot fill it. A config.json asking for more
    layers than the files number blocks, or for position tables far larger than the weights,
    would otherwise take minutes to build or terabytes to allocate before any shape is compared;
    `check_weights` (names as the model's) or `check_parameter_count` (other names) does the rest."""
    numbers = [int(part) for name in stored for part in name.split(".") if _NUMBER.fullmatch(part)]
    numbered = 1 + max(numbers, default=-1)
    if config.n_layers > numbered:  # the highest number in a name bounds the layers (expert numbers count too)
        raise CheckpointError(f"{source}: the config asks for {config.n_layers} layers, but the weights number "
                              f"their parts up to {numbered}")
    with torch.device("meta"):
        model = Transformer(config)
    tables = sum(b.numel() * b.element_size() for b in model.buffers())
    if tables > max(4 * _numbers(stored), _TABLES_FLOOR):
        raise CheckpointError(f"{source}: max_seq_len {config.max_seq_len:,} asks for {tables:,} bytes of position "
                              "tables, more than the weights hold")
    return model


def check_parameter_count(model: nn.Module, stored: Mapping[str, tuple[int, ...]], source: Path | str) -> None:
    """Refuse a model with more parameters than the stored tensors (name -> shape) hold numbers,
    before it is allocated: a config.json that disagrees with weights named in another scheme."""
    parameters, numbers = sum(p.numel() for p in model.parameters()), _numbers(stored)
    if parameters > numbers:
        raise CheckpointError(f"{source}: the config describes {parameters:,} parameters, but the weights hold "
                              f"{numbers:,} numbers (check vocab_size, d_model, d_ff and n_layers)")


def _numbers(stored: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in stored.values())


def _fill_aliases(weights: dict[str, torch.Tensor], skeleton: Transformer) -> None:
    """Put tied aliases back (they were stored once), using the structure of a
    model built on the meta device."""
    for alias, source in tied_aliases(skeleton).items():
        if alias not in weights and source in weights:
            weights[alias] = weights[source]


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


# ----- checkpoints of a run --------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, *, keep_last: int, **folder_kwargs: Any) -> Path:
    """Write out_dir/checkpoints/step_N atomically, point `latest` at it, and
    delete all but the newest `keep_last` checkpoints."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    sweep_partial(root)
    folder = save_model_folder(root / checkpoint_name(step), model, **folder_kwargs)
    point_latest(root, folder.name)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        remove_folder(old)
    return folder


def point_latest(root: Path, name: str) -> None:
    """Make root/latest a relative symlink to root/name, replaced atomically, so
    `runs/x/checkpoints/latest` works as a folder path anywhere; a one-line
    pointer file where the filesystem has no symlinks."""
    tmp = root / _hidden_name("tmp", LATEST_FILE)
    try:
        tmp.symlink_to(name, target_is_directory=True)
    except OSError:
        write_text_atomic(root / LATEST_FILE, name + "\n")
        return
    os.replace(tmp, root / LATEST_FILE)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp folders are never listed)."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    Found by listing, not through the `latest` pointer: a crash between the
    folder's rename and the pointer's update must not lose that checkpoint.
    """
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def is_leftover(path: Path, name: str) -> bool:
    """Whether `path` is a temp or trash sibling that a save or deletion of `name` makes (`_hidden_name`)."""
    match = _LEFTOVER.fullmatch(path.name)
    return match is not None and match["name"] == name


def sweep_partial(root: Path, name: str | None = None, *, live_check: bool = True) -> None:
    """Delete the temp and trash siblings in `root` (those of `name` alone, given one) whose
    writer no longer runs: what killed saves and deletions left. A live writer's are its own.
    `live_check=False` deletes them all, for a caller that knows no writer runs (a run holding
    its folder's lock): a killed writer's pid may be a live process's by now (pid 1 in containers).

    One is finished instead: a replacement killed between moving the old folder aside and
    renaming its new one in (`_move_in`) left nothing at the name, but a complete temp (fsynced
    before the old folder moved) beside that trash; it is renamed into place, the newer copy."""
    if not root.is_dir():
        return
    def writing(pid: str | None) -> bool:  # None: a name from before names carried the pid
        return live_check and pid is not None and process_alive(int(pid))

    matches = ((path, _LEFTOVER.fullmatch(path.name)) for path in root.iterdir())
    found = {path: match["name"] for path, match in matches  # {leftover: its target}
             if match and name in (None, match["name"]) and not writing(match["pid"])}
    for path, target in found.items():
        moved_aside = f".trash-{path.name.removeprefix('.tmp-')}-"
        if (path.name.startswith(".tmp-") and not os.path.lexists(root / target)
                and any(other.name.startswith(moved_aside) for other in found)):
            os.replace(path, root / target)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            path.unlink()


def weights_identity(path: str | Path) -> str:
    """What a checkpoint's weights hold, cheaply, for a resumed run to check its inputs against:
    the sha256 its lineage records; for a folder without lineage (Hugging Face's), the names,
    sizes and modification times of its weight files (hashing gigabytes at every start would
    cost more than the check is worth)."""
    folder = resolve_checkpoint(path)
    recorded = model_hash(folder)
    if recorded is not None:
        return recorded
    files = sorted(p for pattern in _WEIGHT_FILES for p in folder.glob(pattern))
    listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return "files:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def resolve_checkpoint(path: str | Path) -> Path:
    """A model folder given itself, a run folder (its latest checkpoint; an alignment run's
    one model), a checkpoints folder, or `latest`."""
    path = Path(path)
    if path.name == LATEST_FILE and os.path.lexists(path):  # the pointer itself; a link reads as its folder
        target = _pointed_at(path)
        if target is None:
            return _newest(path.parent.parent, path)
        return path if path.is_symlink() else target
    if (path / CONFIG_FILE).exists() or not path.exists():
        return path
    if path.is_file():
        raise CheckpointError(f"{path}: a file, not a checkpoint folder (a model is a folder with {CONFIG_FILE}; "
                              "GGUF files are written by `heron convert to-gguf`, not read)")
    for root in (path, path / CHECKPOINTS_DIR):
        target = _pointed_at(root / LATEST_FILE)
        if target is not None:
            return target
    if (path / RUN_MODEL_DIR / CONFIG_FILE).exists():
        return path / RUN_MODEL_DIR
    return _newest(path.parent if path.name == CHECKPOINTS_DIR else path, path)


def _pointed_at(pointer: Path) -> Path | None:
    """The step folder a `latest` pointer (a symlink or a file naming it) names, while that
    folder is there; None without a pointer, or for one left naming a step deleted since (by
    hand, or by another run's `keep_last`), which `resolve_checkpoint` passes over for listing."""
    if pointer.is_symlink():
        target = pointer.parent / os.readlink(pointer)  # the step folder itself, not the link
    elif pointer.is_file():
        target = pointer.parent / pointer.read_text().strip()
    else:
        return None
    return target if (target / CONFIG_FILE).exists() else None


def _newest(run: Path, asked: Path) -> Path:
    latest = latest_checkpoint(run)
    if latest is None:
        raise CheckpointError(f"{asked / CONFIG_FILE}: missing, and {asked} holds no checkpoints")
    return latest


def _heron_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("heron")
    except PackageNotFoundError:
        return "unknown"


__all__ = [
    "Checkpoint", "CheckpointError", "RUN_MODEL_DIR", "atomic_folder", "base_lineage", "build_on_meta",
    "check_finite_source", "check_parameter_count", "check_parents", "check_weights", "checkpoint_name",
    "folder_files", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "load_model_folder",
    "load_tokenizer_if_present", "load_weights", "non_finite_weights", "point_latest", "refuse_finished",
    "remove_folder", "require_new_folder", "require_replaceable", "resolve_checkpoint", "save_checkpoint",
    "save_model_folder", "sha256_file", "sweep_partial", "tied_aliases", "verify_checkpoint", "weights_identity",
]
