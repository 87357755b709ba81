"""Alignment recipes: numbers as YAML reads them, and errors that name the dotted field."""
import pytest
import yaml

from heron.align.recipe import load_align_recipe
from heron.train.recipe import RecipeError

RECIPE = """\
name: run
out_dir: out
base: base
data: {task: {n: 8}}
fit: {lr: 1e-5}
preference: {beta: 1e-5}
ppo: {lr: 1e-5, value_lr: 2e-5, steps: "3"}
grpo: {lr: 1e-5, beta: 1e-2, inner_steps: 2.0}
"""


def test_numbers_yaml_reads_as_strings_are_numbers_of_the_fields_type(tmp_path):
    """YAML 1.1 (PyYAML's) reads `1e-5` (no dot) as the string "1e-5"; recipes read it as YAML
    1.2 does, the float 1e-05, and a quoted number ("3") as a number of its field's type."""
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    assert isinstance(yaml.safe_load(RECIPE)["ppo"]["lr"], str)  # the trap itself
    recipe = load_align_recipe(path)
    ppo, grpo = recipe.ppo_settings(), recipe.grpo_settings()
    assert (ppo.lr, ppo.value_lr, ppo.steps) == (1e-05, 2e-05, 3) and type(ppo.steps) is int
    assert (grpo.lr, grpo.beta, grpo.inner_steps) == (1e-05, 1e-02, 2) and type(grpo.inner_steps) is int
    assert (recipe.fit.lr, recipe.preference.beta) == (1e-05, 1e-05)


@pytest.mark.parametrize("override, message", [
    ("ppo.lr=abc", r"ppo\.lr: Input should be a valid number.* \(got 'abc'\)"),
    ("grpo.beta=abc", r"grpo\.beta: Input should be a valid number.* \(got 'abc'\)"),
    ("ppo.value_lr=abc", r"ppo\.value_lr: Input should be a valid number.* \(got 'abc'\)"),
    ("grpo.steps=2.5", r"grpo\.steps: Input should be a valid integer, got a number with a fractional part "
                       r"\(got 2\.5\)"),
    ("ppo.lr=-1e-5", r"ppo\.lr: must be > 0, got -1e-05"),  # converted first, then checked as before
    ("ppo.steps=true", r"ppo\.steps: expected a number, not a boolean"),  # not one step
    ("fit.lr=true", r"fit\.lr: Value error, expected a number, not a boolean \(got True\)"),
])
def test_a_setting_that_is_not_a_number_is_refused_naming_the_field(tmp_path, override, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    with pytest.raises(RecipeError, match=f"^{message}$"):
        load_align_recipe(path, [override])


def test_one_number_spelled_two_ways_is_one_run_in_lineage_and_identity(tmp_path, monkeypatch):
    """YAML's string "1e-5" and 0.00001 are the same learning rate: the recipe the lineage records
    (`model_dump`) and the identity a resumed run must match hold the number 1e-05 for both."""
    from heron.align import run

    monkeypatch.setattr(run, "weights_identity", lambda path: "weights")  # no base on disk to hash
    recipes = []
    for spelling in ("1e-5", "0.00001"):
        path = tmp_path / f"{spelling}.yaml"
        path.write_text(f"name: run\nout_dir: out\nbase: base\ndata: {{task: {{n: 8}}}}\n"
                        f"ppo: {{lr: {spelling}, steps: '3'}}\ngrpo: {{lr: {spelling}}}\n")
        recipes.append(load_align_recipe(path))
    lineages = [recipe.model_dump() for recipe in recipes]
    assert lineages[0] == lineages[1]
    assert lineages[0]["ppo"] == {"lr": 1e-05, "steps": 3} and type(lineages[0]["ppo"]["lr"]) is float
    assert lineages[0]["grpo"] == {"lr": 1e-05} and type(lineages[0]["ppo"]["steps"]) is int
    for method in ("ppo", "grpo"):
        assert run._identity(method, recipes[0]) == run._identity(method, recipes[1])


@pytest.mark.parametrize("field", ["fit.lr", "ppo.lr", "ppo.value_lr", "grpo.lr"])
def test_a_learning_rate_past_fp32s_range_is_refused_naming_the_field(tmp_path, field):
    """lr 1e39 is a finite float64 but no float32: every alignment optimiser's AdamW failed on its
    first step with "value cannot be converted to type float without overflow"."""
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    with pytest.raises(RecipeError, match=rf"^{field.replace('.', '[.]')}: must be at most 3\.40282e\+37, "
                                          r"got 1e\+39: .*give a usual learning rate"):
        load_align_recipe(path, [f"{field}=1e39"])
