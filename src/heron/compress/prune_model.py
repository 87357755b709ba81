"""Unstructured / N:M pruning of a Transformer, in place, and a short
masked recovery fine-tune.

    masks = prune_model(model, "sparsegpt", sparsity=0.5, calibration=ids)
    losses = recover(model, batches, steps=100, lr=1e-5, masks=masks)

Pruned: the linears inside each block (attention qkv and out, MLP up and
down, a MoE's shared expert: `compress.calibration.block_linears`) and a MoE
layer's routed experts (`block_experts`), whose stacked (E, K, N) weights are
pruned one expert matrix at a time, each as a linear would be. Embeddings,
the output head and MoE routers stay dense.

Calibrated methods run block by block, as the SparseGPT and Wanda references
do (Frantar & Alistarh 2023, section 4; Sun et al. 2023, section 3): block
i+1 is calibrated on the outputs of block i already pruned. Within a block
each weight sees inputs that have passed through the block's weights pruned
before it (the GPTQ reference's --true-sequential), through the same capture
code as quantisation. An expert is calibrated on the tokens routed to it and
nothing else, unweighted by the router (its down matrix on their hidden
activations): what a hook on each expert of transformers' Mixtral sees, since
that loops over the experts calling each on its own tokens. An expert routed
no calibration token has no statistics; it is pruned by magnitude, with a
warning that names it.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import cycle, islice

import torch
from torch import nn
from tqdm import tqdm

from heron.compress.calibration import (
    EXPERT_INPUTS,
    block_experts,
    block_linears,
    calibration_batches,
    feed,
    feed_experts,
    first_block_inputs,
    input_reader,
)
from heron.compress.gptq import HessianAccumulator
from heron.compress.prune import check_target, magnitude_mask, sparsegpt, wanda_mask
from heron.core.modes import evaluating
from heron.core.transformer import Transformer
from heron.train.loop import check_finite_update, check_finite_weights
from heron.train.optim import build_optimizer
from heron.train.recipe import OptimSection

Target = dict[str, object]  # {"sparsity": float | None, "nm": (n, m) | None}
Sinks = list[Callable[[torch.Tensor], None]]  # one per matrix of a weight: (rows (n, K)) -> None


class SquareSum:
    """Σ x_j² over every input row seen: ‖X_j‖₂² for Wanda (no K×K Gram needed)."""

    def __init__(self, in_features: int) -> None:
        self.sums = torch.zeros(in_features, dtype=torch.float32)  # (K,)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (n, K)
        self.sums += x.square().sum(dim=0)
        self.rows += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.sums.sqrt()  # (K,)


def _wanda(w: torch.Tensor, stats: SquareSum, target: Target, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    keep = wanda_mask(w, stats.norms(), **target)
    return w.masked_fill(~keep, 0), keep  # +0.0 where pruned: `w * keep` leaves -0.0 (sparse_store)


def _sparsegpt(w: torch.Tensor, stats: HessianAccumulator, target: Target, *, block_size: int = 128,
               percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    return sparsegpt(w, stats.H, **target, block_size=block_size, percdamp=percdamp)


# method: (statistics of a matrix's inputs, (W (N, K), statistics, target) -> (pruned W, keep-mask))
CALIBRATED = {"wanda": (SquareSum, _wanda), "sparsegpt": (HessianAccumulator, _sparsegpt)}
METHODS = ("magnitude", *CALIBRATED)


def prunable_weights(model: Transformer) -> dict[str, nn.Parameter]:
    """{parameter name: weight} of what prune_model prunes, block by block in
    data-flow order: the block linears' weights (N, K), then a MoE's stacked experts (E, K, N)."""
    weights = {f"{name}.weight": layer.weight for name, layer in block_linears(model).items()} | block_experts(model)
    return dict(sorted(weights.items(), key=lambda item: int(item[0].split(".")[1])))  # stable within a block


def weight_matrices(weight: torch.Tensor) -> list[torch.Tensor]:
    """The (N out, K in) matrices a weight holds, as views: a linear's weight itself,
    or each expert of a stack (E, K, N) transposed (grouped_matmul computes x @ w[e])."""
    return [weight] if weight.dim() == 2 else [w.T for w in weight]


def _stack(keeps: list[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The keep-masks of `weight_matrices(weight)` as one mask of the weight's shape."""
    return keeps[0] if weight.dim() == 2 else torch.stack([keep.T for keep in keeps])  # (N, K) or (E, K, N)


def prune_model(
    model: Transformer,
    method: str,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None = None,
    batch_size: int = 8,
    block_size: int = 128,
    percdamp: float = 0.01,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Zero weights of `model`'s block linears and MoE experts in place
    (SparseGPT also updates the survivors); returns {parameter name: bool
    keep-mask of its shape}, (N, K) for a linear, (E, K, N) for stacked experts.

    calibration: token ids, (n, T) or an iterable of (B, T) batches; needed by
    "wanda" and "sparsegpt", ignored by "magnitude" (per matrix: a linear, an expert).
    """
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; known: {', '.join(METHODS)}")
    weights = prunable_weights(model)
    for name, weight in weights.items():
        try:
            check_target(sparsity, nm, weight_matrices(weight)[0].shape[1])
        except ValueError as err:
            raise ValueError(f"{err} ({name})") from None
    if method != "magnitude" and calibration is None:
        raise ValueError(f"calibration: method {method!r} needs calibration token ids")
    target: Target = {"sparsity": sparsity, "nm": nm}
    with evaluating(model), torch.no_grad():
        if method == "magnitude":
            return {name: _magnitude(weight, target)
                    for name, weight in tqdm(weights.items(), disable=not progress, desc="magnitude", unit="weight")}
        options = {"block_size": block_size, "percdamp": percdamp}
        masks: dict[str, torch.Tensor] = {}
        inputs = first_block_inputs(model, calibration_batches(calibration, batch_size))
        for i, block in enumerate(tqdm(model.blocks, disable=not progress, desc=method, unit="block")):
            for name, weight in _in_block(weights, i):
                feed_weight = partial(_feed, block, name.split(".", 2)[2], inputs)  # (sinks) -> None
                masks[name] = _calibrated(name, weight, feed_weight, method, target, options)
            inputs = [((block(*args, **kwargs),) + args[1:], kwargs) for args, kwargs in inputs]
    return masks


def _magnitude(weight: torch.Tensor, target: Target) -> torch.Tensor:
    keep = _stack([magnitude_mask(w, **target) for w in weight_matrices(weight)], weight)
    weight.masked_fill_(~keep, 0)  # +0.0, not `mul_`'s -0.0 for a negative weight
    return keep


def _feed(block: nn.Module, suffix: str, inputs: list[tuple[tuple, dict]], sinks: Sinks) -> None:
    """Pass the calibration inputs of each matrix of the block's weight at `suffix` to its sink."""
    if suffix in EXPERT_INPUTS:  # stacked experts, "mlp.up"; a linear's weight is "mlp.up.weight"
        feed_experts(block, suffix, inputs, sinks)
    else:
        feed(block, input_reader(block, suffix.removesuffix(".weight")), inputs, sinks[0])


def _calibrated(name: str, weight: torch.Tensor, feed_weight: Callable[[Sinks], None], method: str,
                target: Target, options: dict[str, object]) -> torch.Tensor:
    """Prune each matrix of `weight` in place on the statistics of its own inputs;
    return the weight's keep-mask. A matrix that saw no input (an expert routed
    no calibration token) has nothing to weigh it by: magnitude, with a warning."""
    make, prune = CALIBRATED[method]
    views = weight_matrices(weight)
    stats = [make(w.shape[1]) for w in views]
    feed_weight([s.add for s in stats])
    keeps, uncalibrated = [], []
    for e, (w, seen) in enumerate(zip(views, stats)):
        if seen.rows:
            pruned, keep = prune(w, seen, target, **options)
        else:
            uncalibrated.append(e)
            keep = magnitude_mask(w, **target)
            pruned = w.masked_fill(~keep, 0)
        w.copy_(pruned)
        keeps.append(keep)
    if uncalibrated:
        warnings.warn(f"{name}: experts {uncalibrated} were routed no calibration tokens; "
                      f"pruned by magnitude instead of {method}", stacklevel=3)
    return _stack(keeps, weight)


def _in_block(weights: dict[str, nn.Parameter], i: int) -> Iterator[tuple[str, nn.Parameter]]:
    """The block's weights in data-flow order (prunable_weights lists them so)."""
    return ((name, weight) for name, weight in weights.items() if name.startswith(f"blocks.{i}."))


def sparsity_of(model: Transformer) -> float:
    """Fraction of zeros over the weights prune_model prunes: block linears and MoE experts."""
    weights = prunable_weights(model).values()
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


# ----- recovery ------------------------------------------------------------------


def recover(
    model: Transformer,
    token_batches: Iterable[torch.Tensor],
    steps: int,
    lr: float,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> list[float]:
    """A short next-token fine-tune (AdamW, no weight decay) that keeps pruned
    weights at zero: masks are re-applied after every optimiser step, which
    also holds for weights whose Adam moments are non-zero. Batches are (B, T)
    token ids, cycled; returns the loss of each step. masks: {parameter name:
    keep-mask of the parameter's shape}, as prune_model returns them ((E, K, N)
    for stacked experts); None: every weight prune_model prunes that is zero
    now stays zero. The model is handed back in the mode it was in.

    A step whose loss or gradient norm is not finite, or an update that leaves
    a weight non-finite (a learning rate far too high), raises DivergedError,
    as pre-training does (train/loop.py), so no caller keeps or saves it.
    """
    if steps < 1 or lr <= 0:
        raise ValueError(f"steps, lr: expected positive values, got {steps}, {lr}")
    batches = [torch.as_tensor(b) for b in token_batches]  # tensors or arrays
    if not batches:  # cycling nothing would run no step and hand back an unrecovered model
        raise ValueError(f"token_batches: empty; {steps} recovery steps need at least one (B, T + 1) batch")
    params = dict(model.named_parameters())
    if masks is None:
        masks = {name: weight != 0 for name, weight in prunable_weights(model).items()}
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise KeyError(f"masks: {unknown[0]} is not a parameter of the model")
    for name, keep in masks.items():
        if keep.shape != params[name].shape:
            raise ValueError(f"masks: {name} has shape {tuple(keep.shape)}, its parameter {tuple(params[name].shape)}")
    # Pre-training's AdamW (fused where torch has it) at torch's default betas, with no decay:
    # an overflowing update then shows as non-finite weights, which the check below refuses.
    optimizer = build_optimizer(model, OptimSection(lr=lr, betas=(0.9, 0.999), weight_decay=0.0))
    was_training = model.training
    model.train()
    losses = []
    try:
        for step, ids in enumerate(tqdm(islice(cycle(batches), steps), total=steps, disable=not progress,
                                        desc="recover", unit="step"), 1):
            losses.append(_recover_step(model, optimizer, ids, step))
            with torch.no_grad():
                for name, keep in masks.items():
                    params[name].masked_fill_(~keep, 0)
        check_finite_weights(steps, model.state_dict())  # an overflowing last update: no next loss shows it
    finally:
        model.train(was_training)
    return losses


def _recover_step(model: Transformer, optimizer: torch.optim.Optimizer, ids: torch.Tensor, step: int) -> float:
    """One update on ids (B, T + 1); its mean token loss. A NaN or infinite loss or gradient
    norm stops before `optimizer.step()`: one NaN gradient would make AdamW write NaN
    into every weight it updates."""
    out = model(ids[:, :-1], targets=ids[:, 1:])  # the head loss: no whole logits (core/head_loss.py)
    loss = out.loss / ids[:, 1:].numel()  # mean over tokens
    optimizer.zero_grad(set_to_none=True)
    (loss + out.aux_loss).backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # no clipping: the norm, for the check
    value = loss.item()
    check_finite_update(step, value, float(norm))
    optimizer.step()
    return value


__all__ = ["METHODS", "SquareSum", "prunable_weights", "prune_model", "recover", "sparsity_of", "weight_matrices"]
