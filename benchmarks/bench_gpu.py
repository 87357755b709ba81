"""Heron against transformers and FlexAttention on an NVIDIA GPU.

Extra evidence beside the CPU benchmarks, whose targets are set for the CPU
machine: the same comparisons where most people train and serve.

- Training tokens/s, Heron vs LlamaForCausalLM on the same shape and weights:
  bench_train's steps (forward, loss, backward, clipping, fused AdamW on both
  sides) under bf16 autocast, as the train loop's `precision: bf16` and
  `Trainer(bf16=True)` run.
- Decode tokens/s at batch 1 and 8, fp32 weights: bench_decode's runs (Heron's
  Decoder against `generate`, greedy, prefill included).
- Sliding-window attention (w = 512), forward, bf16, batch 1, 8 heads of 64,
  at 16k and 32k tokens: Heron's `sparse_attention` (on CUDA, compiled
  FlexAttention under the pattern's block mask) against dense causal SDPA (the
  flash kernel) and against compiled FlexAttention called directly.

Times come from the host clock after `torch.cuda.synchronize()`.

    python benchmarks/bench_gpu.py [--smoke] [--no-write]
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench_decode import HeronRun, HFRun, prompts
from bench_train import hf_step, heron_step
from common import INTERLEAVING_NOTE, Result, Stats, finish, interleave, machine, plan_args, ratio
from heron.core.config import AttentionPattern
from heron.core.sparse import sparse_attention
from heron.interop import to_transformers
from heron.models.presets import build_model, parameter_count

WINDOW = 512
TRAIN_SHAPES = {"small": (32, 1024), "base": (16, 1024)}  # (batch, seq_len): a few GPU-seconds per round


@dataclass(frozen=True)
class Plan:
    rounds: int
    train_steps: int  # timed optimizer steps per side per round
    lengths: tuple[int, ...]  # attention sequence lengths


FULL, SMOKE = Plan(rounds=5, train_steps=5, lengths=(16384, 32768)), Plan(rounds=1, train_steps=1, lengths=(2048,))


def synced(fn: Callable[[], object]) -> float:
    """Seconds one call takes, the GPU's queue drained before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_training(preset: str, plan: Plan) -> list[Result]:
    B, T = TRAIN_SHAPES[preset] if plan is FULL else (2, 128)
    model = build_model(preset).cuda().train()
    hf = to_transformers(model).cuda().train()  # the same weights, before either trains
    tokens = torch.randint(0, model.config.vocab_size, (B, T + 1), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]
    steps = {"heron": heron_step(model, x, y, bf16=True), "transformers": hf_step(hf, x, bf16=True)}
    for step in steps.values():
        step()  # warm-up: kernels chosen, optimizer state allocated

    def tokens_per_s(step: Callable[[], None]) -> Callable[[], float]:
        return lambda: plan.train_steps * B * T / synced(lambda: [step() for _ in range(plan.train_steps)])

    stats = interleave({name: tokens_per_s(step) for name, step in steps.items()}, plan.rounds)
    speedup = ratio(stats["heron"], stats["transformers"])
    how = (f"{preset} preset ({parameter_count(model) / 1e6:.0f}M), batch {B} x {T} random tokens, bf16 autocast, "
           f"fused AdamW on both sides, {plan.rounds} interleaved rounds of {plan.train_steps} steps")
    del model, hf, steps
    return [
        Result(f"gpu_train_speedup_vs_transformers_{preset}", speedup.median, "x",
               f"Heron / transformers training tokens/s; median of per-round ratios, spread "
               f"{100 * speedup.spread:.0f}%; {how}"),
        Result(f"gpu_train_tokens_per_s_heron_{preset}", stats["heron"].median, "tokens/s", how),
        Result(f"gpu_train_tokens_per_s_transformers_{preset}", stats["transformers"].median, "tokens/s", how),
    ]


def bench_decoding(preset: str, plan: Plan) -> list[Result]:
    model = build_model(preset).cuda().eval()
    hf = to_transformers(model).cuda().eval()
    results = []
    for batch in (1, 8):
        ps = prompts(batch, model.config.vocab_size)
        runs = {"heron": HeronRun(model, ps), "transformers": HFRun(hf, ps, model.config.vocab_size)}
        same = runs["heron"].generate() == runs["transformers"].generate()  # also the warm-up
        stats = interleave(runs, plan.rounds)
        speedup = ratio(stats["heron"], stats["transformers"])
        how = (f"{preset} preset, fp32, batch {batch}, greedy, prefill included, {plan.rounds} interleaved rounds; "
               f"greedy tokens identical: {same}")
        key = f"b{batch}_{preset}"
        results += [
            Result(f"gpu_decode_speedup_vs_transformers_{key}", speedup.median, "x",
                   f"Heron Decoder vs LlamaForCausalLM.generate; median of per-round ratios, spread "
                   f"{100 * speedup.spread:.0f}%; {how}"),
            Result(f"gpu_decode_tokens_per_s_heron_{key}", stats["heron"].median, "tokens/s", how),
            Result(f"gpu_decode_tokens_per_s_transformers_{key}", stats["transformers"].median, "tokens/s", how),
        ]
    return results


def bench_attention(n: int, plan: Plan) -> list[Result]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding(b, h, q_idx, kv_idx):  # noqa: ANN001 - FlexAttention's mask_mod signature
        return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)

    g = torch.Generator(device="cuda").manual_seed(n)
    q, k, v = (torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    pattern = AttentionPattern("sliding", window=WINDOW)
    block_mask = create_block_mask(sliding, 1, 1, n, n, device="cuda")
    flex = torch.compile(flex_attention)
    calls = {
        "heron": lambda: sparse_attention(q, k, v, pattern),
        "dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "flex": lambda: flex(q, k, v, block_mask=block_mask),
    }
    with torch.inference_mode():
        heron_out, flex_out = calls["heron"](), calls["flex"]()  # flex compiles here
        difference = (heron_out.float() - flex_out.float()).abs().max().item()
        stats: dict[str, Stats] = interleave({name: lambda c=call: synced(c) for name, call in calls.items()},
                                             max(3, 2 * plan.rounds), log=False)
    ms = {name: 1e3 * s.median for name, s in stats.items()}
    print(f"  {n} tokens: heron {ms['heron']:.2f} ms, dense {ms['dense']:.2f} ms, flex {ms['flex']:.2f} ms; "
          f"max |heron - flex| {difference:.1e}", flush=True)
    how = (f"forward, bf16, batch 1, 8 heads of 64, {n} tokens, window {WINDOW}; medians of "
           f"{len(stats['heron'].values)} interleaved calls")
    k_tokens = f"{n // 1024}k"
    return [
        Result(f"gpu_sliding_window_{k_tokens}_speedup_vs_dense", ratio(stats["dense"], stats["heron"]).median, "x",
               f"dense causal SDPA time / Heron sliding-window time; {how}"),
        Result(f"gpu_flex_attention_{k_tokens}_time_over_heron_sliding", ratio(stats["flex"], stats["heron"]).median,
               "x", f"compiled FlexAttention (block mask built once, compile not timed) / Heron; {how}; "
                    f"max |difference| {difference:.1e}"),
    ]


def main() -> None:
    args, plan = plan_args(__doc__, FULL, SMOKE)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: needs a CUDA GPU")
    torch.manual_seed(0)
    info = machine()
    info["cpu"] = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}; host {info['cpu']})"
    del info["gemm"], info["weight_gradient_gemm"]  # the CPU's GEMM libraries: not what runs here
    results: list[Result] = []
    for preset in ("small", "base"):
        print(f"training, {preset}", flush=True)
        results += bench_training(preset, plan)
        print(f"decoding, {preset}", flush=True)
        results += bench_decoding(preset, plan)
    print("sliding-window attention", flush=True)
    for n in plan.lengths:
        results += bench_attention(n, plan)
    notes = [INTERLEAVING_NOTE,
             "GPU figures are extra evidence: the issues' targets are set for the CPU machine named in the "
             "other sections."]
    finish(args, "gpu", "On an NVIDIA GPU: training, decoding and sliding-window attention", results, info, notes)


if __name__ == "__main__":
    main()
