"""Distillation: the loss against hand-computed values, and a student that learns a task
from the teacher's distribution alone (alpha = 1: it never sees a label)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from heron.cli.main import main
from heron.compress.distill import distill, distillation_loss
from heron.train import load_checkpoint, train
from heron.train.checkpoint import latest_checkpoint
from heron.train.loop import IGNORE_INDEX
from heron.train.recipe import recipe_from_dict

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


def recipe_dict(out_dir: Path, d_model: int, steps: int, vocab_size: int = 32) -> dict:
    return {
        "name": "distill-test", "out_dir": str(out_dir),
        "model": {"preset": "test", "overrides": {"d_model": d_model, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
                                                  "max_seq_len": 32}},
        "data": {"synthetic": {"vocab_size": vocab_size, "n_tokens": 2048, "seed": 0}, "seq_len": 16},
        "optim": {"lr": 1e-2, "weight_decay": 0.1},
        "schedule": {"warmup_steps": 2, "min_lr_ratio": 0.1},
        "train": {"steps": steps, "batch_size": 8, "eval_every": steps, "eval_batches": 2, "ckpt_every": steps,
                  "log_every": 10, "progress": False},
    }


def recipe(out_dir: Path, d_model: int, steps: int, vocab_size: int = 32):
    return recipe_from_dict(recipe_dict(out_dir, d_model, steps, vocab_size), world_size=1)


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


def test_a_teacher_with_another_vocabulary_is_refused(teacher, tmp_path):
    with pytest.raises(ValueError, match="teacher: vocabulary of 32 tokens.*has 48"):
        distill(teacher, recipe(tmp_path / "student", d_model=16, steps=2, vocab_size=48))


def test_the_cli_distills_from_a_recipe_file(teacher, tmp_path, capsys):
    file = tmp_path / "student.yaml"
    file.write_text(yaml.safe_dump(recipe_dict(tmp_path / "student", d_model=16, steps=3)))
    assert main(["compress", "distill", str(teacher), str(file), "--alpha", "0.7", "--set", "train.steps=2"]) == 0
    assert "student checkpoint:" in capsys.readouterr().out
    lineage = load_checkpoint(latest_checkpoint(tmp_path / "student")).lineage
    assert lineage["step"] == 2 and lineage["distillation"]["alpha"] == 0.7
