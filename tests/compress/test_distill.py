"""Distillation: the losses against hand-computed values, a student that learns a task
from the teacher's distribution alone (alpha = 1: it never sees a label), and one whose
hidden states learn to match the teacher's through a projection the checkpoint leaves out."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import heron
from compress_helpers import V, tiny
from heron.cli.main import main
from heron.compress.distill import (
    check_hidden_settings,
    distill,
    distillation_objective,
    hidden_state_loss,
    resid_post,
    teacher_states,
    uniform_layer_map,
)
from heron.compress.distill_loss import distillation_loss
from heron.compress.quantize import QuantizeSettings
from heron.compress.quantize_checkpoint import QuantizeCheckpointSettings, quantize_checkpoint
from heron.core import Transformer
from heron.interop.convert import export_hf
from heron.data.batches import eval_batches
from heron.train import load_checkpoint, load_model_folder, synthetic_data, train
from heron.train.checkpoint import CheckpointError, latest_checkpoint, save_model_folder
from heron.train.loop import IGNORE_INDEX, Objective
from heron.train.recipe import model_config, recipe_from_dict

torch.set_num_threads(1)


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (2.0, 1.0), (3.0, 0.0), (0.5, 0.25)])
def test_loss_matches_the_formula_by_hand(temperature, alpha):
    student, teacher, target = [0.3, -1.0, 0.5], [math.log(3.0), 0.0, -0.7], 2
    soft = kl(softmax([v / temperature for v in teacher]), softmax([v / temperature for v in student]))
    hard = -math.log(softmax(student)[target])
    want = alpha * temperature**2 * soft + (1 - alpha) * hard
    got = distillation_loss(torch.tensor([[student]]), torch.tensor([[teacher]]), torch.tensor([[target]]),
                            temperature=temperature, alpha=alpha)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_ignored_targets_count_nothing_and_equal_logits_cost_nothing():
    torch.manual_seed(0)
    s = torch.randn(2, 5, 7, requires_grad=True)
    t = torch.randn(2, 5, 7)
    y = torch.randint(0, 7, (2, 5))
    masked = y.clone()
    masked[:, 3:] = IGNORE_INDEX
    got = distillation_loss(s, t, masked, temperature=2.0, alpha=0.3)
    want = distillation_loss(s[:, :3], t[:, :3], y[:, :3], temperature=2.0, alpha=0.3)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    same = distillation_loss(s, s.detach(), y, temperature=2.0, alpha=1.0)
    same.backward()
    assert same.item() == pytest.approx(0.0, abs=1e-6) and s.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("kwargs, field", [({"temperature": 0.0, "alpha": 0.5}, "temperature"),
                                           ({"temperature": 1.0, "alpha": 1.5}, "alpha")])
def test_bad_settings_name_the_setting(kwargs, field):
    with pytest.raises(ValueError, match=field):
        distillation_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), **kwargs)


def recipe_dict(out_dir: Path, d_model: int, steps: int, vocab_size: int = 32, n_layers: int = 2) -> dict:
    return {
        "name": "distill-test", "out_dir": str(out_dir),
        "model": {"preset": "test", "overrides": {"d_model": d_model, "n_layers": n_layers, "n_heads": 2,
                                                  "n_kv_heads": 1, "max_seq_len": 32}},
        "data": {"synthetic": {"vocab_size": vocab_size, "n_tokens": 2048, "seed": 0}, "seq_len": 16},
        "optim": {"lr": 1e-2, "weight_decay": 0.1},
        "schedule": {"warmup_steps": 2, "min_lr_ratio": 0.1},
        "train": {"steps": steps, "batch_size": 8, "eval_every": steps, "eval_batches": 2, "ckpt_every": steps,
                  "log_every": 10, "progress": False},
    }


def recipe(out_dir: Path, d_model: int, steps: int, vocab_size: int = 32, n_layers: int = 2, **train_settings):
    settings = recipe_dict(out_dir, d_model, steps, vocab_size, n_layers)
    settings["train"].update(train_settings)
    return recipe_from_dict(settings, world_size=1)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """d 32 on a repeated permutation of 32 tokens, learned to near-zero loss."""
    out = tmp_path_factory.mktemp("teacher")
    result = train(recipe(out, d_model=32, steps=60))
    assert result.val_losses[-1][1] < 0.05
    return result.checkpoint


def test_a_student_learns_the_task_from_the_teacher_alone(teacher, tmp_path):
    result = distill(teacher, recipe(tmp_path / "student", d_model=16, steps=100), temperature=2.0, alpha=1.0)
    # Known answer: a fresh model is near uniform over 32 tokens; the cycle is fully predictable,
    # and the student's validation loss is plain cross-entropy on the data it never saw labels of.
    assert result.val_losses[-1][1] < 0.1 < math.log(32)
    lineage = load_checkpoint(latest_checkpoint(tmp_path / "student")).lineage
    assert lineage["distillation"]["teacher"] == str(teacher.resolve()) and lineage["distillation"]["alpha"] == 1.0
    assert lineage["energy"]["tokens"] == 100 * 8 * 16


def test_a_quantised_teacher_teaches_too(teacher, tmp_path):
    """An int8 checkpoint of the teacher (its head quantised too) is a teacher like any other:
    the same known answer as the fp32 teacher's."""
    int8 = tmp_path / "int8"
    quantize_checkpoint(teacher, int8, QuantizeCheckpointSettings(QuantizeSettings()), progress=False)
    result = distill(int8, recipe(tmp_path / "student", d_model=16, steps=100), temperature=2.0, alpha=1.0)
    assert result.val_losses[-1][1] < 0.1 < math.log(32)


def test_a_hugging_face_teacher_is_read_from_its_folder(teacher, tmp_path):
    """The teacher exported as a LLaMA folder distils exactly as the checkpoint it came from."""
    hf = tmp_path / "hf"
    export_hf(teacher, hf)
    from_hf = distill(hf, recipe(tmp_path / "from-hf", d_model=16, steps=3))
    from_heron = distill(teacher, recipe(tmp_path / "from-heron", d_model=16, steps=3))
    for a, b in zip(from_hf.history, from_heron.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_a_teacher_holding_nan_weights_is_refused_naming_it_and_its_tensor(teacher, tmp_path):
    """Not trained from: the student's first loss would be NaN, blamed on its learning rate."""
    model, tokenizer = heron.load(teacher)
    with torch.no_grad():
        model.blocks[1].mlp.down.weight[0, 0] = float("inf")
    save_model_folder(tmp_path / "diverged", model, tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match=r"^teacher: .*diverged holds NaN or infinite weights in 1 tensor\(s\) "
                                              r"\(first: blocks\.1\.mlp\.down\.weight\)"):
        distill(tmp_path / "diverged", recipe(tmp_path / "student", d_model=16, steps=2))
    assert not (tmp_path / "student").exists()
    for scheme in ("int8", "int4"):  # nor quantised
        with pytest.raises(CheckpointError, match=r"^source: .*diverged holds NaN or infinite weights"):
            quantize_checkpoint(tmp_path / "diverged", tmp_path / scheme,
                                QuantizeCheckpointSettings(QuantizeSettings(scheme)), progress=False)
        assert not (tmp_path / scheme).exists()


def test_a_teacher_with_another_vocabulary_is_refused(teacher, tmp_path):
    with pytest.raises(ValueError, match="teacher: vocabulary of 32 tokens.*has 48"):
        distill(teacher, recipe(tmp_path / "student", d_model=16, steps=2, vocab_size=48))


def test_a_teacher_with_more_rows_than_tokens_teaches_a_student_of_its_size(tmp_path):
    """A teacher's embedding may be padded past its tokenizer (Qwen2: 151,936 rows for 151,646 tokens).
    The student gets the teacher's rows, since the KL runs over the teacher's whole vocabulary, and
    learns the task as from an unpadded teacher."""
    settings = recipe_dict(tmp_path / "teacher", d_model=32, steps=60)
    settings["model"]["overrides"]["vocab_size"] = 40  # 8 rows no token of the data's 32 uses
    padded = train(recipe_from_dict(settings, world_size=1)).checkpoint
    # synthetic data and a teacher without a tokenizer: nothing can tell padded rows from another vocabulary
    with pytest.warns(RuntimeWarning, match=r"teacher: 40 rows, the recipe's data \(synthetic\) 32 tokens, and no "
                                            "tokenizer fingerprint on both sides"):
        result = distill(padded, recipe(tmp_path / "student", d_model=16, steps=100), temperature=2.0, alpha=1.0)
    assert result.val_losses[-1][1] < 0.1 < math.log(32)
    assert load_checkpoint(result.checkpoint).config.vocab_size == 40


def test_a_teacher_reading_shorter_windows_than_the_data_is_refused_before_the_run_folder(teacher, tmp_path):
    settings = recipe_dict(tmp_path / "student", d_model=16, steps=2)
    settings["model"]["overrides"]["max_seq_len"] = settings["data"]["seq_len"] = 64
    with pytest.raises(ValueError, match=r"^teacher: max_seq_len 32 is below data.seq_len 64; .*data.seq_len <= 32"):
        distill(teacher, recipe_from_dict(settings, world_size=1))
    assert not (tmp_path / "student").exists()


def test_a_student_of_another_vocabulary_is_refused_before_its_run_folder_exists(teacher, tmp_path, capsys):
    file = tmp_path / "student.yaml"
    file.write_text(yaml.safe_dump(recipe_dict(tmp_path / "student", d_model=16, steps=2)))
    assert main(["compress", "distill", str(teacher), str(file), "--set", "model.overrides.vocab_size=64"]) == 2
    assert "vocab_size: the student's is 64 (the recipe's model section), the teacher's 32" in capsys.readouterr().err
    assert not (tmp_path / "student").exists()


def test_a_student_run_inside_the_teacher_is_refused(teacher, tmp_path):
    with pytest.raises(ValueError, match="out_dir: .* is inside the teacher"):
        distill(teacher, recipe(teacher / "student", d_model=16, steps=2))
    assert not (teacher / "student").exists()


def test_resuming_under_another_teacher_or_loss_is_refused(teacher, tmp_path):
    """The lineage names one distillation: a run continued under other settings would record
    the second over the first."""
    first = distill(teacher, recipe(tmp_path / "student", d_model=16, steps=2), temperature=2.0)
    with pytest.raises(ValueError, match=r"resuming a distillation whose temperature was 2.0, now 5.0"):
        distill(teacher, recipe(tmp_path / "student", d_model=16, steps=4), temperature=5.0)
    resumed = distill(teacher, recipe(tmp_path / "student", d_model=16, steps=4), temperature=2.0)
    assert resumed.history[:2] == first.history and len(resumed.history) == 4


def test_a_run_folder_is_recorded_as_the_step_it_served(teacher, tmp_path):
    """Given a run folder, distillation and quantisation read its latest checkpoint: their lineage
    names that step, not the run, whose latest step moves on when it trains further."""
    run = teacher.parent.parent
    distill(run, recipe(tmp_path / "student", d_model=16, steps=2))
    assert load_checkpoint(latest_checkpoint(tmp_path / "student")).lineage["distillation"]["teacher"] == \
        str(teacher.resolve())
    quantize_checkpoint(run, tmp_path / "int8", QuantizeCheckpointSettings(QuantizeSettings()), progress=False)
    assert load_checkpoint(tmp_path / "int8").lineage["quantized_from"] == str(teacher.resolve())


def test_resuming_under_a_teacher_whose_weights_changed_is_refused(teacher, tmp_path):
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    distill(copy, recipe(tmp_path / "student", d_model=16, steps=2))
    shutil.rmtree(copy)
    quantize_checkpoint(teacher, copy, QuantizeCheckpointSettings(QuantizeSettings()), progress=False)
    with pytest.raises(ValueError, match="resuming a distillation whose teacher_weights was"):
        distill(copy, recipe(tmp_path / "student", d_model=16, steps=4))


def test_the_cli_distills_from_a_recipe_file(teacher, tmp_path, capsys):
    file = tmp_path / "student.yaml"
    file.write_text(yaml.safe_dump(recipe_dict(tmp_path / "student", d_model=16, steps=3)))
    assert main(["compress", "distill", str(teacher), str(file), "--alpha", "0.7", "--set", "train.steps=2"]) == 0
    assert "student checkpoint:" in capsys.readouterr().out
    lineage = load_checkpoint(latest_checkpoint(tmp_path / "student")).lineage
    assert lineage["step"] == 2 and lineage["distillation"]["alpha"] == 0.7


# ----- the hidden-state term ----------------------------------------------------------


def test_hidden_term_is_the_mse_by_hand():
    # Two layer pairs, d_s = 2 -> d_t = 3 through the zero-padded identity; the second token is ignored.
    projection = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # (d_t, d_s)
    students = [torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.5, -1.0]]]),
                torch.tensor([[[0.0, 0.0], [9.0, 9.0], [2.0, 2.0]]])]
    teachers = [torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.0, 2.0]]]),
                torch.tensor([[[1.0, 2.0, 2.0], [5.0, 5.0, 5.0], [2.0, 2.0, 0.0]]])]
    targets = torch.tensor([[4, IGNORE_INDEX, 1]])

    def squared_error(s: list[float], t: list[float]) -> float:  # mean over the teacher's 3 dims
        padded = s + [0.0]
        return sum((a - b) ** 2 for a, b in zip(padded, t)) / 3

    per_layer = [sum(squared_error(st[0, k].tolist(), te[0, k].tolist()) for k in (0, 2))
                 for st, te in zip(students, teachers)]
    # layer 0: (0 + 1 + 1) / 3 + (0 + 1 + 4) / 3 = 7/3; layer 1: (1 + 4 + 4) / 3 + (0 + 0 + 0) / 3 = 3
    assert per_layer == pytest.approx([7 / 3, 3.0])
    got = hidden_state_loss(students, teachers, projection, targets)
    assert got.item() == pytest.approx(sum(per_layer) / 2, rel=1e-6)
    # One pair over its kept tokens is exactly torch's MSE after the projection.
    one = hidden_state_loss(students[:1], teachers[:1], projection, targets) / 2
    assert one.item() == pytest.approx(F.mse_loss(students[0][0, [0, 2]] @ projection.T, teachers[0][0, [0, 2]]).item())


@pytest.mark.parametrize("student_layers, teacher_layers, want", [
    (2, 2, {0: 0, 1: 1}),
    (2, 4, {0: 1, 1: 3}),
    (4, 12, {0: 2, 1: 5, 2: 8, 3: 11}),  # TinyBERT's 4-layer student: every third teacher layer
    (2, 3, {0: 1, 1: 2}),  # 1.5 rounds up
    (3, 5, {0: 1, 1: 2, 2: 4}),
    (3, 1, {0: 0, 1: 0, 2: 0}),  # deeper than twice the teacher: never below layer 0
])
def test_the_uniform_map_ends_last_to_last(student_layers, teacher_layers, want):
    assert uniform_layer_map(student_layers, teacher_layers) == want


def test_the_objective_is_the_logit_loss_plus_the_hidden_term():
    """The student's forward, scored by the objective's head loss, gives distillation_loss of
    both models' logits (to fp32 rounding: it never makes them); hidden_weight adds its term."""
    teacher, student = tiny(seed=0), tiny(seed=1, d_model=32)  # d 64 and d 32, 2 layers each
    torch.manual_seed(0)
    x = torch.randint(0, V, (2, 8))
    y = x.roll(-1, dims=1)
    y[0, :3] = IGNORE_INDEX
    with torch.no_grad():
        want = distillation_loss(student(x).logits, teacher(x).logits, y, temperature=2.0, alpha=0.5)
    for weight in (0.0, 0.5):
        objective = distillation_objective(teacher, student.config, {0: 0, 1: 1}, temperature=2.0, alpha=0.5,
                                           hidden_weight=weight)
        acts: dict[str, torch.Tensor] = {}
        with torch.no_grad(), student.hooks(dict.fromkeys(objective.hook_names, lambda a, n: acts.__setitem__(n, a))):
            distilled = student(x, targets=y, head_loss=objective.head(x)).loss
            total = objective.loss(x, distilled, y, acts)
        assert distilled.item() == pytest.approx(want.item(), rel=1e-5)
        if weight == 0:
            assert objective.hook_names == () and objective.params is None and torch.equal(total, distilled)
        else:
            teacher_hidden, teacher_acts = teacher_states(teacher, x, [resid_post(0), resid_post(1)])
            hidden = hidden_state_loss([acts[resid_post(i)] for i in (0, 1)],
                                       [teacher_acts[resid_post(j)] for j in (0, 1)], objective.params.weight, y)
            assert total.item() == pytest.approx((distilled + weight * hidden).item(), rel=1e-6)
            assert teacher_hidden.shape == (2, 8, 64)


def test_fused_distillation_trains_as_the_logits_way_does(teacher, tmp_path):
    """distill's fused objective against the loop's plain TokenLoss over both models' whole logits:
    the same run to fp32 rounding."""
    teacher_model, _ = load_model_folder(teacher)

    def through_logits(x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher_model(x).logits.float()
        return distillation_loss(logits, teacher_logits, y, temperature=2.0, alpha=0.5)

    before = train(recipe(tmp_path / "before", d_model=16, steps=3), token_loss=Objective.of(through_logits))
    now = distill(teacher, recipe(tmp_path / "now", d_model=16, steps=3), hidden_weight=0.0)
    for a, b in zip(before.history, now.history):
        assert a.keys() == b.keys() and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    a, b = (load_checkpoint(r.checkpoint) for r in (before, now))
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.allclose(a.state_dict[k], b.state_dict[k], atol=1e-5) for k in a.state_dict)
    assert "objective" not in b.trainer_state
    assert b.lineage["distillation"]["hidden_weight"] == 0.0 and "hidden_layers" not in b.lineage["distillation"]


def residual_streams(model: Transformer, layers: set[int], x: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer: the residual stream after that block, (B, T, d)} for input x."""
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad(), model.hooks({resid_post(i): lambda a, name: seen.__setitem__(name, a) for i in layers}):
        model(x)
    return {i: seen[resid_post(i)] for i in layers}


def hidden_mse(student: Transformer, teacher: Transformer, projection: torch.Tensor, layer_map: dict[int, int],
               x: torch.Tensor) -> float:
    """Mean over mapped layers of torch's MSE between the projected student states and the teacher's."""
    s, t = residual_streams(student, set(layer_map), x), residual_streams(teacher, set(layer_map.values()), x)
    return sum(F.mse_loss(s[i] @ projection.T, t[j]).item() for i, j in layer_map.items()) / len(layer_map)


def test_hidden_matching_pulls_the_students_states_to_the_teachers(teacher, tmp_path):
    """Known answer: the student's last-layer states, through the trained projection, sit far
    closer to the teacher's than a fresh student's through the initial projection."""
    student_recipe = recipe(tmp_path / "student", d_model=16, steps=80, n_layers=1)
    teacher_model, _ = load_model_folder(teacher)
    config = model_config(student_recipe, 32)
    layer_map = check_hidden_settings(3.0, None, student_layers=1, teacher_layers=2)
    assert layer_map == {0: 1}  # the uniform map: the student's only layer meets the teacher's last
    objective = distillation_objective(teacher_model, config, layer_map, temperature=2.0, alpha=1.0,
                                       hidden_weight=3.0, seed=student_recipe.train.seed)
    initial_projection = objective.params.weight.detach().clone()
    torch.manual_seed(student_recipe.train.seed)
    fresh = Transformer(config).eval()  # the loop's starting point: same seed, same config
    result = train(student_recipe, token_loss=objective)
    trained, _ = load_model_folder(result.checkpoint)
    x, _ = next(eval_batches(synthetic_data(student_recipe.data.synthetic).val, 8, 16))  # held-out windows
    before = hidden_mse(fresh, teacher_model, initial_projection, layer_map, x)
    after = hidden_mse(trained, teacher_model, objective.params.weight.detach(), layer_map, x)
    assert after < 0.5 * before, (before, after)
    # The trained projection is the one the trainer state holds, for resuming.
    saved = load_checkpoint(result.checkpoint).trainer_state["objective"]["params"]["weight"]
    assert torch.equal(saved, objective.params.weight.detach())


def test_the_student_checkpoint_is_a_plain_model(teacher, tmp_path):
    result = distill(teacher, recipe(tmp_path / "student", d_model=16, steps=3), hidden_weight=0.5,
                     hidden_layers={1: 1})
    ckpt = load_checkpoint(result.checkpoint)
    plain = Transformer(ckpt.config).state_dict()
    assert set(ckpt.state_dict) == set(plain) and not any("proj" in k for k in ckpt.state_dict)
    for model, _ in (heron.load(result.checkpoint), load_model_folder(result.checkpoint)):  # strict key checks
        assert model.config.d_model == 16 and all(torch.equal(model.state_dict()[k], ckpt.state_dict[k]) for k in plain)
    assert ckpt.trainer_state["objective"]["params"]["weight"].shape == (32, 16)  # W: student 16 -> teacher 32
    assert ckpt.lineage["distillation"]["hidden_weight"] == 0.5
    assert ckpt.lineage["distillation"]["hidden_layers"] == {"1": 1}


class Crash(Exception):
    pass


def crash_after(step: int):
    def callback(row: dict) -> None:
        if row["step"] == step:
            raise Crash

    return callback


def test_a_resumed_hidden_distillation_equals_the_unbroken_run(teacher, tmp_path):
    """The projection and its optimizer state resume from the trainer state, bit for bit."""
    teacher_model, _ = load_model_folder(teacher)

    def run(name: str, **kwargs):
        r = recipe(tmp_path / name, d_model=16, steps=5, ckpt_every=2, eval_every=2)
        objective = distillation_objective(teacher_model, model_config(r, 32), {0: 0, 1: 1}, temperature=2.0,
                                           alpha=0.5, hidden_weight=1.0, seed=r.train.seed)
        return train(r, token_loss=objective, **kwargs), objective

    unbroken, unbroken_objective = run("unbroken")
    with pytest.raises(Crash):
        run("broken", callbacks=[crash_after(3)])  # checkpoint at 2; step 3 is lost
    resumed, resumed_objective = run("broken")
    assert resumed.history == unbroken.history
    a, b = load_checkpoint(unbroken.checkpoint), load_checkpoint(resumed.checkpoint)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert torch.equal(unbroken_objective.params.weight, resumed_objective.params.weight)


@pytest.mark.parametrize("weight, layers, message", [
    (-0.5, None, "hidden_weight: must be a number >= 0, got -0.5"),
    (float("nan"), None, "hidden_weight: must be a number >= 0, got nan"),
    (1.0, {2: 0}, "hidden_layers: student layer 2 is out of range; the student has 2 layers"),
    (1.0, {0: 0, 1: 4}, "hidden_layers: teacher layer 4 \\(for student layer 1\\) is out of range; the teacher has 4"),
    (1.0, {0: -1}, "hidden_layers: teacher layer -1"),
    (1.0, {}, "hidden_layers: maps no layer"),
    (0.0, {0: 1}, "hidden_layers: .* but hidden_weight is 0"),
])
def test_bad_hidden_settings_name_the_field(weight, layers, message):
    with pytest.raises(ValueError, match=message):
        check_hidden_settings(weight, layers, student_layers=2, teacher_layers=4)


def test_bad_hidden_settings_fail_before_training(teacher, tmp_path):
    with pytest.raises(ValueError, match="hidden_layers: teacher layer 2 .* the teacher has 2 layers"):
        distill(teacher, recipe(tmp_path / "student", d_model=16, steps=2), hidden_weight=1.0, hidden_layers={0: 2})
    assert not (tmp_path / "student").exists()


def test_the_cli_matches_hidden_states_and_names_bad_flags(teacher, tmp_path, capsys):
    file = tmp_path / "student.yaml"
    file.write_text(yaml.safe_dump(recipe_dict(tmp_path / "student", d_model=16, steps=2)))
    args = ["compress", "distill", str(teacher), str(file)]
    assert main([*args, "--hidden-weight", "2", "--hidden-layers", "_,1"]) == 0
    lineage = load_checkpoint(latest_checkpoint(tmp_path / "student")).lineage["distillation"]
    assert lineage["hidden_weight"] == 2.0 and lineage["hidden_layers"] == {"1": 1}
    capsys.readouterr()
    for flags, message in [(["--hidden-weight", "-1"], "--hidden-weight: must be a number >= 0, got -1.0"),
                           (["--hidden-weight", "1", "--hidden-layers", "0,x"], "--hidden-layers: 'x' in '0,x'"),
                           (["--hidden-weight", "1", "--hidden-layers", "0,1,1"], "--hidden-layers: student layer 2")]:
        assert main([*args, *flags]) == 2
        assert message in capsys.readouterr().err
