"""Recipes: every shipped YAML validates; every mistake names its field."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from heron.cli.options import DEMO_RECIPE
from heron.core.moe import MoE
from heron.train.recipe import RecipeError, batch_plan, load_recipe, model_config, recipe_from_dict

RECIPES = sorted((Path(__file__).parents[2] / "src" / "heron" / "recipes").glob("*.yaml"))
MINIMAL = "data:\n  synthetic: {vocab_size: 16}\n  seq_len: 8\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads_and_builds_its_model(path: Path) -> None:
    recipe = load_recipe(path, world_size=1)
    config = model_config(recipe, vocab_size=recipe.data.synthetic.vocab_size if recipe.data.synthetic else None)
    assert config.n_layers > 0
    assert batch_plan(recipe.train, 1)[1] * batch_plan(recipe.train, 1)[2] == recipe.train.batch_size


def test_shipped_recipes_include_the_demo() -> None:
    assert {"test.yaml", "tiny.yaml", "small.yaml", "tiny-moe.yaml", f"{DEMO_RECIPE}.yaml"} <= {
        p.name for p in RECIPES}


@pytest.mark.parametrize("variant", ["tiny-moe.yaml", "tiny-moe-sparse.yaml"])
def test_tiny_moe_has_tiny_active_width(variant: str) -> None:
    """A shared and 8 routed experts, top-3, on every layer: the experts a token visits
    (the shared one and 3 routed) together as wide as tiny's dense MLP."""
    folder = RECIPES[0].parent
    moe = model_config(load_recipe(folder / variant, world_size=1), vocab_size=4096)
    dense = model_config(load_recipe(folder / "tiny.yaml", world_size=1), vocab_size=4096)
    assert all(moe.is_moe_layer(i) for i in range(moe.n_layers))
    assert moe.replace(feed_forward=(), moe=None, attention=dense.attention) == dense
    layer = MoE(moe)
    assert layer.up.shape[0] == 8 and moe.moe.top_k == 3 and layer.shared is not None
    assert (moe.moe.top_k + 1) * layer.down.shape[1] == dense.resolved_d_ff == 4 * layer.shared.down.in_features


def test_the_demo_s_model_alternates_dense_and_sliding_window_attention() -> None:
    config = model_config(load_recipe(RECIPES[0].parent / f"{DEMO_RECIPE}.yaml", world_size=1), vocab_size=4096)
    patterns = [config.attention_pattern(i) for i in range(config.n_layers)]
    assert [p.kind for p in patterns] == ["dense", "sliding"] * (config.n_layers // 2)
    assert {p.window for p in patterns[1::2]} == {64}



@pytest.mark.parametrize("variant", ["tiny-moe.yaml", "tiny-sparse.yaml", "tiny-moe-sparse.yaml"])
def test_tiny_variants_share_tinys_data_and_schedule(variant: str) -> None:
    """They say so in their headers, and bench_moe compares tiny-moe with tiny step for step."""
    folder = RECIPES[0].parent

    def plan(name: str) -> dict:
        raw = load_recipe(folder / name, world_size=1).to_dict()
        raw["model"].pop("overrides")
        return {key: value for key, value in raw.items() if key not in ("name", "out_dir")}

    assert plan(variant) == plan("tiny.yaml")

def test_overrides_are_parsed_as_yaml_values(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL), [
        "optim.lr=3e-4",  # PyYAML (YAML 1.1) reads this as a string; recipes read YAML 1.2's float
        "train.steps=12",
        "optim.betas=[0.8, 0.9]",
        "train.clip_norm=null",
        "model.overrides.d_model=64",
        "model.overrides.norm_eps=1e-6",  # read as YAML 1.2 does: ModelConfig takes no string for a float
    ], world_size=1)
    assert recipe.optim.lr == pytest.approx(3e-4)
    assert recipe.train.steps == 12
    assert recipe.optim.betas == (0.8, 0.9)
    assert recipe.train.clip_norm is None
    assert model_config(recipe, 16).d_model == 64 and model_config(recipe, 16).norm_eps == 1e-6


def test_recipe_is_frozen(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL), world_size=1)
    with pytest.raises(Exception):
        recipe.train.steps = 5  # type: ignore[misc]


@pytest.mark.parametrize("text, overrides, field", [
    (MINIMAL + "train:\n  stepz: 3\n", [], "train.stepz: unknown field"),
    (MINIMAL, ["train.stepz=3"], "train.stepz: unknown field"),
    (MINIMAL, ["trian.steps=3"], "trian: unknown field"),
    (MINIMAL, ["train.steps=many"], "train.steps:"),
    (MINIMAL, ["train.steps=-1"], "train.steps:"),
    (MINIMAL, ["train.precision=fp8"], "train.precision:"),
    (MINIMAL + "train: {steps: 3}\n", ["train.steps.max=3"], "train.steps.max: train.steps is a value"),
    (MINIMAL, ["train.steps.max=3"], "train.steps: Input should be a valid integer"),
    (MINIMAL, ["train.steps"], "expected dotted.path=value"),
    (MINIMAL, ["model.preset=huge"], "model.preset:"),
    (MINIMAL, ["model.overrides.d_modl=64"], "model.overrides.d_modl: unknown ModelConfig field"),
    (MINIMAL, ["model.overrides.n_heads=0"], "model.overrides.n_heads: must be positive"),
    (MINIMAL, ["train.batch_size=10", "train.micro_batch=4"], "train.micro_batch: 4 does not divide"),
    (MINIMAL, ["train.batch_size=10", "train.grad_accum=4"], "train.grad_accum: 4 does not divide"),
    (MINIMAL, ["train.batch_size=8", "train.grad_accum=4", "train.micro_batch=4"], "train.batch_size: 8 !="),
    (MINIMAL, ["data.seq_len=4096"], "data.seq_len: 4096 exceeds"),
    (MINIMAL, ["data.shards=somewhere"], "data: "),
    (MINIMAL, ["optim.betas=[1.5, 0.95]"], "optim.betas.0: Input should be less than 1"),
    (MINIMAL, ["optim.lr=.inf"], "optim.lr: Input should be a finite number"),
    (MINIMAL, ["train.steps=[1"], "--set 'train.steps=[1': not valid YAML"),
    # pydantic's lax rules read booleans as 1 and 0: `true` ran one step
    (MINIMAL, ["train.steps=true"], "train.steps: Value error, expected a number, not a boolean (got True)"),
    (MINIMAL, ["optim.lr=false"], "optim.lr: Value error, expected a number, not a boolean (got False)"),
    (MINIMAL, ["train.clip_norm=false"], "train.clip_norm: Value error, expected a number, not a boolean (null for"),
    # np.random.seed, which a run calls after preparing its data, takes 0 .. 2**32 - 1 only
    (MINIMAL, ["train.seed=-1"], "train.seed: Input should be greater than or equal to 0"),
    (MINIMAL, ["train.seed=4294967296"], "train.seed: Input should be less than 4294967296"),
    (MINIMAL, ["data.synthetic.seed=-1"], "data.synthetic.seed: Input should be greater than or equal to 0"),
])
def test_mistakes_name_the_field(tmp_path: Path, text: str, overrides: list[str], field: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(field)):
        load_recipe(write(tmp_path, text), overrides, world_size=1)


def test_batch_must_split_over_processes() -> None:
    raw = {"data": {"synthetic": {}}, "train": {"batch_size": 6, "parallel": "ddp"}}
    with pytest.raises(RecipeError, match="train.batch_size: 6 does not split over 4 processes"):
        recipe_from_dict(raw, world_size=4)
    with pytest.raises(RecipeError, match="train.parallel"):
        recipe_from_dict({"data": {"synthetic": {}}}, world_size=2)


@pytest.mark.parametrize("batch, micro, accum, world, expected", [
    (8, None, None, 1, (1, 8, 1)),
    (8, 1, None, 1, (1, 1, 8)),
    (8, None, 8, 1, (1, 1, 8)),
    (8, 2, 2, 2, (2, 2, 2)),
    (8, None, None, 2, (2, 4, 1)),
])
def test_batch_plan(batch: int, micro: int | None, accum: int | None, world: int, expected: tuple) -> None:
    raw = {"data": {"synthetic": {}}, "train": {"batch_size": batch, "micro_batch": micro, "grad_accum": accum,
                                                "parallel": "ddp" if world > 1 else "none"}}
    assert batch_plan(recipe_from_dict(raw, world_size=world).train, world) == expected


def test_data_vocabulary_fills_the_preset_and_a_smaller_pin_fails() -> None:
    recipe = recipe_from_dict({"data": {"synthetic": {}}}, world_size=1)
    assert model_config(recipe, 100).vocab_size == 100
    pinned = recipe_from_dict({"data": {"synthetic": {}}, "model": {"overrides": {"vocab_size": 50}}}, world_size=1)
    with pytest.raises(RecipeError, match="model.overrides.vocab_size"):
        model_config(pinned, 100)


def test_round_trip_through_dict() -> None:
    recipe = recipe_from_dict({"data": {"synthetic": {}}, "optim": {"lr": 1e-3}}, world_size=1)
    assert recipe_from_dict(recipe.to_dict(), world_size=1) == recipe


def test_a_recipe_file_that_is_not_text_is_named(tmp_path: Path) -> None:
    """`heron train weights.bin` said only "'utf-8' codec can't decode byte ...", naming no file."""
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x80\x81 not text")
    with pytest.raises(RecipeError, match=r"weights.bin: cannot read recipe: not UTF-8 text \(invalid start byte"):
        load_recipe(path)


@pytest.mark.parametrize("text, overrides, key", [
    (MINIMAL + "train:\n  steps: 3\ntrain:\n  batch_size: 4\n", [], "'train'"),  # would drop steps: 3
    (MINIMAL + "optim:\n  lr: 0.1\n  lr: 0.001\n", [], "'lr'"),
    (MINIMAL, ["model.overrides={d_model: 64, d_model: 32}"], "'d_model'"),
])
def test_a_key_given_twice_is_an_error_naming_it(tmp_path: Path, text: str, overrides: list[str], key: str) -> None:
    """PyYAML keeps the last of a repeated key silently: a second `train:` section wiped the first."""
    with pytest.raises(RecipeError, match=f"{key} is given twice in one mapping"):
        load_recipe(write(tmp_path, text), overrides, world_size=1)


def test_keys_a_yaml_merge_brings_in_may_be_overridden(tmp_path: Path) -> None:
    """Not a repeated key: `<<` gives defaults that the mapping's own keys replace."""
    recipe = load_recipe(write(tmp_path, MINIMAL), ["optim={<<: {lr: 0.1, eps: 1.0e-6}, lr: 0.002}"], world_size=1)
    assert (recipe.optim.lr, recipe.optim.eps) == (0.002, 1e-6)
    assert load_recipe(write(tmp_path, MINIMAL), ["train.seed=4294967295"], world_size=1).train.seed == 2**32 - 1
