"""Distillation's token loss: from both models' logits, or fused, straight from
their final hidden states without either model's whole logits.

Per target token, with student logits s, teacher logits t, temperature T and
weight alpha (Hinton, Vinyals & Dean 2015; compress/distill.py has the whole
objective):

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * (logsumexp(s) - s_y)
    d loss / d s = alpha * T * (softmax(s / T) - softmax(t / T)) + (1 - alpha) * (softmax(s) - one_hot(y))

`distillation_loss` takes the logits, (tokens, vocab) each, and makes four
more tensors of that size on the way (the two log-softmaxes, the teacher's
probabilities, their product), the student's kept alive by autograd to the
backward: at a 32k vocabulary and 8 x 512 tokens, 0.5 GiB each.

`linear_distillation_loss` walks the tokens in chunks instead, as the fused
cross-entropy does (core/head_loss.py): per chunk, the student's logits from
its hidden states and head weight, the teacher's through its head (any
module: a quantised teacher too), the loss, and the student's two gradient
products, made in the forward and scaled in the backward. The student's head
costs the plain way's three products; the teacher's its one.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from heron.core.head_loss import (IGNORE_INDEX, add_grads, chunk_logits, chunking, fusable_weight, gradient_buffers,
                                  hidden_grad, kept_rows)

# (c, V) fp32 tensors a chunk of the fused loss holds at once: its memory matches the cross-entropy's chunks.
CHUNK_SHARE = 4


def check_settings(temperature: float, alpha: float) -> None:
    """A ValueError naming the setting unless temperature > 0 and 0 <= alpha <= 1."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                      temperature: float, alpha: float) -> torch.Tensor:
    """The loss above from both models' logits, summed over the target tokens that are
    not IGNORE_INDEX.

    student_logits, teacher_logits: (..., V); targets: (...) token ids.
    """
    check_settings(temperature, alpha)
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


def linear_distillation_loss(
    hidden: torch.Tensor,  # (..., d): the student's final norm output
    head: nn.Module,  # the student's output head
    teacher_hidden: torch.Tensor,  # (..., d_t): the teacher's final norm output
    teacher_head: nn.Module,  # the teacher's output head, any module (V outputs)
    targets: torch.Tensor,  # (...) long, IGNORE_INDEX where no loss is taken
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """`distillation_loss(head(hidden), teacher_head(teacher_hidden), targets)` to fp32
    rounding, fused (module note): differentiable in hidden and the head's weight,
    never in the teacher. A student head that `fusable_weight` refuses (one with a
    bias, an adapter, a quantised layer) is called as a module, through the logits.

    Under autocast the student's products run in the autocast dtype, as F.linear's
    would, and the softmaxes in fp32."""
    check_settings(temperature, alpha)
    if hidden.shape[:-1] != targets.shape or teacher_hidden.shape[:-1] != targets.shape:
        raise ValueError(f"linear_distillation_loss: targets {tuple(targets.shape)} do not match the hidden "
                         f"states' {tuple(hidden.shape[:-1])} and the teacher's {tuple(teacher_hidden.shape[:-1])}")
    weight = fusable_weight(head)  # (V, d) or None
    if weight is None:
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden).float()  # (..., V)
        return distillation_loss(head(hidden).float(), teacher_logits, targets, temperature=temperature, alpha=alpha)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    settings = (temperature, alpha)
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearDistillation.apply(hidden, weight, teacher_hidden, targets, teacher_head, settings, dtype)
        h, y, kept = kept_rows(hidden, targets)
        teacher_rows = _rows(teacher_hidden, kept)
        return _chunked(h.to(dtype), weight.to(dtype), teacher_rows, teacher_head, y, settings, (False, False))[0]


class _LinearDistillation(torch.autograd.Function):
    """The summed loss: its gradients made in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,  # noqa: ANN205
                targets: torch.Tensor, teacher_head: nn.Module, settings: tuple[float, float], dtype: torch.dtype):
        h, y, kept = kept_rows(hidden, targets)
        want = ctx.needs_input_grad[:2]
        loss, grad_h, grad_w = _chunked(h.to(dtype), weight.to(dtype), _rows(teacher_hidden, kept), teacher_head, y,
                                        settings, want)
        ctx.grads = (hidden_grad(grad_h, kept, hidden.shape, hidden.dtype),
                     None if grad_w is None else grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor):  # noqa: ANN205
        return *(None if g is None else g * grad_loss for g in ctx.grads), None, None, None, None, None


def _rows(teacher_hidden: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """The teacher's hidden states (n, d_t) at the student's kept rows, detached."""
    rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])  # (N, d_t)
    return rows if kept is None else rows.index_select(0, kept)


def _chunked(
    h: torch.Tensor, weight: torch.Tensor, teacher_h: torch.Tensor, teacher_head: nn.Module, y: torch.Tensor,
    settings: tuple[float, float], want: tuple[bool, bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(summed loss in fp32, d loss / d h (n, d), d loss / d weight (V, d)) for the student's
    rows h (n, d), the teacher's rows teacher_h (n, d_t) and targets y (n,), all kept;
    each gradient None unless `want` asks for it."""
    temperature, alpha = settings
    rows, buffer = chunking(h, weight, share=CHUNK_SHARE)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h, grad_w = gradient_buffers(h, weight, want)
    for start in range(0, h.shape[0], rows):
        h_c, y_c = h[start:start + rows], y[start:start + rows, None]  # (c, d), (c, 1)
        student = chunk_logits(h_c, weight, buffer)  # (c, V)
        with torch.no_grad():
            teacher = teacher_head(teacher_h[start:start + rows]).float()  # (c, V)
        log_p = F.log_softmax(teacher.div_(temperature), dim=1)  # (c, V)
        del teacher
        log_q = F.log_softmax(student / temperature, dim=1)  # (c, V)
        log_z = torch.logsumexp(student, dim=1, keepdim=True)  # (c, 1)
        hard = (log_z - student.gather(1, y_c)).sum()
        p = log_p.exp()
        soft = torch.dot(p.flatten(), log_p.sub_(log_q).flatten())  # sum over rows of KL(p || q)
        loss += alpha * temperature**2 * soft + (1.0 - alpha) * hard
        if any(want):  # d loss / d student logits, made in log_q's storage
            d_logits = log_q.exp_().sub_(p).mul_(alpha * temperature)
            if alpha < 1.0:
                d_logits.add_(student.sub_(log_z).exp_(), alpha=1.0 - alpha)  # + (1 - alpha) softmax(s)
                d_logits.scatter_add_(1, y_c, d_logits.new_full(y_c.shape, alpha - 1.0))  # - (1 - alpha) one_hot
            add_grads(d_logits, h_c, weight, None if grad_h is None else grad_h[start:start + rows], grad_w)
    return loss, grad_h, grad_w


__all__ = ["check_settings", "distillation_loss", "linear_distillation_loss"]
