"""Optimizer groups against their rule, AdamW against its formula, the schedule at known points."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from heron.models import build_model
from heron.train.optim import build_optimizer, lr_at, param_groups
from heron.train.recipe import OptimSection

SCHEDULE = dict(peak_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)


@pytest.mark.parametrize("step, expected", [
    (0, 0.1),  # the first step already moves: 1/10 of peak
    (4, 0.5),
    (9, 1.0),  # warm-up ends at peak
    (10, 1.0),  # cosine starts at peak
    (60, 0.55),  # halfway through the decay: (peak + min) / 2
    (110, 0.1),  # the end: min_lr_ratio * peak
    (500, 0.1),  # held at the minimum afterwards
])
def test_warmup_then_cosine(step: int, expected: float) -> None:
    assert lr_at(step, **SCHEDULE) == pytest.approx(expected)


def test_constant_schedule_and_no_warmup() -> None:
    assert lr_at(50, **{**SCHEDULE, "warmup_steps": 0}, kind="constant") == 1.0
    assert lr_at(0, **{**SCHEDULE, "warmup_steps": 0}) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="schedule.kind"):
        lr_at(50, **SCHEDULE, kind="linear")


def test_groups_decay_matrices_only() -> None:
    model = build_model("test", vocab_size=32, d_model=32, n_layers=1, n_heads=2, qkv_bias=True)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.embed.weight for p in decay["params"])
    assert any(p is model.norm.weight for p in no_decay["params"])
    # The tied embedding / head matrix is one parameter and is optimised once.
    everything = decay["params"] + no_decay["params"]
    assert len({id(p) for p in everything}) == len(everything) == len(list(model.parameters()))


def adamw_reference(p: torch.Tensor, grads: list[torch.Tensor], lr: float, betas: tuple[float, float],
                     eps: float, wd: float) -> torch.Tensor:
    """AdamW written out from Loshchilov & Hutter (2019), Algorithm 2, with bias correction."""
    p, m, v = p.clone().double(), torch.zeros_like(p).double(), torch.zeros_like(p).double()
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * wd)  # decoupled weight decay
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_the_formula(fused: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))  # weight decays, bias does not
    start = [p.detach().clone() for p in model.parameters()]
    settings = OptimSection(lr=0.01, betas=(0.9, 0.99), weight_decay=0.5, eps=1e-8, fused=fused)
    optimizer = build_optimizer(model, settings)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(3)]
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        optimizer.step()
    for i, (p, wd) in enumerate(zip(model.parameters(), (0.5, 0.0))):
        expected = adamw_reference(start[i], [g[i] for g in grads], 0.01, (0.9, 0.99), 1e-8, wd)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert optimizer.defaults["fused"] is (True if fused else None)


def test_cosine_is_monotone_after_warmup() -> None:
    rates = [lr_at(s, **SCHEDULE) for s in range(9, 120)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert math.isclose(min(rates), 0.1)
