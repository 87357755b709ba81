"""Sparse autoencoders (SAEs) on the activations of one hook point.

An SAE rewrites an activation x (d,) as a sparse, non-negative code f (m,),
m = expansion * d, and reads it back as a sum of decoder columns:

    f     = act(W_enc (x - b_dec) + b_enc)         # (m,)   act: top-k or ReLU
    x_hat = W_dec f + b_dec                        # (d,)

Subtracting the decoder bias before encoding is the "pre-encoder bias" of
Bricken et al. 2023, "Towards Monosemanticity". Two ways to make f sparse,
one table row each (`SPARSITIES`):

- "topk": keep the k largest pre-activations, then ReLU (Gao et al. 2024,
  "Scaling and evaluating sparse autoencoders", eq. 2), with their AuxK loss:
  the k_aux largest *dead* latents are trained to explain what the live ones
  missed, which revives them (Gao et al. 2024, appendix A.2).
- "l1": ReLU and an L1 penalty on f (Bricken et al. 2023).

In both, decoder columns are kept at unit norm (Bricken et al. 2023; Gao et
al. 2024 do the same): the gradient's component along each column is removed
before the Adam step and the columns are renormalised after it. Without this
an L1 penalty could be dodged by shrinking f and growing W_dec. (Anthropic's
April 2024 update instead weights the L1 by decoder norms; with unit-norm
columns the two penalties are the same number, and one constraint serves both
modes here.) Encoder and decoder start tied, W_dec = W_enc^T (Gao et al.
2024, section 2.4), and b_dec starts at the data mean.

Activations are scaled by one constant so that E[||x||^2] = d (Anthropic,
April 2024 update), so lr, l1_coeff and aux_coeff mean the same at every hook
point; the SAE's inputs and outputs stay in the model's own units.

A feature is *dead* when it has not fired on any of the last `dead_tokens`
training tokens (Gao et al. 2024 count 10M tokens; our runs are smaller).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from heron.core.config import check_fields
from heron.core.head_loss import next_token_targets
from heron.core.hooks import HookFn, attach_hooks
from heron.core.modes import evaluating
from heron.data.batches import PackedBatches, TokenStream, epoch_rows
from heron.data.shards import load_shards
from heron.interpret.cache import check_next_token_head, position_axis

# Gao et al. 2024, appendix A: Adam with the default betas and a small epsilon.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 6.25e-10
# For a model without next-token loss (head "scalar"), which evaluate_sae measures SAEs by.
NO_LOSS_INSTEAD = ("an SAE is measured by the next-token loss it recovers. Train one without that measure: "
                   "train_sae(gather_activations(model, windows, hook_name).flatten(0, -2), settings)")
HOLDOUT_FRACTION = 0.1  # of the windows, when train_sae_on_model is given no evaluation windows
FIT_SAMPLE = 65536  # activations that set the input scale and b_dec's starting point
_FIELD_TYPES = {"str": (str,), "int": (int,), "float": (int, float)}  # SAESettings annotations -> accepted types


# ----- settings ----------------------------------------------------------------


@dataclass(frozen=True)
class SAESettings:
    """How an SAE is shaped and trained. Validated at construction; frozen."""

    sparsity: str = "topk"  # a key of SPARSITIES
    expansion: int = 8  # n_features = expansion * d_in
    k: int = 32  # topk: active features per token
    aux_k: int = 256  # topk: dead features in the AuxK loss (0: no AuxK)
    aux_coeff: float = 1 / 32  # topk: AuxK weight (Gao et al. 2024, appendix A.2)
    l1_coeff: float = 5.0  # l1: penalty weight, on activations scaled to E||x||^2 = d
    lr: float = 1e-3
    lr_decay_fraction: float = 0.2  # linear decay to zero over this final part of training
    batch_size: int = 1024  # activations (tokens) per step
    # 500 x 1024 tokens: on a 600-step 8-layer d=352 stdlib model, 400 such steps at
    # k=32 gave nMSE 0.02 and 93% of the loss recovered at blocks.4.hook_mlp_out.
    steps: int = 500
    dead_tokens: int = 100_000  # a feature silent this many tokens in a row is dead
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), _FIELD_TYPES[f.type]
            if isinstance(value, bool) or not isinstance(value, allowed):
                raise TypeError(f"{f.name}: expected {f.type}, got {value!r}")
        if self.sparsity not in SPARSITIES:
            raise ValueError(f"sparsity: {self.sparsity!r} is not one of {', '.join(SPARSITIES)}")
        for name in ("expansion", "k", "lr", "batch_size", "steps", "dead_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)!r}")
        for name in ("aux_k", "aux_coeff", "l1_coeff", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.lr_decay_fraction <= 1.0:
            raise ValueError(f"lr_decay_fraction: must be in [0, 1], got {self.lr_decay_fraction!r}")

    def replace(self, **changes: Any) -> SAESettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAESettings:
        """Build from a plain dict; unknown keys are errors that name the key."""
        check_fields(cls, data)
        return cls(**data)


# ----- the pure math -----------------------------------------------------------


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """(..., m) -> (..., m): the k largest entries, ReLU'd; zeros elsewhere (Gao et al. 2024, eq. 2)."""
    values, indices = pre.topk(k, dim=-1, sorted=False)  # (..., k) each
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """||x - x_hat||^2 summed over features, averaged over tokens: (N, d), (N, d) -> ()."""
    return (x - x_hat).pow(2).sum(-1).mean()


def l1_penalty(f: torch.Tensor) -> torch.Tensor:
    """sum_i |f_i|, averaged over tokens: (N, m) -> (). Decoder columns are unit norm,
    so this equals Anthropic's (April 2024) sum_i f_i ||W_dec[:, i]||."""
    return f.abs().sum(-1).mean()


def auxk_loss(
    residual: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, W_dec: torch.Tensor, aux_k: int
) -> torch.Tensor:
    """||e - e_hat||^2 (Gao et al. 2024, appendix A.2): e (N, d) is the main reconstruction's
    error, e_hat = W_dec z with z the top-aux_k pre-activations (N, m) among dead features (m,)."""
    n_dead = int(dead.sum())
    if n_dead == 0 or aux_k == 0:
        return pre.new_zeros(())
    masked = pre.masked_fill(~dead, float("-inf"))  # (N, m): only dead features compete
    z = topk_relu(masked, min(aux_k, n_dead))  # (N, m): k <= n_dead, so no -inf is picked
    return squared_error(residual, z @ W_dec.T)


def loss_recovered(clean: float, ablated: float, spliced: float) -> float:
    """(L_ablated - L_spliced) / (L_ablated - L_clean): 1 when splicing in the SAE costs
    nothing, 0 when it is as bad as ablating the activation."""
    return (ablated - spliced) / (ablated - clean)


def sae_lr(step: int, settings: SAESettings) -> float:
    """Constant, then linear decay to zero over the final lr_decay_fraction of steps
    (Anthropic, April 2024 update)."""
    decay_start = settings.steps * (1.0 - settings.lr_decay_fraction)
    if step < decay_start:
        return settings.lr
    return settings.lr * (settings.steps - step) / (settings.steps - decay_start)


class _Pass(NamedTuple):
    """One training forward in normalised units, what a sparsity penalty may read."""

    pre: torch.Tensor  # (N, m)
    f: torch.Tensor  # (N, m)
    residual: torch.Tensor  # (N, d): x - x_hat, detached
    dead: torch.Tensor  # (m,) bool
    W_dec: torch.Tensor  # (d, m)


@dataclass(frozen=True)
class Sparsity:
    """A sparsity mode: the activation pre -> f, and its extra training loss."""

    activate: Callable[[torch.Tensor, SAESettings], torch.Tensor]
    penalty: Callable[[_Pass, SAESettings], torch.Tensor]


SPARSITIES: dict[str, Sparsity] = {
    "topk": Sparsity(
        activate=lambda pre, s: topk_relu(pre, s.k),
        penalty=lambda p, s: s.aux_coeff * auxk_loss(p.residual, p.pre, p.dead, p.W_dec, s.aux_k),
    ),
    "l1": Sparsity(activate=lambda pre, s: pre.relu(), penalty=lambda p, s: s.l1_coeff * l1_penalty(p.f)),
}


# ----- the module ----------------------------------------------------------------


class SparseAutoencoder(nn.Module):
    """x (..., d_in) -> (x_hat (..., d_in), f (..., n_features)), in the model's units."""

    def __init__(self, d_in: int, settings: SAESettings, hook_name: str | None = None) -> None:
        super().__init__()
        self.d_in, self.settings, self.hook_name = d_in, settings, hook_name
        m = self.n_features = settings.expansion * d_in
        if settings.sparsity == "topk" and settings.k > m:
            raise ValueError(f"k: {settings.k} exceeds n_features {m} (expansion {settings.expansion} * d_in {d_in})")
        self.W_enc = nn.Parameter(torch.empty(m, d_in))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.empty(d_in, m))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.ones(()))  # x * input_scale has E||x||^2 = d_in
        self.register_buffer("tokens_since_fired", torch.zeros(m, dtype=torch.long))  # (m,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random unit-norm decoder columns, drawn from settings.seed (the global RNG is
        left alone); the encoder starts as their transpose (Gao et al. 2024, section 2.4)."""
        generator = torch.Generator().manual_seed(self.settings.seed)
        with torch.no_grad():
            self.W_dec.copy_(F.normalize(torch.randn(self.d_in, self.n_features, generator=generator), dim=0))
            self.W_enc.copy_(self.W_dec.T)

    def fit_input(self, x: torch.Tensor) -> None:
        """Set the input scale and b_dec from a sample of activations x (N, d_in)."""
        with torch.no_grad():
            self.input_scale.fill_(math.sqrt(self.d_in / x.double().pow(2).sum(-1).mean().item()))
            self.b_dec.copy_((x * self.input_scale).mean(0))

    @property
    def sparsity(self) -> Sparsity:
        return SPARSITIES[self.settings.sparsity]

    def pre_activations(self, x_norm: torch.Tensor) -> torch.Tensor:
        """(..., d) normalised -> (..., m)."""
        return (x_norm - self.b_dec) @ self.W_enc.T + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations (..., m) of raw activations x (..., d)."""
        return self.sparsity.activate(self.pre_activations(x * self.input_scale), self.settings)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Raw-unit reconstruction (..., d) of features f (..., m)."""
        return (f @ self.W_dec.T + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def dead_features(self) -> torch.Tensor:
        """(m,) bool: features silent over the last `dead_tokens` training tokens."""
        return self.tokens_since_fired >= self.settings.dead_tokens

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss (), f (N, m)) for raw activations x (N, d): squared error in normalised
        units plus the sparsity mode's penalty."""
        x_norm = x * self.input_scale  # (N, d)
        pre = self.pre_activations(x_norm)  # (N, m)
        f = self.sparsity.activate(pre, self.settings)  # (N, m)
        x_hat = f @ self.W_dec.T + self.b_dec  # (N, d)
        state = _Pass(pre, f, (x_norm - x_hat).detach(), self.dead_features(), self.W_dec)
        return squared_error(x_norm, x_hat) + self.sparsity.penalty(state, self.settings), f

    def constrain_decoder(self) -> None:
        """Before the optimiser step: drop the gradient along each unit column
        (it could only change the column's norm)."""
        W, g = self.W_dec, self.W_dec.grad
        if g is not None:
            g.sub_(W * (W * g).sum(0, keepdim=True))

    def normalize_decoder(self) -> None:
        """After the optimiser step: put every decoder column back on the unit sphere."""
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12))

    def count_firing(self, f: torch.Tensor) -> None:
        """Dead-feature accounting for one batch f (N, m)."""
        fired = (f > 0).any(0)  # (m,)
        self.tokens_since_fired.add_(f.shape[0]).masked_fill_(fired, 0)


# ----- training ----------------------------------------------------------------


@dataclass
class SAETraining:
    """An SAE part- or fully trained, with what it takes to continue."""

    sae: SparseAutoencoder
    step: int  # optimiser steps taken
    optimizer_state: dict[str, torch.Tensor]  # Adam state as "param.key" -> tensor; empty when fresh
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


def train_sae(
    activations: torch.Tensor,  # (N, d)
    settings: SAESettings,
    *,
    resume_from: SAETraining | None = None,
    stop_at: int | None = None,
    progress: bool = True,
) -> SAETraining:
    """Train (or continue `resume_from`) to settings.steps, or to `stop_at`.

    Step s trains on rows epoch_rows(N, batch_size, s, seed): every activation
    once per epoch, in an order fixed by (seed, epoch), so a resumed run sees
    the batches an unbroken one would and ends bit for bit the same.

    dtype: float64 activations train a float64 SAE; any other dtype (float32,
    half precision) trains a float32 one, as half precision is too coarse for
    Adam. Each batch is converted to the SAE's dtype, so a resumed SAE keeps the
    dtype it began with.

    `resume_from` is left as it was: training continues on a copy of its SAE and
    Adam state, so resuming from it again gives the same run.
    """
    _check_activations(activations)
    sae = _starting_sae(activations, settings) if resume_from is None else _resumed_sae(resume_from, settings)
    dtype = sae.W_enc.dtype
    optimizer = torch.optim.Adam(sae.parameters(), lr=settings.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    if resume_from is not None and resume_from.optimizer_state:
        _load_adam_state(optimizer, sae, resume_from.optimizer_state)
    start = resume_from.step if resume_from else 0
    end = min(settings.steps, stop_at if stop_at is not None else settings.steps)
    bar = tqdm(range(start, end), desc="sae", disable=not progress, initial=start, total=settings.steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = sae_lr(step, settings)
        x = activations[epoch_rows(len(activations), settings.batch_size, step, settings.seed)].to(dtype)  # (B, d)
        loss, f = sae.training_loss(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.constrain_decoder()
        optimizer.step()
        sae.normalize_decoder()
        sae.count_firing(f.detach())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", dead=int(sae.dead_features().sum()))
    return SAETraining(sae, max(start, end), _adam_state(optimizer, sae))


def _check_activations(activations: torch.Tensor) -> None:
    """ValueError naming what no SAE can be trained on, before any step: a NaN or inf
    row turns every weight NaN within a step, without an error; all-zero activations
    (an attention-only layer's hook_mlp_out) leave no input scale to fit (E||x||^2 = 0);
    no rows leave no batch to draw."""
    if activations.dim() != 2:
        raise ValueError(f"activations: expected (N, d), got {tuple(activations.shape)}")
    if activations.shape[0] == 0:
        raise ValueError("activations: no rows to train on")
    finite = torch.isfinite(activations).all(-1)  # (N,)
    if not finite.all():
        row = int((~finite).nonzero()[0])
        raise ValueError(f"activations: row {row} holds NaN or inf ({int((~finite).sum())} of {len(finite)} rows "
                         "do); remove them, or gather activations from a model whose forward is finite")
    if not activations.any():
        raise ValueError(f"activations: all {len(activations)} rows are zero, nothing to reconstruct; choose a hook "
                         "point that carries a signal (an attention-only layer's hook_mlp_out is always zero)")


def _training_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a fresh SAE trains in: float64 for float64 activations, else float32.
    Half precision is too coarse for Adam's eps and the unit-norm decoder, and
    float32 is what `gather_activations` returns."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _starting_sae(activations: torch.Tensor, settings: SAESettings) -> SparseAutoencoder:
    dtype = _training_dtype(activations.dtype)
    sae = SparseAutoencoder(activations.shape[1], settings).to(activations.device, dtype)
    sample = epoch_rows(len(activations), min(len(activations), FIT_SAMPLE), 0, settings.seed)
    sae.fit_input(activations[sample].to(dtype))
    return sae


def _resumed_sae(resume: SAETraining, settings: SAESettings) -> SparseAutoencoder:
    """A copy of resume's SAE to continue, so `resume` stays a valid starting point;
    other settings would not give the unbroken run."""
    trained = resume.sae.settings
    for name, value in settings.to_dict().items():
        if value != getattr(trained, name):
            raise ValueError(f"{name}: resuming with {value!r}, but the SAE was trained with {getattr(trained, name)!r}")
    return copy.deepcopy(resume.sae)


ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _adam_state(optimizer: torch.optim.Adam, sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state flattened to "W_enc.exp_avg" -> tensor (safetensors holds flat maps)."""
    return {
        f"{name}.{key}": optimizer.state[param][key].detach().clone()
        for name, param in sae.named_parameters()
        if param in optimizer.state
        for key in ADAM_KEYS
    }


def _load_adam_state(optimizer: torch.optim.Adam, sae: SparseAutoencoder, flat: dict[str, torch.Tensor]) -> None:
    """The inverse of _adam_state; load_state_dict puts each tensor where Adam wants it.
    Cloned: Adam may keep the given tensors and update them in place, which would
    change the SAETraining they came from."""
    names = [name for name, _ in sae.named_parameters()]  # Adam numbers parameters in this order
    state = {i: {key: flat[f"{name}.{key}"].clone() for key in ADAM_KEYS} for i, name in enumerate(names)}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


# ----- activations from a model ------------------------------------------------------


def sample_windows(
    source: TokenStream | str | os.PathLike[str], n_windows: int, seq_len: int, *, split: str = "train", seed: int = 0
) -> torch.Tensor:
    """(n_windows, seq_len) token ids at random offsets of a token stream or of a
    shard folder's `split` (PackedBatches' step-0 windows for `seed`)."""
    tokens = getattr(load_shards(source), split) if isinstance(source, (str, os.PathLike)) else source
    x, y = PackedBatches(tokens, n_windows, seq_len - 1, seed).batch(0)  # (N, T-1) each, y = x shifted
    return torch.cat([x[:, :1], y], dim=1)  # (N, T)


class _Reached(Exception):
    def __init__(self, activation: torch.Tensor) -> None:
        self.activation = activation


def _batches(windows: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, len(windows), batch_size):
        yield start, windows[start : start + batch_size]


@torch.no_grad()
def capture(model: nn.Module, ids: torch.Tensor, hook_name: str) -> torch.Tensor:
    """The activation at `hook_name` for token ids (B, T), in eval mode; the forward
    stops there, so the layers above it are never run."""

    def stop(activation: torch.Tensor, _name: str) -> None:
        raise _Reached(activation)

    try:
        with evaluating(model), attach_hooks(model, {hook_name: stop}):
            model(ids)
    except _Reached as reached:
        return reached.activation.float()
    raise RuntimeError(f"the forward pass never reached hook point {hook_name!r}")


def gather_activations(
    model: nn.Module, windows: torch.Tensor, hook_name: str, *, batch_size: int = 16, progress: bool = False
) -> torch.Tensor:
    """Activations (N, T, ...) at `hook_name` for token windows (N, T), float32."""
    device = next(model.parameters()).device
    batches = tqdm(list(_batches(windows, batch_size)), desc="activations", disable=not progress)
    return torch.cat([capture(model, ids.to(device), hook_name) for _, ids in batches])


# ----- metrics ----------------------------------------------------------------------


@dataclass(frozen=True)
class SAEMetrics:
    """An SAE measured on held-out windows. Losses are mean next-token cross-entropy.

    `tokens`, `l0` and `normalized_mse` count the hook point's activation rows: one
    per token on the residual stream or an MLP's output, one per (token, head) on a
    per-head hook point such as `blocks.0.attn.hook_q`."""

    tokens: int  # activation rows measured
    l0: float  # mean active features per activation row
    normalized_mse: float  # E||x - x_hat||^2 / E||x - E x||^2
    loss_clean: float
    loss_sae: float  # the SAE's reconstruction spliced in at the hook point
    loss_zero: float  # the hook point's activation zeroed
    loss_recovered: float  # (loss_zero - loss_sae) / (loss_zero - loss_clean)
    dead_fraction: float  # of features, by the training-time accounting
    loss_mean: float | None = None  # the activation replaced by its training mean
    loss_recovered_mean: float | None = None  # (loss_mean - loss_sae) / (loss_mean - loss_clean)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_width(sae: SparseAutoencoder, hook_name: str, width: int) -> None:
    if width != sae.d_in:
        trained_on = f" (it was trained on {sae.hook_name!r})" if sae.hook_name else ""
        raise ValueError(f"hook_name: {hook_name!r} gives activations of width {width}, but the SAE takes d_in "
                         f"{sae.d_in}{trained_on}")


def _next_token_loss(model: nn.Module, ids: torch.Tensor, fns: dict[str, HookFn]) -> float:
    """Summed cross-entropy of predicting ids[:, 1:] from ids (B, T) with hooks attached, in eval mode."""
    with evaluating(model), attach_hooks(model, fns):
        return model(ids, targets=next_token_targets(ids)).loss.item()  # the head loss: no whole logits


@torch.no_grad()
def evaluate_sae(
    model: nn.Module,
    sae: SparseAutoencoder,
    windows: torch.Tensor,  # (N, T) token ids
    hook_name: str,
    *,
    mean_activation: torch.Tensor | None = None,  # (d,): also report mean ablation
    batch_size: int = 16,
) -> SAEMetrics:
    """L0, normalised MSE and the fraction of language-model loss recovered."""
    check_next_token_head("evaluate_sae", model, NO_LOSS_INSTEAD)
    device = next(model.parameters()).device
    splice: HookFn = lambda a, _: sae(a)[0].to(a.dtype)  # noqa: E731
    ablations: dict[str, HookFn] = {"zero": lambda a, _: torch.zeros_like(a)}
    if mean_activation is not None:
        ablations["mean"] = lambda a, _: mean_activation.to(a).expand_as(a)
    losses = dict.fromkeys(["clean", "sae", *ablations], 0.0)
    tokens, active, sq_err, sq_norm = 0, 0.0, 0.0, 0.0
    x_sum = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    for _, ids in _batches(windows, batch_size):
        ids, seen = ids.to(device), []
        losses["clean"] += _next_token_loss(model, ids, {hook_name: lambda a, _: seen.append(a)})
        x = seen[0].float().flatten(0, -2)  # (B*T, d)
        _check_width(sae, hook_name, x.shape[-1])
        x_hat, f = sae(x)
        tokens += x.shape[0]
        active += (f > 0).sum().item()
        sq_err += (x - x_hat).double().pow(2).sum().item()
        sq_norm += x.double().pow(2).sum().item()
        x_sum += x.double().sum(0)
        losses["sae"] += _next_token_loss(model, ids, {hook_name: splice})
        for kind, fn in ablations.items():
            losses[kind] += _next_token_loss(model, ids, {hook_name: fn})
    variance = sq_norm / tokens - (x_sum / tokens).pow(2).sum().item()
    mean = {kind: total / (len(windows) * (windows.shape[1] - 1)) for kind, total in losses.items()}
    return SAEMetrics(
        tokens=tokens,
        l0=active / tokens,
        normalized_mse=sq_err / tokens / variance,
        loss_clean=mean["clean"],
        loss_sae=mean["sae"],
        loss_zero=mean["zero"],
        loss_recovered=loss_recovered(mean["clean"], mean["zero"], mean["sae"]),
        dead_fraction=sae.dead_features().float().mean().item(),
        loss_mean=mean.get("mean"),
        loss_recovered_mean=loss_recovered(mean["clean"], mean["mean"], mean["sae"]) if "mean" in mean else None,
    )


def train_sae_on_model(
    model: nn.Module,
    windows: torch.Tensor,  # (N, T) token ids
    hook_name: str,
    settings: SAESettings,
    *,
    eval_windows: torch.Tensor | None = None,  # default: the last HOLDOUT_FRACTION of `windows`
    progress: bool = True,
) -> tuple[SparseAutoencoder, SAEMetrics]:
    """Cache `hook_name`'s activations on `windows`, train an SAE on them and
    measure it on held-out windows (mean ablation against the training mean).
    The measure is next-token loss, so a model without one (head "scalar") is
    refused before any training."""
    check_next_token_head("train_sae_on_model", model, NO_LOSS_INSTEAD)
    if eval_windows is None:
        held = max(1, int(len(windows) * HOLDOUT_FRACTION))
        if held >= len(windows):
            raise ValueError(f"windows: need at least 2 to hold some out, got {len(windows)}")
        windows, eval_windows = windows[:-held], windows[-held:]
    acts = gather_activations(model, windows, hook_name, progress=progress).flatten(0, -2)  # (N*T, d)
    sae = train_sae(acts, settings, progress=progress).sae
    sae.hook_name = hook_name
    return sae, evaluate_sae(model, sae, eval_windows, hook_name, mean_activation=acts.mean(0))


# ----- top-activating contexts ------------------------------------------------------


@dataclass(frozen=True)
class TopContexts:
    """For each feature, the k windows where it peaks highest, best first.

    Ties go to the earlier window, and within a window to the earlier position.
    Entries past the windows where a feature fires at all have value 0 and
    window, position and tokens -1.
    """

    values: torch.Tensor  # (m, k): the feature's peak activation in the window
    windows: torch.Tensor  # (m, k) long: index into the evaluated windows
    positions: torch.Tensor  # (m, k) long: the peak's position in the window
    tokens: torch.Tensor  # (m, k, 2c + 1) long: ids around the peak, -1 past a window's edge


@torch.no_grad()
def top_activating_contexts(
    model: nn.Module,
    sae: SparseAutoencoder,
    windows: torch.Tensor,  # (N, T) token ids
    hook_name: str,
    *,
    k: int = 10,
    context: int = 4,
    batch_size: int = 16,
) -> TopContexts:
    """One pass over `windows` with a running top-k per feature: each batch's
    per-window peaks join the k best so far and one stable sort keeps the best k.
    At a per-head hook point (B, H, T, hd) a feature's activation at a position
    is its highest over the heads. A hook point without an axis of positions (a
    MoE layer's expert rows (A, d), one per token-to-expert assignment) is refused."""
    device, T = next(model.parameters()).device, windows.shape[1]
    axis = position_axis(hook_name)
    best = torch.zeros(k, sae.n_features, device=device)  # (k, m)
    where = torch.full((k, sae.n_features), -1, dtype=torch.long, device=device)  # (k, m): window * T + position
    for start, ids in _batches(windows, batch_size):
        activation = capture(model, ids.to(device), hook_name)  # (B, T, d) or per head (B, H, T, hd)
        _check_positions(hook_name, activation, axis, tuple(ids.shape))
        f = sae.encode(activation).movedim(axis, 1)  # (B, T, ..., m)
        f = f.reshape(len(ids), T, -1, f.shape[-1]).amax(dim=2)  # (B, T, m): the highest over heads
        peak, position = f.max(dim=1)  # (B, m) each
        flat = torch.arange(start, start + len(ids), device=device)[:, None] * T + position  # (B, m)
        # A stable sort, not topk: among equal peaks the earlier window stays first.
        best, rows = torch.cat([best, peak]).sort(dim=0, descending=True, stable=True)  # (k + B, m)
        best, where = best[:k], torch.cat([where, flat]).gather(0, rows[:k])  # (k, m) each
    fired = best > 0  # (k, m)
    window = torch.where(fired, where // T, -1).T.cpu()  # (m, k)
    position = torch.where(fired, where % T, -1).T.cpu()  # (m, k)
    return TopContexts(best.T.cpu(), window, position, _context_tokens(windows.cpu(), window, position, context))


def _check_positions(hook_name: str, activation: torch.Tensor, axis: int | None, ids: tuple[int, int]) -> None:
    """ValueError naming the hook point and its shape when `activation` has no axis of the
    windows' (B, T) positions at `axis` (`position_axis`) to say where a feature peaks."""
    B, T = ids
    if axis is not None and activation.dim() > axis + 1 and activation.shape[0] == B and activation.shape[axis] == T:
        return
    raise ValueError(f"hook_name: {hook_name!r} gives activations of shape {tuple(activation.shape)} for windows "
                     f"of shape {ids}, with no axis of positions to find a feature's contexts by (a MoE layer's "
                     "expert rows are token-to-expert assignments grouped by expert); top_activating_contexts "
                     "needs a hook point laid out (B, T, d) or per head (B, H, T, hd)")


def _context_tokens(windows: torch.Tensor, window: torch.Tensor, position: torch.Tensor, context: int) -> torch.Tensor:
    """(m, k, 2c + 1): windows[w, p - c : p + c + 1] for each entry, -1 outside the window or for w = -1."""
    padded = F.pad(windows.long(), (context, context), value=-1)  # (N, T + 2c)
    offsets = torch.arange(2 * context + 1)  # (2c + 1,)
    cols = position.clamp_min(0)[..., None] + offsets  # (m, k, 2c + 1): padded column of p - c + j
    tokens = padded[window.clamp_min(0)[..., None], cols]  # (m, k, 2c + 1)
    return tokens.masked_fill((window < 0)[..., None], -1)


__all__ = [
    "SAEMetrics",
    "SAESettings",
    "SAETraining",
    "SPARSITIES",
    "SparseAutoencoder",
    "Sparsity",
    "TopContexts",
    "auxk_loss",
    "capture",
    "evaluate_sae",
    "gather_activations",
    "l1_penalty",
    "loss_recovered",
    "sae_lr",
    "sample_windows",
    "squared_error",
    "top_activating_contexts",
    "topk_relu",
    "train_sae",
    "train_sae_on_model",
]
