"""Sparse attention: time and peak memory against sequence length.

One attention call (batch 1, 8 heads, head dim 64, fp32, forward) at 1k to
32k tokens, for PyTorch's fused dense causal SDPA and each of Heron's sparse
patterns, timed in one process, interleaved round by round. Peak memory is
measured per call in a fresh subprocess (the rise of the process's peak RSS
during the call, inputs excluded), including the dense computation the way
sparse patterns are usually implemented: SDPA under the pattern's explicit
(n, n) boolean mask. FlexAttention (compiled; its CPU path needs
torch.compile) is timed against the sliding-window engine on the same inputs.
The keys are read at 16k tokens (flex at 8k); --quick stops at 4k, names its
keys by that length and writes nothing (common.WRITE_RULE).

    python benchmarks/bench_sparse.py [--quick] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import (  # noqa: E402
    HERE, Result, Stats, bench_parser, finish, interleave, machine, parse_args, peak_rss, ratio, reset_peak_rss,
    setup_torch, timed,
)
from heron.core.config import AttentionPattern  # noqa: E402
from heron.core.sparse import dense_mask, sparse_attention  # noqa: E402

HEADS, HEAD_DIM = 8, 64
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
KEY_LENGTH = 16384
SPEED_TARGET, MEMORY_TARGET = 4.0, 0.25
PLOT = HERE / "sparse_attention.png"


def patterns(n: int) -> dict[str, AttentionPattern]:
    """The benchmarked patterns at length n. Strides and fixed blocks are
    8 sqrt(n) = sqrt(64 n), the cost-optimal choice for 64-token blocks."""
    root = 64 * round(math.sqrt(64 * n) / 64)
    return {
        "sliding w=512": AttentionPattern("sliding", window=512),
        "dilated w=256 d=2": AttentionPattern("dilated", window=256, dilation=2),
        "strided l~8sqrt(n)": AttentionPattern("strided", stride=root),
        "fixed l~8sqrt(n) c=16": AttentionPattern("fixed", block=root, summary=16),
        "bigbird b=64 2+2+3": AttentionPattern("bigbird", block=64, local_blocks=2, global_blocks=2, random_blocks=3),
    }


def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return tuple(torch.randn(1, HEADS, n, HEAD_DIM, generator=g) for _ in range(3))  # type: ignore[return-value]


def calls(n: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Every measured computation by name."""
    runs: dict[str, Callable] = {"dense causal SDPA": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for name, pattern in patterns(n).items():
        runs[name] = lambda q, k, v, p=pattern: sparse_attention(q, k, v, p)
    sliding = patterns(n)["sliding w=512"]
    runs["masked dense (sliding mask)"] = lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense_mask(sliding, q.shape[2])
    )
    return runs


def limit(name: str, key_length: int) -> int:
    """The longest length `name` is measured at."""
    if name.startswith("masked"):
        return key_length  # an n x n mask at 32k is 1 GiB of bools, and SDPA converts it to floats
    return LENGTHS[-1]


# ----- peak memory, one call per subprocess ---------------------------------------------------


def measure_memory_here(name: str, n: int) -> None:
    """Child process: print the peak-RSS rise (bytes) of one call: the peak is
    reset just before the call (Linux: /proc/self/clear_refs), then read back."""
    setup_torch()
    q, k, v = inputs(n)
    fn = calls(n)[name]
    with torch.inference_mode():
        fn(q[:, :, :128], k[:, :, :128], v[:, :, :128])  # thread pools and kernels warm, outside the measurement
        before = reset_peak_rss()
        fn(q, k, v)
        peak = peak_rss()
    print(json.dumps({"bytes": peak - before}))


def peak_memory(name: str, n: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, str(n)], capture_output=True, text=True, check=True
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["bytes"])


# ----- FlexAttention ------------------------------------------------------------------------


def flex_comparison(n: int, rounds: int) -> dict[str, float]:
    """Compiled FlexAttention vs Heron's sliding engine, window 512, at length n."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    window = 512

    def sliding(b, h, q_idx, kv_idx):  # noqa: ANN001 - FlexAttention's mask_mod signature
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    q, k, v = inputs(n)
    start = time.perf_counter()
    block_mask = create_block_mask(sliding, 1, 1, n, n, device="cpu")
    mask_s = time.perf_counter() - start
    compiled = torch.compile(flex_attention)
    start = time.perf_counter()
    with torch.inference_mode():
        want = compiled(q, k, v, block_mask=block_mask)
    compile_s = time.perf_counter() - start
    pattern = AttentionPattern("sliding", window=window)
    got = sparse_attention(q, k, v, pattern)
    with torch.inference_mode():
        stats = interleave(
            {
                "flex": lambda: timed(lambda: compiled(q, k, v, block_mask=block_mask)),
                "heron": lambda: timed(lambda: sparse_attention(q, k, v, pattern)),
            },
            rounds,
        )
    return {
        "flex_s": stats["flex"].median,
        "heron_s": stats["heron"].median,
        "heron_speedup": ratio(stats["flex"], stats["heron"]).median,
        "compile_s": compile_s,
        "block_mask_s": mask_s,
        "max_diff": float((want - got).abs().max()),
    }


# ----- the run --------------------------------------------------------------------------------


def time_all(lengths: tuple[int, ...], quick: bool) -> dict[int, dict[str, Stats]]:
    times = {}
    for n in lengths:
        rounds = 1 if quick else 2 if n >= 16384 else 3
        q, k, v = inputs(n)
        runs = {name: fn for name, fn in calls(n).items() if not name.startswith("masked") and n <= limit(name, KEY_LENGTH)}
        print(f"{n} tokens:", flush=True)
        with torch.inference_mode():
            times[n] = interleave({name: (lambda fn=fn: timed(lambda: fn(q, k, v))) for name, fn in runs.items()}, rounds)
    return times


def plot(times: dict[int, dict[str, Stats]], memory: dict[str, dict[int, float]]) -> list[Path]:
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in next(iter(times.values())):
        lengths = [n for n in times if name in times[n]]
        ax_t.plot(lengths, [times[n][name].median for n in lengths], marker="o", label=name)
    for name, by_length in memory.items():
        ax_m.plot(list(by_length), [b / 2**20 for b in by_length.values()], marker="o", label=name)
    for ax, ylabel in ((ax_t, "seconds per call"), (ax_m, "peak memory rise, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_title("Attention forward, batch 1, 8 heads x 64")
    ax_m.set_title("Peak memory of one call")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)
    return [PLOT]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="lengths up to 4k, one round; writes nothing")
    parser.add_argument("--memory-child", nargs=2, metavar=("NAME", "N"), help=argparse.SUPPRESS)
    args = parse_args(parser)
    if args.memory_child:
        measure_memory_here(args.memory_child[0], int(args.memory_child[1]))
        return
    setup_torch()
    info = machine()
    lengths = LENGTHS[:3] if args.quick else LENGTHS
    key_length = lengths[-1] if args.quick else KEY_LENGTH
    flex_length = 4096 if args.quick else 8192
    times = time_all(lengths, args.quick)
    memory: dict[str, dict[int, float]] = {}
    for name in calls(key_length):
        memory[name] = {n: peak_memory(name, n) for n in lengths if n <= limit(name, key_length)}
        print(f"memory {name}: " + ", ".join(f"{n}: {b / 2**20:.0f} MiB" for n, b in memory[name].items()), flush=True)
    flex = flex_comparison(flex_length, rounds=2 if args.quick else 3)
    print("flex:", flex, flush=True)

    speed = ratio(times[key_length]["dense causal SDPA"], times[key_length]["sliding w=512"])
    mem_ratio = memory["sliding w=512"][key_length] / memory["masked dense (sliding mask)"][key_length]
    k = key_length // 1024
    results = [
        Result(f"sliding_window_{k}k_speedup_vs_dense", speed.median, "x",
               f"dense causal SDPA (fused CPU kernel) time / Heron sliding window w=512 time, one forward call "
               f"at {key_length} tokens, batch 1, 8 heads x 64, fp32; median of per-round ratios, {speed}",
               SPEED_TARGET),
        Result(f"sliding_window_{k}k_memory_ratio_vs_masked_dense", mem_ratio, "fraction",
               f"peak-RSS rise of one forward call at {key_length} tokens, Heron sliding window w=512 "
               f"({memory['sliding w=512'][key_length] / 2**20:.0f} MiB) / SDPA under the equivalent explicit "
               f"{key_length}x{key_length} bool mask, mask construction included "
               f"({memory['masked dense (sliding mask)'][key_length] / 2**20:.0f} MiB); fresh subprocess each",
               MEMORY_TARGET, at_most=True),
        Result("flex_attention_time_over_heron_sliding", flex["heron_speedup"], "x",
               f"compiled FlexAttention time / Heron sliding-window time (>1: Heron faster), window 512, "
               f"forward at {flex_length} tokens; compile {flex['compile_s']:.1f} s and block mask "
               f"{flex['block_mask_s']:.1f} s not included; max |difference| {flex['max_diff']:.1e}"),
    ]
    table = ["| pattern | " + " | ".join(f"{n // 1024}k" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for name in times[lengths[0]]:
        table.append(f"| {name} | " + " | ".join(
            f"{times[n][name].median * 1e3:,.0f} ms" if name in times[n] else "" for n in lengths) + " |")
    table += ["", "| peak memory rise | " + " | ".join(f"{n // 1024}k" for n in lengths) + " |",
              "|---|" + "---:|" * len(lengths)]
    for name, by_length in memory.items():
        table.append(f"| {name} | " + " | ".join(
            f"{by_length[n] / 2**20:,.0f} MiB" if n in by_length else "" for n in lengths) + " |")
    notes = [
        f"Forward time per call (median over rounds), patterns at {k}k as in the keys; plot: `{PLOT.name}`.",
        "Peak memory is the rise of the process's peak RSS during one call in a fresh subprocess, so it "
        "counts every temporary (masks, gathered blocks, outputs).",
        f"FlexAttention (compiled) vs Heron's sliding engine at {flex_length // 1024}k: flex "
        f"{flex['flex_s'] * 1e3:.0f} ms, Heron {flex['heron_s'] * 1e3:.0f} ms per call; flex first needs "
        f"{flex['compile_s']:.0f} s to compile and {flex['block_mask_s']:.1f} s for its block mask, per shape.",
        "",
        *table,
    ]
    finish(args, "sparse", "Sparse attention against sequence length", results, info, notes,
           files=lambda: plot(times, memory))


if __name__ == "__main__":
    main()
