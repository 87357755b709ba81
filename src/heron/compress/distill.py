"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a smaller student learns
the teacher's softened next-token distribution as well as the data's tokens,
and optionally the teacher's hidden states (TinyBERT, Jiao et al. 2020).

Per target token, with temperature T, weights alpha and beta, and a layer map M
of student layers i to teacher layers j:

    alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))
        + (1 - alpha) * cross_entropy(z_student, y)
        + beta * mean over (i, j) in M of  mean over d_teacher of (W h_i - h'_j)^2

The KL is the forward one (teacher first): the student must cover every token
the teacher finds plausible. T^2 keeps the soft term's gradients on the same
scale as the hard term's as T changes (Hinton et al., section 2).

The third term is TinyBERT's hidden-state loss, MSE(H^S W_h, H^T) (Jiao et al.
2020, section 3.1; FitNets' "hints" through a learned regressor, Romero et al.
2015). h_i and h'_j are the residual streams after block i of the student and
block j of the teacher (the `blocks.{i}.hook_resid_post` hook points), and W
(d_teacher x d_student, students are usually narrower) is one linear map shared
by every matched layer, trained with the student and then dropped: it lives in
the trainer state, so the student checkpoint stays a plain model. The default
map is TinyBERT's uniform one, i -> round((i + 1) * L_teacher / L_student) - 1
(halves rounded up), so the student's last layer meets the teacher's last.
Averaging over matched layers and widths keeps beta's scale independent of
both. beta = 0 (the default) is the logit-only objective, unchanged.

The logit terms are computed fused, from both models' final hidden states and
heads, chunk by chunk (compress/distill_loss.py): neither model's (tokens,
vocabulary) logits are made whole, which at a 32k vocabulary is what would
fill memory first.

The student trains through Heron's one training loop (`train.train` with this
objective), so checkpoints, resuming, validation (plain cross-entropy,
comparable with any model's) and the energy record are the loop's own.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from heron.compress.distill_loss import check_settings, linear_distillation_loss
from heron.core.config import ModelConfig
from heron.core.transformer import HeadLoss, Transformer
from heron.train.checkpoint import (LINEAGE_FILE, check_finite_source, latest_checkpoint, resolve_checkpoint,
                                   weights_identity)
from heron.train.loop import IGNORE_INDEX, Objective, TrainResult, train
from heron.train.recipe import TrainRecipe, model_config
from heron.train.sources import resolve_data


def hidden_state_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                      projection: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The hidden term above (without beta), summed over the target tokens that are
    not IGNORE_INDEX; for one layer pair, divided by those tokens, it is
    F.mse_loss(student @ projection.T, teacher).

    student_hidden[k]: (..., d_s), matched with teacher_hidden[k]: (..., d_t);
    projection: (d_t, d_s), W; targets: (...) token ids.
    """
    if not student_hidden or len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"teacher_hidden: {len(teacher_hidden)} tensors for {len(student_hidden)} student layers "
                         "(need one per student layer, at least one)")
    keep = (targets != IGNORE_INDEX).reshape(-1)  # (N,)
    total = projection.new_zeros(())
    for student, teacher in zip(student_hidden, teacher_hidden):
        s = student.reshape(-1, student.shape[-1])[keep]  # (N, d_s)
        t = teacher.reshape(-1, teacher.shape[-1])[keep]  # (N, d_t)
        total = total + F.mse_loss(F.linear(s, projection), t, reduction="sum") / t.shape[-1]
    return total / len(student_hidden)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """TinyBERT's uniform map: student layer i -> teacher layer round((i + 1) * L_t / L_s) - 1,
    halves rounded up, never below 0 (a student over twice the teacher's depth)."""
    return {i: max(0, (2 * (i + 1) * teacher_layers + student_layers) // (2 * student_layers) - 1)
            for i in range(student_layers)}


def check_hidden_weight(hidden_weight: float) -> None:
    """A ValueError naming hidden_weight unless it is a finite number >= 0."""
    if not (math.isfinite(hidden_weight) and hidden_weight >= 0):
        raise ValueError(f"hidden_weight: must be a number >= 0, got {hidden_weight}")


def check_hidden_settings(hidden_weight: float, hidden_layers: Mapping[int, int] | None, *,
                          student_layers: int, teacher_layers: int) -> dict[int, int]:
    """The layer map (student layer -> teacher layer) the settings ask for, or a
    ValueError naming the bad field and value. None means the uniform map."""
    check_hidden_weight(hidden_weight)
    if hidden_layers is not None and hidden_weight == 0:
        raise ValueError(f"hidden_layers: {dict(hidden_layers)} given, but hidden_weight is 0, "
                         "so no hidden state is matched; set hidden_weight > 0")
    if hidden_layers is None:
        return uniform_layer_map(student_layers, teacher_layers)
    if not hidden_layers:
        raise ValueError("hidden_layers: maps no layer; leave it unset for the uniform map")
    for i, j in hidden_layers.items():
        if not 0 <= i < student_layers:
            raise ValueError(f"hidden_layers: student layer {i} is out of range; the student has "
                             f"{student_layers} layers (0..{student_layers - 1})")
        if not 0 <= j < teacher_layers:
            raise ValueError(f"hidden_layers: teacher layer {j} (for student layer {i}) is out of range; "
                             f"the teacher has {teacher_layers} layers (0..{teacher_layers - 1})")
    return dict(sorted(hidden_layers.items()))


def resid_post(layer: int) -> str:
    """The hook point of the residual stream after block `layer`: (B, T, d)."""
    return f"blocks.{layer}.hook_resid_post"


def teacher_states(teacher: Transformer, x: torch.Tensor, hook_names: Sequence[str] = ()
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The frozen teacher on inputs x (b, T): (its final norm's output (b, T, d_t), its
    activations at `hook_names`), from one forward that makes no logits (a head loss
    that keeps the hidden states it is handed)."""
    seen: dict[str, torch.Tensor] = {}
    final: list[torch.Tensor] = []

    def record(activation: torch.Tensor, name: str) -> None:
        seen[name] = activation

    def keep_hidden(hidden: torch.Tensor, _head: nn.Module, _targets: torch.Tensor) -> torch.Tensor:
        final.append(hidden)
        return hidden.new_zeros(())

    with torch.no_grad(), teacher.hooks(dict.fromkeys(hook_names, record)):
        teacher(x, targets=x, head_loss=keep_hidden)  # the targets are never read
    return final[0], seen


def distillation_objective(teacher: Transformer, student: ModelConfig, layer_map: Mapping[int, int], *,
                           temperature: float, alpha: float, hidden_weight: float = 0.0,
                           seed: int = 0) -> Objective:
    """The training loop's objective. Per micro-batch the frozen teacher runs first
    (`teacher_states`), then the student's forward scores its final hidden states
    against the teacher's (`linear_distillation_loss`: neither model's logits are
    made whole). With hidden_weight > 0 the loop also hands over the student's
    residual streams at the mapped layers, the teacher's come from its same
    forward, and the objective's parameters are the projection W, for the loop
    to train; with 0 the layer map is unused."""
    check_settings(temperature, alpha)
    teacher.eval().requires_grad_(False)
    matched = hidden_weight > 0
    student_names = [resid_post(i) for i in layer_map] if matched else []
    teacher_names = [resid_post(j) for j in layer_map.values()] if matched else []
    projection = None
    if matched:
        with torch.random.fork_rng(devices=[]):  # the same W on every process and every rerun; global RNG untouched
            torch.manual_seed(seed)
            projection = nn.Linear(student.d_model, teacher.config.d_model, bias=False)  # W: (d_t, d_s)
    teacher_activations: dict[str, torch.Tensor] = {}  # the current micro-batch's, by hook name

    def head(x: torch.Tensor) -> HeadLoss:
        hidden, activations = teacher_states(teacher.to(x.device), x, teacher_names)  # moved once, to the run's device
        teacher_activations.clear()
        teacher_activations.update(activations)
        return lambda student_hidden, student_head, y: linear_distillation_loss(
            student_hidden, student_head, hidden, teacher.lm_head, y, temperature=temperature, alpha=alpha)

    def loss(x: torch.Tensor, distilled: torch.Tensor, y: torch.Tensor,
             activations: dict[str, torch.Tensor]) -> torch.Tensor:
        if projection is None:
            return distilled
        hidden = hidden_state_loss([activations[n].float() for n in student_names],  # each (b, T, d_s)
                                   [teacher_activations[n].float() for n in teacher_names],  # each (b, T, d_t)
                                   projection.weight, y)
        return distilled + hidden_weight * hidden

    return Objective(loss, hook_names=tuple(student_names), params=projection, head=head)


def distill(teacher_dir: str | Path, recipe: TrainRecipe, *, temperature: float = 2.0, alpha: float = 0.5,
            hidden_weight: float = 0.0, hidden_layers: Mapping[int, int] | None = None,
            resume: bool = True) -> TrainResult:
    """Train the student the recipe describes (its model section, its data, which
    must be tokenised with the teacher's tokenizer) from the teacher: any folder
    `heron.load` reads (a Heron checkpoint, quantised or pruned ones too, or a
    Hugging Face model folder such as a LLaMA's). The student's vocabulary is the
    teacher's, which may have more rows than the tokenizer has tokens.

    hidden_weight > 0 adds the hidden term; hidden_layers maps student layers to
    teacher layers (None: the uniform map)."""
    import heron  # heron.load sits above every layer

    teacher, teacher_tokenizer = heron.load(teacher_dir)
    check_finite_source(teacher, teacher_dir, "teacher")
    data = resolve_data(recipe.data)
    data_tokenizer = getattr(data.tokenizer, "fingerprint", None)
    teacher_fingerprint = getattr(teacher_tokenizer, "fingerprint", None)
    if data_tokenizer is not None and teacher_fingerprint is not None and data_tokenizer() != teacher_fingerprint():
        raise ValueError(f"teacher: {teacher_dir}'s tokenizer is not the one the recipe's data ({recipe.data.shards}) "
                         "was tokenised with; tokenise the data with the teacher's tokenizer")
    vocab_size = teacher.config.vocab_size  # may exceed its tokenizer's (Qwen2: 151,936 rows for 151,646 tokens)
    if data.vocab_size > vocab_size:
        raise ValueError(f"teacher: vocabulary of {vocab_size} tokens, but the recipe's data "
                         f"({recipe.data.shards or 'synthetic'}) has {data.vocab_size}; tokenise the data with "
                         "the teacher's tokenizer")
    compared = data_tokenizer is not None and teacher_fingerprint is not None
    if data.vocab_size < vocab_size and not compared:  # padded rows, or another, smaller tokenizer's data
        warnings.warn(f"teacher: {vocab_size} rows, the recipe's data ({recipe.data.shards or 'synthetic'}) "
                      f"{data.vocab_size} tokens, and no tokenizer fingerprint on both sides to check they are "
                      "the teacher's; distil only on data tokenised with the teacher's tokenizer",
                      RuntimeWarning, stacklevel=2)
    pinned = recipe.model.overrides.get("vocab_size")
    if pinned is not None and pinned != vocab_size:  # the KL compares the two distributions token by token
        raise ValueError(f"vocab_size: the student's is {pinned} (the recipe's model section), the teacher's "
                         f"{vocab_size}; distillation needs the same vocabulary (leave model.overrides.vocab_size "
                         "unset: the student takes the teacher's)")
    if teacher.config.max_seq_len < recipe.data.seq_len:  # the teacher reads each training window whole
        raise ValueError(f"teacher: max_seq_len {teacher.config.max_seq_len} is below data.seq_len "
                         f"{recipe.data.seq_len}; give the student windows the teacher can read (data.seq_len "
                         f"<= {teacher.config.max_seq_len})")
    student = model_config(recipe, vocab_size)
    if Path(recipe.out_dir).resolve().is_relative_to(Path(teacher_dir).resolve()):
        raise ValueError(f"out_dir: {recipe.out_dir} is inside the teacher {teacher_dir}; write the student's "
                         "run to a folder outside it")
    layer_map = check_hidden_settings(hidden_weight, hidden_layers, student_layers=student.n_layers,
                                      teacher_layers=teacher.config.n_layers)
    settings = {"temperature": temperature, "alpha": alpha, "hidden_weight": hidden_weight}
    objective = distillation_objective(teacher, student, layer_map, seed=recipe.train.seed, **settings)
    if hidden_weight > 0:
        settings["hidden_layers"] = {str(i): j for i, j in layer_map.items()}  # JSON keys: student layers
    lineage = {"distillation": {"teacher": str(resolve_checkpoint(teacher_dir).resolve()), **settings,
                                "teacher_config": teacher.config.to_dict(),
                                "teacher_weights": weights_identity(teacher_dir)}}
    if resume:
        _check_same_distillation(recipe.out_dir, lineage["distillation"])
    # The student is built to the teacher's vocabulary, which covers the data's (ids stay below either).
    data = dataclasses.replace(data, vocab_size=vocab_size)
    return train(recipe, resume=resume, data=data, lineage=lineage, token_loss=objective)


def _check_same_distillation(out_dir: str | Path, now: Mapping[str, object]) -> None:
    """A run resumes only under the teacher and loss it began with: its lineage names one
    distillation, so a second one would be recorded over the first, unseen."""
    found = latest_checkpoint(out_dir)
    if found is None:
        return
    then = json.loads((found / LINEAGE_FILE).read_text(encoding="utf-8")).get("distillation", {})
    for key, value in json.loads(json.dumps(now)).items():  # as the lineage holds it: tuples as lists
        if then.get(key) != value:
            raise ValueError(f"{out_dir}: resuming a distillation whose {key} was {then.get(key)!r}, now "
                             f"{value!r}; give the same teacher and settings, or start over (--no-resume)")


__all__ = ["check_hidden_settings", "check_hidden_weight", "distill", "distillation_objective", "hidden_state_loss", "teacher_states",
           "uniform_layer_map"]
