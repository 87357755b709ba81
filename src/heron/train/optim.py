"""AdamW with decay/no-decay parameter groups, and the learning-rate schedule.

The schedule is a pure function of the step, so a resumed run needs no
scheduler state: the step alone gives the rate.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from heron.train.recipe import OptimSection, ScheduleSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for matrices, none for vectors.

    As nanoGPT's `configure_optimizers`: every parameter with >= 2 dims
    (linear weights and the token embedding, which is also the output
    projection when tied) is decayed; 1-D ones (norm gains, biases) are not,
    since shrinking a norm gain or a bias towards zero is not regularisation
    of the function's complexity. Deciding by shape rather than by name keeps
    this right for any model family and for FSDP's sharded DTensors.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.AdamW:
    """AdamW over `param_groups`, using the fused kernel where torch has one."""
    groups = param_groups(model, optim.weight_decay)
    kwargs = dict(lr=optim.lr, betas=optim.betas, eps=optim.eps)
    if optim.fused is False:
        return torch.optim.AdamW(groups, **kwargs)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        if optim.fused:  # asked for explicitly: say so rather than fall back quietly
            raise
        return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int,
          min_lr_ratio: float = 0.1, kind: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warm-up from peak/warmup to peak over `warmup_steps` (step 0 already
    moves the weights), then half-cosine decay to `min_lr_ratio * peak` at
    `total_steps` (Loshchilov & Hutter 2017, SGDR without restarts; nanoGPT's
    `get_lr`); held at the minimum afterwards.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return peak_lr
    if kind != "cosine":
        raise ValueError(f"schedule.kind: {kind!r} is not one of cosine, constant")
    min_lr = peak_lr * min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - min_lr)


def recipe_lr(step: int, optim: OptimSection, schedule: ScheduleSection, total_steps: int) -> float:
    """`lr_at` with the numbers taken from a recipe."""
    return lr_at(step, peak_lr=optim.lr, warmup_steps=schedule.warmup_steps, total_steps=total_steps,
                 min_lr_ratio=schedule.min_lr_ratio, kind=schedule.kind)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


__all__ = ["build_optimizer", "lr_at", "param_groups", "recipe_lr", "set_lr"]
