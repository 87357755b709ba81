"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a smaller student learns
the teacher's softened next-token distribution as well as the data's tokens.

Per target token, with temperature T and weight alpha:

    alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))
        + (1 - alpha) * cross_entropy(z_student, y)

The KL is the forward one (teacher first): the student must cover every token
the teacher finds plausible. T^2 keeps the soft term's gradients on the same
scale as the hard term's as T changes (Hinton et al., section 2). The student
trains through Heron's one training loop (`train.train` with this objective),
so checkpoints, resuming, validation (plain cross-entropy, comparable with any
model's) and the energy record are the loop's own.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from heron.core.transformer import Transformer
from heron.train import load_model_folder
from heron.train.loop import IGNORE_INDEX, TokenLoss, TrainResult, train
from heron.train.recipe import TrainRecipe
from heron.train.sources import resolve_data


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                      temperature: float, alpha: float) -> torch.Tensor:
    """The objective above, summed over the target tokens that are not IGNORE_INDEX.

    student_logits, teacher_logits: (..., V); targets: (...) token ids.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits: shape {tuple(teacher_logits.shape)} differs from the student's "
                         f"{tuple(student_logits.shape)} (the two models need one vocabulary)")
    keep = (targets != IGNORE_INDEX).reshape(-1)  # (N,)
    student = student_logits.reshape(-1, student_logits.shape[-1])[keep]  # (N, V)
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])[keep]  # (N, V)
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    soft = (log_p.exp() * (log_p - log_q)).sum()  # sum over tokens of KL(p || q)
    hard = F.cross_entropy(student, targets.reshape(-1)[keep], reduction="sum")
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


def teacher_loss(teacher: Transformer, *, temperature: float, alpha: float) -> TokenLoss:
    """The training loop's objective: the frozen teacher scores each micro-batch."""
    teacher.eval().requires_grad_(False)

    def loss(x: torch.Tensor, student_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x).logits.float()  # (b, T, V)
        return distillation_loss(student_logits, teacher_logits, y, temperature=temperature, alpha=alpha)

    return loss


def distill(teacher_dir: str | Path, recipe: TrainRecipe, *, temperature: float = 2.0, alpha: float = 0.5,
            resume: bool = True) -> TrainResult:
    """Train the student the recipe describes (its model section, its data, which
    must be tokenised with the teacher's tokenizer) from the teacher checkpoint."""
    teacher, _ = load_model_folder(teacher_dir)
    data = resolve_data(recipe.data)
    if teacher.config.vocab_size != data.vocab_size:
        raise ValueError(f"teacher: vocabulary of {teacher.config.vocab_size} tokens, but the recipe's data "
                         f"({recipe.data.shards or 'synthetic'}) has {data.vocab_size}; tokenise the data with "
                         "the teacher's tokenizer")
    lineage = {"distillation": {"teacher": str(Path(teacher_dir).resolve()), "temperature": temperature,
                                "alpha": alpha, "teacher_config": teacher.config.to_dict()}}
    return train(recipe, resume=resume, data=data, lineage=lineage,
                 token_loss=teacher_loss(teacher, temperature=temperature, alpha=alpha))


__all__ = ["distill", "distillation_loss", "teacher_loss"]
