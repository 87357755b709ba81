"""Unstructured / N:M pruning of a Transformer, in place, and a short
masked recovery fine-tune.

    masks = prune_model(model, "sparsegpt", sparsity=0.5, calibration=ids)
    losses = recover(model, batches, steps=100, lr=1e-5, masks=masks)

The linears inside each block are pruned (attention qkv and out, MLP up and
down, a MoE's shared expert: `compress.calibration.block_linears`); embeddings,
the output head, MoE routers and stacked expert weights stay dense.

Calibrated methods run block by block, as the SparseGPT and Wanda references
do (Frantar & Alistarh 2023, section 4; Sun et al. 2023, section 3): block
i+1 is calibrated on the outputs of block i already pruned. Within a block
each linear sees inputs that have passed through the block's linears pruned
before it (the GPTQ reference's --true-sequential), through the same capture
code as quantisation.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import cycle, islice

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from heron.compress.gptq import HessianAccumulator
from heron.compress.prune import check_target, magnitude_mask, sparsegpt, wanda_mask
from heron.compress.calibration import block_linears, calibration_batches, feed, first_block_inputs, input_reader
from heron.core.transformer import Transformer

Target = dict[str, object]  # {"sparsity": float | None, "nm": (n, m) | None}


class SquareSum:
    """Σ x_j² over every input row seen: ‖X_j‖₂² for Wanda (no K×K Gram needed)."""

    def __init__(self, in_features: int) -> None:
        self.sums = torch.zeros(in_features, dtype=torch.float32)  # (K,)

    def add(self, x: torch.Tensor) -> None:
        self.sums += x.detach().reshape(-1, x.shape[-1]).float().square().sum(dim=0)

    def norms(self) -> torch.Tensor:
        return self.sums.sqrt()  # (K,)


def _wanda(layer: nn.Linear, feed: Callable, target: Target, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    stats = SquareSum(layer.in_features)
    feed(stats.add)
    keep = wanda_mask(layer.weight, stats.norms(), **target)
    return layer.weight * keep, keep


def _sparsegpt(layer: nn.Linear, feed: Callable, target: Target, *, blocksize: int = 128,
               percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    hessian = HessianAccumulator(layer.in_features)
    feed(hessian.add)
    return sparsegpt(layer.weight, hessian.H, **target, blocksize=blocksize, percdamp=percdamp)


CALIBRATED = {"wanda": _wanda, "sparsegpt": _sparsegpt}
METHODS = ("magnitude", *CALIBRATED)


def prune_model(
    model: Transformer,
    method: str,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None = None,
    batch_size: int = 8,
    blocksize: int = 128,
    percdamp: float = 0.01,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Zero weights of `model`'s block linears in place (SparseGPT also updates
    the survivors); returns {parameter name: keep-mask (N, K) bool}.

    calibration: token ids, (n, T) or an iterable of (B, T) batches; needed by
    "wanda" and "sparsegpt", ignored by "magnitude" (per layer).
    """
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; known: {', '.join(METHODS)}")
    targets = block_linears(model)
    for name, layer in targets.items():
        try:
            check_target(sparsity, nm, layer.in_features)
        except ValueError as err:
            raise ValueError(f"{err} ({name})") from None
    if method != "magnitude" and calibration is None:
        raise ValueError(f"calibration: method {method!r} needs calibration token ids")
    model.eval()
    target: Target = {"sparsity": sparsity, "nm": nm}
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if method == "magnitude":
            for name, layer in tqdm(targets.items(), disable=not progress, desc="magnitude", unit="layer"):
                masks[f"{name}.weight"] = keep = magnitude_mask(layer.weight, **target)
                layer.weight.mul_(keep)
            return masks
        prune = CALIBRATED[method]
        inputs = first_block_inputs(model, calibration_batches(calibration, batch_size))
        for i, block in enumerate(tqdm(model.blocks, disable=not progress, desc=method, unit="block")):
            for name, layer in _in_block(targets, i):
                feed_layer = partial(feed, block, input_reader(block, name.split(".", 2)[2]), inputs)  # (sink) -> None
                pruned, masks[f"{name}.weight"] = prune(layer, feed_layer, target, blocksize=blocksize,
                                                        percdamp=percdamp)
                layer.weight.copy_(pruned)
            inputs = [((block(*args, **kwargs),) + args[1:], kwargs) for args, kwargs in inputs]
    return masks


def _in_block(targets: dict[str, nn.Linear], i: int) -> Iterator[tuple[str, nn.Linear]]:
    """The block's linears in data-flow order (block_linears lists them so)."""
    return ((name, layer) for name, layer in targets.items() if name.startswith(f"blocks.{i}."))


def sparsity_of(model: Transformer) -> float:
    """Fraction of zeros over the block linears' weights."""
    weights = [layer.weight for layer in block_linears(model).values()]
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
    token ids, cycled; returns the loss of each step. masks None: every
    block-linear weight that is zero now stays zero.
    """
    if steps < 1 or lr <= 0:
        raise ValueError(f"steps, lr: expected positive values, got {steps}, {lr}")
    params = dict(model.named_parameters())
    if masks is None:
        masks = {f"{name}.weight": layer.weight != 0 for name, layer in block_linears(model).items()}
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise KeyError(f"masks: {unknown[0]} is not a parameter of the model")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    batches = islice(cycle(list(token_batches)), steps)
    for ids in tqdm(batches, total=steps, disable=not progress, desc="recover", unit="step"):
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        (loss + out.aux_loss).backward()
        optimizer.step()
        with torch.no_grad():
            for name, keep in masks.items():
                params[name].mul_(keep)
        losses.append(loss.item())
    model.eval()
    return losses


__all__ = ["METHODS", "SquareSum", "prune_model", "recover", "sparsity_of"]
