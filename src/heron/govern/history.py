"""A checkpoint's history, read from lineage.json files: what made it, from what, with which data.

    history = read_history("runs/demo/align/dpo/model")
    for stage in history.stages:        # newest first: dpo, then sft, then the pre-trained step
        print(stage.kind.name, stage.path, stage.parent)

Every writer of checkpoints records its own kind of lineage (train/loop.py
`_lineage`, align/run.py, compress/quantize_checkpoint.py and
prune_checkpoint.py, compress/distill.py, interop/convert.py); `STAGE_KINDS`
says, as data, how each one names the checkpoint it was made from and where
it keeps its energy record. A stage's parent is followed while its folder
still holds a readable lineage.json; the first one that does not (moved or
deleted) ends the history and is kept as `History.unreadable`. An import ends
it too: its parent is a Hugging Face folder, which the import's own lineage
describes (model type, file hashes). So does a stage made straight from a
Hugging Face folder (quantised or pruned without an import): the folder is
kept as `History.hugging_face`, an origin outside Heron, not a lost one.

Only JSON is read here: nothing model-specific is imported, so the model
card and the Annex IV document can be written without torch.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heron.govern.digest import CONFIG_FILE, LINEAGE_FILE, MODEL_FILE

MAX_STAGES = 64  # a longer chain is more likely a loop of copied folders than a real history


@dataclass(frozen=True)
class StageKind:
    """One kind of stage that writes a checkpoint, and where its lineage keeps what a card needs."""

    name: str
    marker: tuple[str, ...]  # the lineage key that identifies this kind
    parent: tuple[str, ...] | None  # the keys to the path of the checkpoint it was made from
    energy: tuple[str, ...] | None  # the keys to its EnergyReport.to_dict()
    made: str  # how it relates to its parent, in prose: "<this> was <made> <parent>"
    training_type: str  # the Hugging Face co2_eq_emissions training_type
    follow: bool = True  # whether the parent is a Heron checkpoint whose lineage continues the history


# Recognised in this order: a distillation is also a training run (it has a
# top-level "recipe"), so it comes before "pretrain".
STAGE_KINDS = (
    StageKind("alignment", ("alignment",), ("alignment", "base"), ("alignment", "energy"),
              "fine-tuned (aligned) from", "fine-tuning"),  # align/run.py
    StageKind("distillation", ("distillation",), ("distillation", "teacher"), ("energy",),
              "trained on the outputs of the teacher", "pre-training (knowledge distillation)"),  # compress/distill.py
    StageKind("pretrain", ("recipe",), None, ("energy",), "", "pre-training"),  # train/loop.py
    StageKind("quantization", ("quantized_from",), ("quantized_from",), ("energy",),
              "quantized from", "post-training quantization"),  # compress/quantize_checkpoint.py
    StageKind("pruning", ("pruned_from",), ("pruned_from",), ("pruning", "energy"),
              "pruned from", "post-training pruning"),  # compress/prune_checkpoint.py
    StageKind("import", ("source",), ("source", "path"), None,
              "converted from the Hugging Face folder", "conversion", follow=False),  # interop/convert.py
)
SAVED = StageKind("saved", (), None, None, "", "")  # a model folder saved by code, with versions and hashes only


def lookup(record: dict[str, Any], keys: tuple[str, ...] | None) -> Any:
    """record[k0][k1]...; None when any key is missing (or keys is None)."""
    if keys is None:
        return None
    value: Any = record
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


@dataclass(frozen=True)
class Stage:
    """One checkpoint: its folder, lineage and config, and the kind of stage that wrote it."""

    path: Path
    lineage: dict[str, Any]
    config: dict[str, Any]

    @property
    def kind(self) -> StageKind:
        return next((k for k in STAGE_KINDS if lookup(self.lineage, k.marker) is not None), SAVED)

    @property
    def parent(self) -> str | None:
        """The path of the checkpoint this one was made from, as the lineage recorded it."""
        value = lookup(self.lineage, self.kind.parent)
        return str(value) if value is not None else None

    @property
    def energy(self) -> dict[str, Any] | None:
        """The stage's energy record (EnergyReport.to_dict()), if it kept one."""
        value = lookup(self.lineage, self.kind.energy)
        return value if isinstance(value, dict) and "joules" in value else None

    @property
    def model_sha256(self) -> str | None:
        """The weights' sha256, from the lineage's file manifest: the model's version."""
        return lookup(self.lineage, ("files", MODEL_FILE, "sha256"))

    @property
    def val_loss(self) -> float | None:
        """Mean next-token cross-entropy (nats) on the validation windows, for a training stage.
        train/loop.py `evaluate` scores plain cross-entropy even when a distillation trains on another loss."""
        value = lookup(self.lineage, ("metrics", "val_loss"))
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


@dataclass(frozen=True)
class HuggingFaceOrigin:
    """A Hugging Face folder a stage was made from directly: third-party weights whose history Heron lacks."""

    path: str  # as the stage's lineage recorded it
    model_type: str


@dataclass(frozen=True)
class History:
    """A checkpoint and the checkpoints it was made from, newest first."""

    stages: tuple[Stage, ...]
    unreadable: str | None = None  # the recorded path of the first ancestor that could not be read
    why_unreadable: str | None = None
    hugging_face: HuggingFaceOrigin | None = None  # the oldest stage's parent, when it is a Hugging Face folder

    @property
    def model(self) -> Stage:
        return self.stages[0]

    @property
    def training(self) -> Stage | None:
        """The newest stage that trained on a token stream (pre-training or distillation): it holds the data."""
        return next((s for s in self.stages if s.kind.name in ("pretrain", "distillation")), None)

    @property
    def imported(self) -> Stage | None:
        """The stage that converted third-party weights, if the history reaches one."""
        return next((s for s in self.stages if s.kind.name == "import"), None)


def load_json(file: Path) -> Any:
    """Any JSON value; invalid JSON, or bytes that are not UTF-8, is a ValueError naming the file."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object (lineage.json, config.json)."""
    value = load_json(file)
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def read_stage(folder: str | os.PathLike[str]) -> Stage:
    """The checkpoint in `folder`; an error naming the folder when it is not a Heron checkpoint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    for name in (LINEAGE_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            hint = " (a Hugging Face folder? `heron convert from-hf` makes a Heron checkpoint of it)" \
                if name == LINEAGE_FILE and (folder / CONFIG_FILE).is_file() else ""
            raise FileNotFoundError(f"{folder}: not a Heron checkpoint: it has no {name}{hint}")
    return Stage(folder, read_json(folder / LINEAGE_FILE), read_json(folder / CONFIG_FILE))


def hugging_face_model_type(folder: Path) -> str | None:
    """The `model_type` of a Hugging Face folder (a config.json that names one, and no lineage.json); else None."""
    if (folder / LINEAGE_FILE).exists():
        return None
    try:
        model_type = read_json(folder / CONFIG_FILE).get("model_type")
    except (OSError, ValueError):
        return None
    return model_type if isinstance(model_type, str) else None


def read_history(folder: str | os.PathLike[str], *, resolve: Callable[[Path], Path] = Path) -> History:
    """The checkpoint in `folder` and, through its lineage, those it was made from.

    `resolve` maps a recorded parent path to a checkpoint folder (the CLI
    passes train/checkpoint.py's `resolve_checkpoint`, which also accepts run
    folders); the default takes the path as it is.
    """
    stages = [read_stage(folder)]
    seen = {stages[0].path.resolve()}
    while stages[-1].kind.follow and (recorded := stages[-1].parent) is not None:
        if len(stages) >= MAX_STAGES:
            return History(tuple(stages), recorded, f"the history is longer than {MAX_STAGES} stages")
        try:
            stage = read_stage(_fixed_place(Path(recorded), resolve))
        except (OSError, ValueError) as err:
            if (model_type := hugging_face_model_type(Path(recorded))) is not None:
                return History(tuple(stages), hugging_face=HuggingFaceOrigin(recorded, model_type))
            return History(tuple(stages), recorded, str(err))
        if stage.path.resolve() in seen:
            return History(tuple(stages), recorded, "it is already in this history (a loop)")
        seen.add(stage.path.resolve())
        stages.append(stage)
    return History(tuple(stages))


def _fixed_place(recorded: Path, resolve: Callable[[Path], Path]) -> Path:
    """The checkpoint folder a recorded parent path names, if it names one folder for good: an
    absolute path to the folder itself, which `resolve` takes as it is (folders above it may
    since have become links: a moved disk still holds that folder). Heron records parents so;
    older versions recorded the path as typed, and a relative path, a `latest` link or a run
    folder (whose newest checkpoint `resolve` takes) may lead elsewhere now than when the child
    was made: a ValueError, so the history stops there instead of naming the wrong parent."""
    found = resolve(recorded)
    if recorded.is_absolute() and not recorded.is_symlink() and found.resolve() == recorded.resolve():
        return found
    if not recorded.exists():
        raise FileNotFoundError(f"{recorded}: no such checkpoint folder")
    now = "" if found.resolve() == recorded.absolute() else f" (it now leads to {found.resolve()})"
    raise ValueError(f"recorded as {recorded}, a relative path, a link or a run folder{now}, which names whatever "
                     "checkpoint is there now, not necessarily the one this was made from (Heron records the "
                     "checkpoint folder itself; this lineage is older)")


# ----- data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataFacts:
    """What a lineage says about a stage's data, for the card's YAML and its tables."""

    name: str  # a short identifier: the shard folder's name, "synthetic-permutation", a file's stem
    rows: tuple[tuple[str, str], ...]  # (field, value) as recorded: hashes, sizes, splits
    revision: str | None = None  # a hash that pins the data (corpus fingerprint, stream sha256)
    notes: tuple[str, ...] = field(default=())


def slug(text: str) -> str:
    """A Hub-style identifier: letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "data"


def training_data(stage: Stage) -> DataFacts | None:
    """The token stream a training stage read (train/sources.py `TrainData.meta`)."""
    data = stage.lineage.get("data")
    if not isinstance(data, dict):
        return None
    if data.get("source") == "synthetic":
        rows = tuple((k, _text(data[k])) for k in ("kind", "vocab_size", "n_tokens", "seed", "sha256") if k in data)
        return DataFacts(slug(f"synthetic-{data.get('kind', 'stream')}"), rows, data.get("sha256"),
                         ("Generated in code by Heron (train/sources.py); contains no personal data.",))
    keys = ("path", "corpus_fingerprint", "tokenizer_sha256", "vocab_size", "train_tokens", "val_tokens",
            "split", "dtype", "shard_tokens")
    rows = tuple((k, _text(data[k])) for k in keys if k in data)
    skipped = data.get("skipped_files") or []
    notes = (f"{len(skipped)} undecodable (non-UTF-8) file(s) skipped when tokenising.",) if skipped else ()
    name = slug(Path(str(data["path"])).name) if "path" in data else "shards"
    return DataFacts(name, rows, data.get("corpus_fingerprint"), notes)


def alignment_data(stage: Stage) -> DataFacts | None:
    """The prompts, chats or pairs an alignment stage read (align/recipe.py `DataSection`)."""
    data = lookup(stage.lineage, ("alignment", "recipe", "data"))
    if not isinstance(data, dict):
        return None
    if data.get("task"):
        task = data["task"]
        rows = tuple((f"task.{k}", _text(v)) for k, v in task.items()) + (("max_len", _text(data.get("max_len"))),)
        return DataFacts(slug(f"synthetic-{task.get('kind', 'task')}-task"), rows, None,
                         ("Generated in code by Heron (align/synthetic.py); contains no personal data.",))
    file = str(data.get("file"))
    return DataFacts(slug(Path(file).stem), (("file", file), ("max_len", _text(data.get("max_len")))), None,
                     ("The lineage records the file's path but no hash of its contents.",))


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)


__all__ = ["CONFIG_FILE", "LINEAGE_FILE", "SAVED", "STAGE_KINDS", "DataFacts", "History", "HuggingFaceOrigin", "Stage",
           "StageKind", "alignment_data", "hugging_face_model_type", "load_json", "lookup", "read_history", "read_json",
           "read_stage", "slug", "training_data"]
