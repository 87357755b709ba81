"""Why Wanda falls short on bench_compress's model: a probe, not a benchmark.

Loads the 27.8M `small` model that bench_compress.py trains (its last
checkpoint must exist) and prints:
- the shape of its block weights (kurtosis: 3 for a Gaussian) and of their
  inputs (largest over median input-feature norm per layer: the outlier
  features of large trained models, on which Wanda's weighting rests, give
  ratios in the tens to hundreds);
- the validation perplexity increase at 50% sparsity by magnitude compared
  per layer and per output row, at random, by Wanda with 16 and 64
  calibration batches of 8 x 128 tokens, and by SparseGPT with 16 (every
  window of 128 tokens of the validation split, as bench_compress scores them).
Writes nothing; benchmarks/NOTES.md quotes its output.

    python benchmarks/probe_pruning.py [--source CHECKPOINT] [--short]

--source probes another checkpoint of the `small` shape on the same shards
(e.g. one of a longer training run); --short keeps magnitude per layer, Wanda
with 16 batches and SparseGPT, the three that bench_compress compares.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from bench_compress import RUNS, SHARDS
from common import setup_torch
import heron
from heron.compress.calibration import block_linears, calibration_windows, input_reader
from heron.compress.prune import magnitude_mask
from heron.compress.prune_model import SquareSum, prune_model
from heron.data import load_shards
from heron.generate.perplexity import perplexity

SOURCE = RUNS / "small" / "checkpoints" / "latest"
SPARSITY = 0.5
SHORT = ("magnitude per layer", "wanda, 16 calibration batches", "sparsegpt, 16 calibration batches")  # --short


def magnitude_per_row(model: torch.nn.Module, sparsity: float) -> None:
    with torch.no_grad():
        for layer in block_linears(model).values():
            layer.weight.mul_(magnitude_mask(layer.weight, sparsity=sparsity, per_row=True))


def kurtosis(w: torch.Tensor) -> float:
    w = w.detach().flatten()
    centred = w - w.mean()
    return float(centred.pow(4).mean() / centred.pow(2).mean().square())


def input_norm_spread(model: torch.nn.Module, calibration: list[torch.Tensor]) -> dict[str, float]:
    """{layer: largest / median ‖X_j‖₂ over its input features} on the calibration batches."""
    stats = {name: SquareSum(layer.in_features) for name, layer in block_linears(model).items()}

    def reader(name: str) -> torch.nn.Module:  # the module whose input is the linear's (SwiGLU's up: the MLP)
        _, i, suffix = name.split(".", 2)
        return input_reader(model.blocks[int(i)], suffix)

    handles = [reader(name).register_forward_pre_hook(lambda _, args, s=s: s.add(args[0])) for name, s in stats.items()]
    with torch.no_grad():
        for ids in calibration:
            model(ids)
    for handle in handles:
        handle.remove()
    return {name: float(s.norms().max() / s.norms().median()) for name, s in stats.items()}


def random_prune(model: torch.nn.Module, sparsity: float) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in block_linears(model).values():
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=generator) >= sparsity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Needs the model that "
                                     "benchmarks/bench_compress.py trains; writes nothing.")
    parser.add_argument("--source", type=Path, default=SOURCE, help=f"checkpoint folder (default {SOURCE})")
    parser.add_argument("--short", action="store_true", help="magnitude, Wanda and SparseGPT only")
    args = parser.parse_args()
    if not args.source.is_dir():
        sys.exit(f"no model at {args.source}: run benchmarks/bench_compress.py first (it trains it)")
    setup_torch()
    base, _ = heron.load(args.source)
    val = load_shards(SHARDS).val
    kurt = sorted(kurtosis(layer.weight) for layer in block_linears(base).values())
    print(f"block weights' kurtosis: median {kurt[len(kurt) // 2]:.2f}, largest {kurt[-1]:.2f}")
    spread = input_norm_spread(base, calibration_windows(SHARDS, 16, 8, 128))
    for kind in ("attn.qkv", "attn.out", "mlp.up", "mlp.down"):
        ratios = sorted(r for name, r in spread.items() if name.endswith(kind))
        print(f"{kind}: largest / median input-feature norm, median over layers {ratios[len(ratios) // 2]:.1f}, "
              f"largest {ratios[-1]:.1f}")
    reference = perplexity(base, val, 128, 8)
    print(f"fp32 perplexity {reference:.3f}")
    variants = {
        "magnitude per layer": lambda m: prune_model(m, "magnitude", sparsity=SPARSITY, progress=False),
        "magnitude per row": lambda m: magnitude_per_row(m, SPARSITY),
        "random": lambda m: random_prune(m, SPARSITY),
        **{f"wanda, {n} calibration batches": lambda m, n=n: prune_model(
            m, "wanda", sparsity=SPARSITY, calibration=calibration_windows(SHARDS, n, 8, 128), progress=False)
           for n in (16, 64)},
        "sparsegpt, 16 calibration batches": lambda m: prune_model(
            m, "sparsegpt", sparsity=SPARSITY, calibration=calibration_windows(SHARDS, 16, 8, 128), progress=False),
    }
    if args.short:
        variants = {name: variants[name] for name in SHORT}
    for name, prune in variants.items():
        model = copy.deepcopy(base)
        prune(model)
        increase = perplexity(model, val, 128, 8) / reference - 1
        print(f"{SPARSITY:.0%} {name}: perplexity {100 * increase:+.2f}%", flush=True)


if __name__ == "__main__":
    main()
