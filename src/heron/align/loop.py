"""The one optimisation loop every alignment objective runs in.

An objective maps the example rows of a micro-batch to per-example losses
(and per-example metrics). The loop draws each global batch by (seed, step),
splits it into `grad_accum` micro-batches, and backpropagates each
micro-batch's loss sum divided by the global batch size, so the gradient is
the batch mean whatever the accumulation: 1 x 8 equals 8 x 1 (for objectives
whose losses are per example; KTO's reference point is not). Given a
`Resumable`, it saves its state as it goes and starts where a killed run
stopped (`align.resume`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from heron.align.resume import Resumable, record_step
from heron.data.batches import epoch_rows
from heron.train.loop import check_finite_update

# rows (b,) -> (losses (b,), {name: per-example values (b,)})
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]

ADAMW_BETAS = (0.9, 0.95)  # every alignment optimiser's (fit's default, PPO's, GRPO's)
FLOAT32_MAX = torch.finfo(torch.float32).max  # ~3.4e38


def check_learning_rate(name: str, lr: float, beta1: float = ADAMW_BETAS[0], weight_decay: float = 0.0) -> None:
    """A ValueError naming `name` when torch's AdamW could not take its first step in fp32: it
    scales the step by lr / (1 - beta1) (Adam's bias correction at step 1, folded into the step
    size) and decays each weight by 1 - lr * weight_decay; either past float32's largest number,
    torch fails mid-step with "value cannot be converted to type float without overflow", which
    names no setting."""
    if lr / (1 - beta1) > FLOAT32_MAX or lr * weight_decay > FLOAT32_MAX:
        largest = FLOAT32_MAX * min(1 - beta1, 1 / weight_decay if weight_decay else 1.0)
        raise ValueError(f"{name}: must be at most {largest:.6g}, got {lr:g}: past it AdamW's first step size "
                         "(lr / (1 - beta1)) or decay (lr * weight_decay) overflows float32; give a usual "
                         "learning rate (1e-6 to 1e-3)")


@dataclass(frozen=True)
class FitSettings:
    steps: int
    batch_size: int
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = ADAMW_BETAS
    clip_norm: float = 1.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum: {self.grad_accum} does not divide batch_size {self.batch_size}")
        check_learning_rate("lr", self.lr, self.betas[0], self.weight_decay)


def fit(params: Iterable[torch.nn.Parameter], objective: Objective, n_examples: int, settings: FitSettings,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
        resume: Resumable | None = None) -> list[dict[str, float]]:
    """Train `params` on `objective` over examples 0..n_examples-1; returns one metrics row for
    each step this call ran. `optimizer` builds the optimiser from the parameters (default:
    AdamW with the settings); `resume` saves the state as it goes and restores a saved one."""
    params = [p for p in params if p.requires_grad]
    if optimizer is None:
        optim = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    else:
        optim = optimizer(params)
    micro = settings.batch_size // settings.grad_accum
    parts = {"params": torch.nn.ParameterList(params), "optimizer": optim}
    start = resume.restore(parts) if resume is not None else 0
    history = []
    for step in tqdm(range(start, settings.steps), initial=start, total=settings.steps, disable=not settings.progress,
                     desc="align", unit="step"):
        rows = torch.from_numpy(epoch_rows(n_examples, settings.batch_size, step, settings.seed))
        sums: dict[str, float] = {}
        for part in rows.split(micro):
            losses, metrics = objective(part)
            (losses.sum() / settings.batch_size).backward()
            for name, values in {"loss": losses, **metrics}.items():
                sums[name] = sums.get(name, 0.0) + float(values.detach().sum())
        norm = float(torch.nn.utils.clip_grad_norm_(params, settings.clip_norm))
        # Before the update: a NaN gradient would make AdamW write NaN into every weight.
        check_finite_update(step + 1, sums["loss"] / settings.batch_size, norm)
        optim.step()
        optim.zero_grad(set_to_none=True)
        row = {"step": step + 1, **{k: v / settings.batch_size for k, v in sums.items()}, "grad_norm": norm}
        record_step(step + 1, row, history, on_step, resume, parts)
    return history


__all__ = ["ADAMW_BETAS", "FitSettings", "Objective", "check_learning_rate", "fit"]
