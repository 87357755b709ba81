"""Training recipes: a YAML file validated into one frozen `TrainRecipe`.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key is
an error, and every error names the dotted field it is about
(`train.stepz: unknown field`). `load_recipe` applies `--set a.b=value`
overrides to the raw YAML before validation, and then checks what pydantic
cannot see alone: that the model config builds, and that the global batch
splits evenly over processes and micro-batches. All of it happens before any
weights are allocated.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from heron.core.config import ModelConfig


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the dotted field."""


# numpy's global seeding (`np.random.seed`, which a run calls) takes 0 .. 2**32 - 1 only.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


class RecipeSection(BaseModel):
    """A section of a training or alignment recipe: frozen and strict about keys; lax about
    scalar types ("3" is 3, a quoted "3e-4" is 0.0003) but for booleans given to numbers, which
    pydantic would read as 1 and 0 (`check_not_bool`). Numbers must be finite: `.inf` reads
    as a float in YAML, and an infinite rate trains to NaN."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        check_not_bool(cls.model_fields[info.field_name].annotation, value)
        return value


def check_not_bool(annotation: Any, value: Any) -> None:
    """ValueError for `true` or `false` given to a field of numbers only: pydantic's lax
    rules (and Python's, bool being an int) read them as 1 and 0, so `--set train.steps=true`
    ran one step."""
    kinds = _kinds(annotation)
    if isinstance(value, bool) and kinds & {int, float} and bool not in kinds:
        raise ValueError("expected a number, not a boolean" + (" (null for none)" if type(None) in kinds else ""))


def _kinds(annotation: Any) -> set[Any]:
    """The plain types an annotation admits: int for Annotated[int, ...], {float, None} for float | None."""
    if get_origin(annotation) is Annotated:
        return _kinds(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return set().union(*(_kinds(arg) for arg in get_args(annotation)))
    return {annotation}


class ModelSection(RecipeSection):
    """A preset from `heron.models.presets` plus field overrides.

    `vocab_size` follows the data's tokenizer unless an override pins it.
    """

    preset: str = "test"
    overrides: dict[str, Any] = Field(default_factory=dict)


class SyntheticData(RecipeSection):
    """Generated tokens with a known answer, for tests and smoke runs.

    kind="permutation": a fixed random permutation of the vocabulary, repeated;
    each token determines the next, so a model that learns it reaches ~0 loss.
    """

    kind: Literal["permutation"] = "permutation"
    vocab_size: int = Field(default=64, gt=1)
    n_tokens: int = Field(default=65536, gt=0)
    seed: Seed = 0


class DataSection(RecipeSection):
    """Where tokens come from: exactly one of `shards` or `synthetic`.

    With `corpus` set, a `shards` folder without shards is prepared first:
    the corpus ("default" = the Python standard library, or a list of files,
    folders and globs) is tokenised with `tokenizer` (default
    <shards>/tokenizer.json), which is trained with `vocab_size` if missing.
    """

    shards: str | None = None  # a folder written by heron.data.shards.prepare_shards
    corpus: Literal["default"] | list[str] | None = None
    tokenizer: str | None = None
    vocab_size: int = Field(default=8192, gt=0)  # only for training a missing tokenizer
    split_seed: int = 0  # the data layer's train/val split seed
    synthetic: SyntheticData | None = None
    seq_len: int = Field(default=256, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if self.shards is not None and self.synthetic is not None:
            raise ValueError("set one of data.shards or data.synthetic, not both")
        if self.corpus is not None and self.shards is None:
            raise ValueError("data.corpus needs data.shards: the folder to tokenise it into")
        return self


class OptimSection(RecipeSection):
    """AdamW (Loshchilov & Hutter 2019); see optim.py for parameter groups."""

    lr: float = Field(default=3e-4, gt=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    weight_decay: float = Field(default=0.1, ge=0)
    eps: float = Field(default=1e-8, gt=0)
    fused: bool | None = None  # None: fused kernel where torch supports it


class ScheduleSection(RecipeSection):
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr` (or constant)."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(default=100, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)


class TrainSection(RecipeSection):
    """Loop settings. `batch_size` is global, in sequences, per optimizer step."""

    steps: int = Field(default=1000, gt=0)
    batch_size: int = Field(default=32, gt=0)
    micro_batch: int | None = Field(default=None, gt=0)  # sequences per forward per process
    grad_accum: int | None = Field(default=None, gt=0)  # forwards per step per process
    clip_norm: float | None = Field(default=1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    threads: int | None = Field(default=None, gt=0)  # CPU threads for torch; None: torch's default
    seed: Seed = 0
    eval_every: int = Field(default=100, ge=0)  # 0: only at the end
    eval_batches: int = Field(default=8, gt=0)
    ckpt_every: int = Field(default=200, ge=0)  # 0: only at the end
    keep_last: int = Field(default=3, gt=0)
    log_every: int = Field(default=10, gt=0)
    progress: bool = True


class TrainRecipe(RecipeSection):
    """A whole training run."""

    name: str = "run"
    out_dir: str = "runs/run"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)  # none: train(data=...) gives the streams
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection = Field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; `TrainRecipe.model_validate` reads it back."""
        return self.model_dump(mode="json")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                *, world_size: int | None = None) -> TrainRecipe:
    """Read a YAML recipe, apply `a.b=value` overrides, validate everything.

    world_size defaults to $WORLD_SIZE (set by torchrun), else 1.
    """
    return recipe_from_dict(read_recipe_yaml(path, overrides), world_size=world_size)


def read_recipe_yaml(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML recipe as a raw mapping, with `a.b=value` overrides applied (not yet validated)."""
    path = Path(path)
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise RecipeError(f"{path}: cannot read recipe: {err}") from err
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: cannot read recipe: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return raw


class _RepeatedKey(yaml.constructor.ConstructorError):
    """A mapping that gives one key twice."""


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (see `_unique_keys_map`)."""


def _unique_keys_map(loader: _RecipeLoader, node: yaml.MappingNode) -> Iterator[dict[Any, Any]]:
    """A mapping, refusing a repeated key: PyYAML keeps the last silently, so a second `train:`
    section would drop every setting of the first. Keys a `<<` merge brings in may be overridden."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        with suppress(TypeError):  # an unhashable key: construct_yaml_map says so
            if key in seen:
                raise _RepeatedKey(
                    None, None, f"{key!r} is given twice in one mapping; keep one (only the last would count)",
                    key_node.start_mark)
            seen.add(key)
    yield from loader.construct_yaml_map(node)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys_map)
# YAML 1.1 (PyYAML's) needs a dot in a float, so `1e-5` read as the string "1e-5", which the
# pydantic sections took as a number but `model.overrides` (ModelConfig, strict) refused;
# YAML 1.2 reads it as the float the user meant, and so do recipes.
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def _load_yaml(text: str) -> Any:
    """YAML text as Python values, safely, refusing repeated keys."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def recipe_from_dict(raw: dict[str, Any], *, world_size: int | None = None) -> TrainRecipe:
    """Validate a raw mapping into a recipe; errors name the dotted field."""
    try:
        recipe = TrainRecipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(describe_validation_error(err)) from None
    check_recipe(recipe, world_size=world_size)
    return recipe


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a raw recipe mapping; the value is read as YAML."""
    path, sep, text = item.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise RecipeError(f"--set {item!r}: expected dotted.path=value")
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if child is None:  # an unset optional section, e.g. data.synthetic
            child = node[key] = {}
        if not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise RecipeError(f"{path}: {where} is a value, not a section")
        node = child
    try:
        node[keys[-1]] = _load_yaml(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or err
        if isinstance(err, _RepeatedKey):  # no quoting mends it
            raise RecipeError(f"--set {item!r}: {problem}") from None
        raise RecipeError(f"--set {item!r}: not valid YAML ({problem}); quote a text value: "
                          f"--set '{path}=\"...\"'") from None


def check_recipe(recipe: TrainRecipe, *, world_size: int | None = None,
                 vocab_size: int | None = None) -> None:
    """Cross-field checks: the model builds, fits the sequence length, and the
    batch splits evenly over processes and micro-batches."""
    config = model_config(recipe, vocab_size)
    if recipe.data.seq_len > config.max_seq_len:
        raise RecipeError(
            f"data.seq_len: {recipe.data.seq_len} exceeds the model's max_seq_len {config.max_seq_len}"
            " (set model.overrides.max_seq_len)"
        )
    batch_plan(recipe.train, world_size)


def model_config(recipe: TrainRecipe, vocab_size: int | None = None) -> ModelConfig:
    """The recipe's ModelConfig; `vocab_size` (from the data) fills the preset's
    unless the recipe overrides it, in which case it must cover the data."""
    from heron.models import preset_config  # models sits above core; imported late

    overrides = dict(recipe.model.overrides)
    pinned = overrides.get("vocab_size")
    if vocab_size is not None and pinned is None:
        overrides["vocab_size"] = vocab_size
    if vocab_size is not None and isinstance(pinned, int) and pinned < vocab_size:
        raise RecipeError(f"model.overrides.vocab_size: {pinned} is smaller than the data's vocabulary ({vocab_size})")
    try:
        return preset_config(recipe.model.preset, **overrides)
    except KeyError as err:
        raise RecipeError(f"model.preset: {err.args[0] if err.args else recipe.model.preset}") from None
    except ValueError as err:  # ModelConfig's messages start with the field name
        raise RecipeError(f"model.overrides.{err}") from None


def batch_plan(train: TrainSection, world_size: int | None = None) -> tuple[int, int, int]:
    """(world_size, micro_batch, grad_accum) with micro * accum * world == batch_size.

    world_size defaults to $WORLD_SIZE (set by torchrun), else 1.
    """
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if train.parallel == "none" and world > 1:
        raise RecipeError(f"train.parallel: 'none' but {world} processes were launched; use ddp or fsdp")
    if train.batch_size % world:
        raise RecipeError(f"train.batch_size: {train.batch_size} does not split over {world} processes")
    per_rank = train.batch_size // world
    micro, accum = train.micro_batch, train.grad_accum
    if micro is not None and per_rank % micro:
        raise RecipeError(f"train.micro_batch: {micro} does not divide the {per_rank} sequences per process"
                          f" (train.batch_size {train.batch_size} over {world} processes)")
    if accum is not None and per_rank % accum:
        raise RecipeError(f"train.grad_accum: {accum} does not divide the {per_rank} sequences per process"
                          f" (train.batch_size {train.batch_size} over {world} processes)")
    micro = micro or per_rank // (accum or 1)
    accum = accum or per_rank // micro
    if micro * accum != per_rank:
        raise RecipeError(f"train.batch_size: {train.batch_size} != micro_batch {micro} x grad_accum {accum}"
                          f" x {world} processes")
    return world, micro, accum


def describe_validation_error(err: ValidationError) -> str:
    """One line per problem, each starting with the dotted field name."""
    lines = []
    for problem in err.errors():
        field = ".".join(str(part) for part in problem["loc"])
        message = "unknown field" if problem["type"] == "extra_forbidden" else problem["msg"]
        if "input" in problem and problem["type"] != "extra_forbidden":
            message += f" (got {problem['input']!r})"
        lines.append(f"{field or 'recipe'}: {message}")
    return "\n".join(lines)


def setting_changes(name: str, old: Any, new: Any, shown: int = 3) -> str:
    """What differs between two settings (dicts or pydantic models), by dotted key, the first
    `shown` named: "model.d_model: 64, now 128; ...; and 2 more"; "" when nothing does."""
    changes = _changes(name, old, new)
    more = f"; and {len(changes) - shown} more" if len(changes) > shown else ""
    return "; ".join(changes[:shown]) + more


def _changes(name: str, old: Any, new: Any) -> list[str]:
    old, new = (v.model_dump() if hasattr(v, "model_dump") else v for v in (old, new))
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in sorted(old.keys() | new.keys(), key=str)
                for change in _changes(f"{name}.{key}", old.get(key), new.get(key))]
    return [] if old == new else [f"{name}: {_short(old)}, now {_short(new)}"]


def _short(value: Any, width: int = 48) -> str:
    """repr(value) cut to `width`; a string keeps its end, where paths (run_a/step_100) differ."""
    text = repr(value)
    if len(text) <= width:
        return text
    return "..." + text[3 - width:] if isinstance(value, str) else text[:width - 3] + "..."


__all__ = [
    "DataSection", "ModelSection", "OptimSection", "RecipeError", "RecipeSection", "ScheduleSection",
    "SyntheticData", "TrainRecipe", "TrainSection", "apply_override", "batch_plan", "check_not_bool",
    "check_recipe", "load_recipe", "model_config", "recipe_from_dict", "setting_changes",
]
