"""Why Wanda falls short on bench_compress's model: a probe, not a benchmark.

Prunes the 27.8M `small` model that bench_compress.py trains (its last
checkpoint must exist) at 50% and 60% by magnitude compared per layer and
per output row, Wanda with 16 and 64 calibration batches of 8 x 128 tokens,
and SparseGPT with 16, and prints each one's validation perplexity increase
(every window of 128 tokens of the validation split, as bench_compress
scores them). Writes nothing; the README quotes its output.

    python benchmarks/probe_pruning.py
"""
from __future__ import annotations

import copy

import torch

from bench_compress import RUNS, SHARDS
from common import setup_torch
import heron
from heron.compress.calibration import block_linears, calibration_windows
from heron.compress.prune import magnitude_mask
from heron.compress.prune_model import prune_model
from heron.data import load_shards
from heron.generate.perplexity import perplexity

SOURCE = RUNS / "small" / "checkpoints" / "step_00001500"


def magnitude_per_row(model: torch.nn.Module, sparsity: float) -> None:
    with torch.no_grad():
        for layer in block_linears(model).values():
            layer.weight.mul_(magnitude_mask(layer.weight, sparsity=sparsity, per_row=True))


def main() -> None:
    setup_torch()
    base, _ = heron.load(SOURCE)
    val = load_shards(SHARDS).val
    reference = perplexity(base, val, 128, 8)
    print(f"fp32 perplexity {reference:.3f}")
    for sparsity in (0.5, 0.6):
        variants = {
            "magnitude per layer": lambda m: prune_model(m, "magnitude", sparsity=sparsity, progress=False),
            "magnitude per row": lambda m: magnitude_per_row(m, sparsity),
            **{f"wanda, {n} calibration batches": lambda m, n=n: prune_model(
                m, "wanda", sparsity=sparsity, calibration=calibration_windows(SHARDS, n, 8, 128), progress=False)
               for n in (16, 64)},
            "sparsegpt, 16 calibration batches": lambda m: prune_model(
                m, "sparsegpt", sparsity=sparsity, calibration=calibration_windows(SHARDS, 16, 8, 128), progress=False),
        }
        for name, prune in variants.items():
            model = copy.deepcopy(base)
            prune(model)
            increase = perplexity(model, val, 128, 8) / reference - 1
            print(f"{sparsity:.0%} {name}: perplexity {100 * increase:+.2f}%", flush=True)


if __name__ == "__main__":
    main()
