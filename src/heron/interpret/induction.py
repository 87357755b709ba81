"""A known mechanism to test the head tools on: induction heads in a two-layer attention-only model.

Trained on random tokens repeated once, a model can predict the second copy
only in context. A two-layer attention-only Transformer learns to, with two
heads in series (Elhage et al. 2021, "A Mathematical Framework for
Transformer Circuits"; Olsson et al. 2022): a previous-token head in layer 0
writes "the token before me" into each position, and an induction head in
layer 1 matches the current token against it (K-composition), attends to the
token after the previous occurrence, and copies it. The period varies from
batch to batch, so no head can find that token by a fixed positional offset.

`induction_head_score_margin()` trains such a model and returns how clearly
its induction heads stand out (`FoundHeads.margin`), for the benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heron.core.config import ModelConfig
from heron.core.transformer import Transformer
from heron.interpret.ablation import repeat_losses
from heron.interpret.heads import detect_heads, repeated_tokens


@dataclass(frozen=True)
class InductionTask:
    """The model, the data and the training budget; the defaults reach the target
    in about 600 steps (10-20 s on one CPU thread)."""

    vocab_size: int = 64
    d_model: int = 64
    n_heads: int = 2  # with 4, copying spread over every head of both layers in our runs
    periods: tuple[int, int] = (8, 24)  # each batch's period, drawn uniformly from [lo, hi]
    batch_size: int = 32
    lr: float = 3e-3
    # Token embeddings at unit scale (other weights keep Heron's 0.02), so a token's own
    # identity stays legible in the residual stream beside what layer 0's heads write.
    # At 0.02, layer 0 spent its second head attending to itself to amplify the current
    # token and copying needed that head too, blurring the two-head circuit. (Tied to
    # the unembedding at unit scale, nothing was learned in 2000 steps: see config.)
    embed_std: float = 1.0
    max_steps: int = 2000
    target_loss: float = 0.3  # stop once the repeated half's loss (eval period) is below this
    eval_period: int = 16
    eval_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.periods
        if not 2 <= lo <= hi <= self.vocab_size:
            raise ValueError(f"periods: need 2 <= lo <= hi <= vocab_size ({self.vocab_size}), got {self.periods}")

    def config(self) -> ModelConfig:
        """Two attention-only layers (feed_forward "none"), LayerNorm and RoPE, untied embeddings."""
        return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=2, n_heads=self.n_heads,
                           max_seq_len=2 * max(self.periods[1], self.eval_period), norm="layernorm",
                           feed_forward=("none",), tie_embeddings=False)


def induction_model(task: InductionTask = InductionTask()) -> Transformer:
    """The task's model before training (seeded by `task.seed`)."""
    torch.manual_seed(task.seed)
    model = Transformer(task.config())
    with torch.no_grad():
        model.embed.weight.normal_(0.0, task.embed_std)
    return model


@dataclass(frozen=True)
class TrainedInduction:
    model: Transformer
    steps: int  # optimizer steps taken


def train_induction_model(task: InductionTask = InductionTask()) -> TrainedInduction:
    """Train until the repeated half's loss falls below `target_loss`, or `max_steps`.
    Deterministic for a given task and thread count."""
    model = induction_model(task)
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(task.seed + 1)
    eval_ids = repeated_tokens(64, task.eval_period, task.vocab_size, seed=task.seed + 2)
    lo, hi = task.periods
    step = 0
    while step < task.max_steps:
        if step % task.eval_every == 0 and repeat_losses(model, eval_ids, task.eval_period).repeated < task.target_loss:
            break
        period = int(torch.randint(lo, hi + 1, (), generator=data))
        ids = repeated_tokens(task.batch_size, period, task.vocab_size, generator=data)  # (B, 2L)
        logits = model(ids[:, :-1]).logits  # (B, 2L - 1, V)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    return TrainedInduction(model.eval(), step)


def induction_head_score_margin(task: InductionTask = InductionTask()) -> float:
    """Train the task's model and return the margin of its induction heads over every
    other head (`detect_heads(...)["induction"].margin`, scored on a batch no step
    saw): about 0.88 for the default task on one thread."""
    trained = train_induction_model(task)
    return detect_heads(trained.model, period=task.eval_period, seed=task.seed + 3)["induction"].margin


__all__ = [
    "InductionTask", "TrainedInduction", "induction_head_score_margin", "induction_model", "train_induction_model",
]
