"""Alignment recipes: YAML files validated into config objects, as training recipes are.

    heron align dpo my-dpo.yaml --set preference.beta=0.2

The method is the command's; the recipe says what to start from (`base`, a
Heron checkpoint or Hugging Face folder with its tokenizer), where the data
come from (the synthetic task, or a JSONL file: chats for sft, prompt/chosen/
rejected pairs for rm and the DPO family, prompts for ppo and grpo), and the
settings of each method. Unknown or invalid fields fail before any work
starts, naming the dotted field.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, get_type_hints

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from heron.align.grpo import GRPOSettings
from heron.align.loop import FitSettings
from heron.align.ppo import PPOSettings
from heron.train.recipe import RecipeError, RecipeSection, check_not_bool, describe_validation_error, read_recipe_yaml

METHODS = ("sft", "rm", "dpo", "ppo", "grpo")
SETTINGS = {"ppo": PPOSettings, "grpo": GRPOSettings}  # the recipe sections that hold a settings class's fields


class TaskSection(RecipeSection):
    """The synthetic say-the-word task (`align.synthetic.RepeatTask`)."""

    kind: Literal["repeat"] = "repeat"
    n: int = Field(default=512, gt=1)  # chats, pairs or prompts to generate
    seed: int = 0
    target: int = Field(default=3, gt=0)
    max_count: int = Field(default=5, gt=0)


class DataSection(RecipeSection):
    task: TaskSection | None = None
    file: str | None = None  # JSONL: chats (sft), prompt/chosen/rejected (rm, dpo), {"prompt"} rows (ppo, grpo)
    max_len: int = Field(default=128, gt=1)

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if (self.task is None) == (self.file is None):
            raise ValueError("set exactly one of data.task or data.file")
        return self


class FitSection(RecipeSection):
    steps: int = Field(default=300, gt=0)
    batch_size: int = Field(default=16, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=3e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    clip_norm: float = Field(default=1.0, gt=0)
    seed: int = 0


# Each loss's strength when the recipe names none, at its paper's scale: DPO's beta on summed log-prob
# ratios, IPO's tau, ORPO's lambda (Hong et al. 2024: 0.1), and SimPO's beta on per-token mean
# log-probs, which are ~20x smaller, so 2.0 (Meng et al. 2024 tune it in 2.0-2.5 and gamma in 0.3-1.6).
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}
SIMPO_GAMMA = 0.5  # SimPO's target reward margin gamma, when the recipe names none


class PreferenceSection(RecipeSection):
    """`beta` is each loss's one strength: DPO's and SimPO's beta, IPO's tau, ORPO's lambda
    (unset: DEFAULT_BETA of the loss); `gamma` is SimPO's target margin, for SimPO alone.
    `sft_weight` is the NLL anchor on the chosen reply (Pang et al. 2024; 0 is pure DPO),
    1 by default; ORPO's loss holds that term itself, so for ORPO it is 0 and may not be set."""

    loss: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"
    beta: float | None = Field(default=None, gt=0)  # None: DEFAULT_BETA[loss] (the validator below)
    gamma: float | None = Field(default=None, ge=0)  # None: SIMPO_GAMMA with loss simpo
    sft_weight: float | None = Field(default=None, ge=0)  # None: 1, or 0 for ORPO (the validator below)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        loss = values.get("loss", "dpo")
        orpo, simpo = loss == "orpo", loss == "simpo"
        if values.get("gamma") is not None and not simpo:
            raise ValueError(f"gamma: SimPO's target margin; loss {loss!r} has none, so leave preference.gamma unset")
        if orpo and values.get("sft_weight") not in (None, 0):
            raise ValueError("sft_weight: ORPO's loss already holds the chosen reply's NLL; leave "
                             "preference.sft_weight unset (or 0) with loss: orpo")
        defaults = {"beta": DEFAULT_BETA.get(loss), "gamma": SIMPO_GAMMA if simpo else None,
                    "sft_weight": 0.0 if orpo else 1.0}
        return {**values, **{key: value for key, value in defaults.items() if values.get(key) is None}}


class AlignRecipe(RecipeSection):
    name: str
    out_dir: str
    base: str
    data: DataSection
    reward: str = "judge"  # ppo and grpo: "judge" (the task's) or a reward-model checkpoint folder
    fit: FitSection = Field(default_factory=FitSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    ppo: dict[str, Any] = Field(default_factory=dict)  # PPOSettings fields
    grpo: dict[str, Any] = Field(default_factory=dict)  # GRPOSettings fields
    save_every: int = Field(default=50, ge=0)  # steps between saved states a killed run resumes from; 0: none

    @model_validator(mode="before")
    @classmethod
    def _typed_settings(cls, values: Any) -> Any:
        """ppo and grpo held as their settings' types (`_checked`), not as YAML gave them: the
        lineage and a run's resume identity dump the recipe, and a recipe saying "1e-5" (quoted,
        a string) and one saying 0.00001 are one run, both recording the number 1e-05."""
        if not isinstance(values, dict):
            return values
        typed = {section: _checked(settings, values[section], section)
                 for section, settings in SETTINGS.items() if isinstance(values.get(section), dict)}
        return {**values, **typed}

    def fit_settings(self) -> FitSettings:
        return FitSettings(**self.fit.model_dump(), progress=True)

    def ppo_settings(self) -> PPOSettings:
        return _settings(PPOSettings, self.ppo, "ppo")

    def grpo_settings(self) -> GRPOSettings:
        return _settings(GRPOSettings, self.grpo, "grpo")


def _settings(cls: type, values: dict[str, Any], section: str) -> Any:
    return cls(**_checked(cls, values, section))


def _checked(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """`values` as the types of cls's fields (`_typed`), once cls accepts them (its ranges); a
    RecipeError naming the dotted field when it does not, or when a field is unknown."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RecipeError(f"{section}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    typed = _typed(cls, values, section)
    try:
        cls(**typed)
    except (TypeError, ValueError) as err:
        raise _section_error(section, err, known) from err
    return typed


def _typed(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """`values` as the types of cls's fields, by pydantic's lax rules as the recipe's own sections
    are: a quoted "1e-5" is 1e-05, "3" or 3.0 the int 3, 3.5 no int, `true` no number. A value
    that is none of its type is a RecipeError naming it."""
    types = get_type_hints(cls)
    typed = {}
    for name, value in values.items():
        try:
            check_not_bool(types[name], value)
            typed[name] = TypeAdapter(types[name]).validate_python(value)
        except ValidationError as err:
            raise RecipeError(f"{section}.{name}: {err.errors()[0]['msg']} (got {value!r})") from None
        except ValueError as err:
            raise RecipeError(f"{section}.{name}: {err}") from None
    return typed


def _section_error(section: str, err: Exception, known: set[str]) -> RecipeError:
    """A settings class's `field: problem` as the recipe's dotted `section.field: problem`."""
    field, sep, rest = str(err).partition(": ")
    return RecipeError(f"{section}.{field}: {rest}" if sep and field in known else f"{section}: {err}")


def load_align_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> AlignRecipe:
    """Read and validate a YAML recipe with `a.b=value` overrides; errors name the dotted field."""
    try:
        recipe = AlignRecipe.model_validate(read_recipe_yaml(path, overrides))
    except ValidationError as err:
        raise RecipeError(_described(err)) from None
    try:
        recipe.fit_settings()  # ppo and grpo were checked as the recipe was (_typed_settings)
    except ValueError as err:
        raise _section_error("fit", err, {f.name for f in dataclasses.fields(FitSettings)}) from None
    return recipe


def _described(err: ValidationError) -> str:
    """The message of a RecipeError a validator raised (`_checked`'s: it names the dotted field
    already, and pydantic would prefix "Value error, "), else each problem by its dotted field."""
    raised = [problem["ctx"]["error"] for problem in err.errors()
              if isinstance(problem.get("ctx", {}).get("error"), RecipeError)]
    return str(raised[0]) if raised else describe_validation_error(err)


__all__ = ["METHODS", "AlignRecipe", "load_align_recipe"]
