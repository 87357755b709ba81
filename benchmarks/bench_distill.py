"""Distillation's loss fused from both models' hidden states against the whole logits.

`compress.distill` scores the student with `linear_distillation_loss`
(compress/distill_loss.py): per chunk of tokens, both models' logits, the
loss and the student's gradient products, so neither model's (tokens,
vocabulary) logits are made whole. The other way, as `distill` did before
2026-11-30, is `distillation_loss` over the student's logits and the
teacher's, with autograd keeping what its backward needs.

One distillation step both ways: the frozen teacher's forward, the student's
forward with the loss (temperature 2, alpha 0.5), backward, AdamW. The teacher
is the `small` preset and the student that shape at d_model 352 (about half
the parameters, as bench_compress distils), both with a LLaMA-2 sized
vocabulary (32,000), on ROWS rows of SEQ_LEN tokens. Memory: the peak-RSS
rise of one step, fresh process each. Speed: steps of both, interleaved, in
one process.

    python benchmarks/bench_distill.py [--smoke] [--no-write]
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from common import setup_torch, two_way_step_main
from heron.compress.distill import distillation_objective
from heron.compress.distill_loss import distillation_loss
from heron.models.presets import build_model
from heron.train.optim import build_optimizer
from heron.train.recipe import OptimSection

PRESET, STUDENT_WIDTH, VOCAB = "small", 352, 32000
ROWS, SEQ_LEN = 8, 512  # logits of 4096 x 32000: 500 MiB in fp32, for each model
SETTINGS = {"temperature": 2.0, "alpha": 0.5}
# The new way, then the old.
WAYS = {"fused": "the fused loss", "logits": "the loss over both models' whole logits"}


def distill_step(way: str) -> Callable[[], None]:
    """One distillation step of a fresh student from a fresh teacher, the loss taken `way`'s way."""
    setup_torch()
    torch.manual_seed(0)
    teacher = build_model(PRESET, vocab_size=VOCAB).eval().requires_grad_(False)
    student = build_model(PRESET, vocab_size=VOCAB, d_model=STUDENT_WIDTH).train()
    optimizer = build_optimizer(student, OptimSection())
    objective = distillation_objective(teacher, student.config, {}, **SETTINGS)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ_LEN + 1))
    x, y = ids[:, :-1], ids[:, 1:]

    def loss() -> torch.Tensor:
        if way == "fused":
            return student(x, targets=y, head_loss=objective.head(x)).loss
        with torch.no_grad():
            teacher_logits = teacher(x).logits
        return distillation_loss(student(x).logits, teacher_logits, y, **SETTINGS)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return step


def main() -> None:
    how = (f"one distillation step (teacher forward, student forward and loss at T = {SETTINGS['temperature']}, "
           f"alpha = {SETTINGS['alpha']}, backward, AdamW), teacher {PRESET}, student {PRESET} at d_model "
           f"{STUDENT_WIDTH}, vocabulary {VOCAB}, {ROWS} rows of {SEQ_LEN} tokens, fp32")
    notes = [f"Logits of the batch: {ROWS * SEQ_LEN} x {VOCAB}, {ROWS * SEQ_LEN * VOCAB * 4 / 2**20:.0f} MiB in "
             f"fp32 for each model; the fused loss makes both models' logits a chunk at a time."]
    two_way_step_main(__doc__, __file__, distill_step, "distill_step", WAYS, how, "distill",
                      "Distillation: fused loss vs whole logits", notes)


if __name__ == "__main__":
    main()
