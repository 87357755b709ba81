"""Training speed: Heron vs transformers' LlamaForCausalLM, same shape and weights.

One optimizer step is forward + loss + backward + gradient clipping (1.0) +
AdamW, on random tokens, for both:

- Heron as `heron.train.loop` does it: `build_optimizer` (AdamW, fused kernel
  where torch has one), the model's own head loss (`model(x, targets=y)`:
  fp32 cross-entropy of the output head without making the logits whole,
  core/head_loss.py), summed over tokens and divided by their number.
- transformers as its `Trainer` does it by default: `model(input_ids,
  labels=input_ids).loss` (the model shifts the labels), `torch.optim.AdamW`
  with the fused kernel (`optim="adamw_torch_fused"`, Trainer's default since
  torch 2.8, on CPU too), `max_grad_norm` 1.0.

Both see B x T input tokens per step. Warm-up steps are not timed.

Memory: how much one Heron training step holds at once beyond what the
process held before it (peak-RSS rise, fresh process each), with the loss
from the model's head loss against the same step through the whole logits
and `F.cross_entropy`, at a batch whose logits are 256 MiB a tensor.

    python benchmarks/bench_train.py [--quick] [--presets small base] [--no-memory] [--no-write]

Only the whole run writes (common.WRITE_RULE): --quick, a subset of presets or
--no-memory prints the section and leaves the results files alone.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common import (INTERLEAVING_NOTE, Result, bench_parser, finish, interleave, machine, parse_args, peak_rss,
                    ratio, reset_peak_rss, setup_torch, timed)
from heron.interop import to_transformers
from heron.models.presets import build_model, parameter_count, preset_config
from heron.train.optim import build_optimizer
from heron.train.recipe import OptimSection

CLIP_NORM = 1.0
# Same batch for both sides; sized so one step takes seconds, not minutes, on 2 cores.
SHAPES = {"small": (8, 256), "base": (4, 256)}  # (batch, seq_len)
TARGET = 1.2
MEMORY_SHAPE = ("small", 16, 512)  # preset, batch, seq_len: logits of 8192 x 8192 tokens, 256 MiB in fp32


@dataclass(frozen=True)
class Plan:
    rounds: int
    steps: int  # timed optimizer steps per side per round
    warmup: int


# One step per round and many rounds: ratios of neighbouring steps cancel more of the drift.
FULL, QUICK = Plan(rounds=12, steps=1, warmup=1), Plan(rounds=2, steps=1, warmup=1)


def heron_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False,
               through_logits: bool = False) -> Callable[[], None]:
    """bf16: autocast the forward, as the train loop's `precision: bf16` does.
    through_logits: the loss from the whole logits and F.cross_entropy, not the head loss."""
    optimizer = build_optimizer(model, OptimSection())

    def loss_sum() -> torch.Tensor:
        if not through_logits:
            return model(x, targets=y).loss
        logits = model(x).logits.float()  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_sum() / y.numel()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()

    return step


def hf_step(model: nn.Module, x: torch.Tensor, bf16: bool = False) -> Callable[[], None]:
    """bf16: autocast the forward, as `Trainer(bf16=True)` does."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)  # Trainer's adamw_torch_fused

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()

    return step


def bench_preset(preset: str, plan: Plan) -> list[Result]:
    B, T = SHAPES[preset]
    model = build_model(preset).train()
    hf = to_transformers(model).train()  # the same weights, before either trains
    tokens = torch.randint(0, model.config.vocab_size, (B, T + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
    steps = {"heron": heron_step(model, x, y), "transformers": hf_step(hf, x)}
    print(f"{preset}: {parameter_count(model) / 1e6:.1f}M parameters, batch {B} x {T}", flush=True)
    for step in steps.values():
        for _ in range(plan.warmup):
            step()

    def tokens_per_s(step: Callable[[], None]) -> Callable[[], float]:
        return lambda: plan.steps * B * T / timed(lambda: [step() for _ in range(plan.steps)])

    stats = interleave({name: tokens_per_s(step) for name, step in steps.items()}, plan.rounds)
    speedup = ratio(stats["heron"], stats["transformers"])
    print(f"  heron {stats['heron']} tok/s, transformers {stats['transformers']} tok/s, speedup {speedup}")
    how = (f"{preset} preset, batch {B} x {T} random tokens, fp32, {plan.rounds} interleaved rounds of "
           f"{plan.steps} step(s) after {plan.warmup} warm-up step(s)")
    return [
        Result(f"train_speedup_vs_transformers_{preset}", speedup.median, "x",
               f"Heron / transformers training tokens/s (forward + backward + clip + AdamW); median of per-round "
               f"ratios over {how}; spread {100 * speedup.spread:.0f}%", TARGET),
        Result(f"train_tokens_per_s_heron_{preset}", stats["heron"].median, "tokens/s",
               f"Heron, AdamW fused, {how}"),
        Result(f"train_tokens_per_s_transformers_{preset}", stats["transformers"].median, "tokens/s",
               f"LlamaForCausalLM (sdpa), AdamW fused, {how}"),
    ]


def memory_child(through_logits: bool) -> None:
    """Child: print as JSON the peak-RSS rise of one training step, after one warm-up step."""
    setup_torch()
    preset, B, T = MEMORY_SHAPE
    model = build_model(preset).train()
    tokens = torch.randint(0, model.config.vocab_size, (B, T + 1))
    step = heron_step(model, tokens[:, :-1], tokens[:, 1:], through_logits=through_logits)
    step()  # the optimizer's state, the allocator's arenas
    before = reset_peak_rss()
    step()
    print(json.dumps({"rise": peak_rss() - before}))


def memory_results() -> list[Result]:
    rises = {}
    for path in ("head", "logits"):
        argv = [sys.executable, __file__, "--memory-child", path]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        rises[path] = json.loads(out.strip().splitlines()[-1])["rise"]
        print(f"  one step's peak-RSS rise, loss {path}: {rises[path] / 2**20:.0f} MiB", flush=True)
    preset, B, T = MEMORY_SHAPE
    vocab = preset_config(preset).vocab_size
    how = (f"{preset} preset, batch {B} x {T} (logits {B * T} x {vocab}, {B * T * vocab * 4 / 2**20:.0f} MiB in fp32), "
           f"fp32, forward + backward + clip + AdamW; peak-RSS rise over the step, after one warm-up step, fresh "
           f"process each")
    mib = 2**20
    return [
        Result("train_step_peak_rss_head_loss_over_logits", rises["head"] / rises["logits"], "x",
               f"one step's peak-RSS rise, the loss from model(x, targets=y) / from the whole logits and "
               f"F.cross_entropy: {how}"),
        Result("train_step_peak_rss_rise_mib_head_loss", rises["head"] / mib, "MiB", f"model(x, targets=y): {how}"),
        Result("train_step_peak_rss_rise_mib_logits", rises["logits"] / mib, "MiB",
               f"logits and F.cross_entropy: {how}"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps; writes nothing")
    parser.add_argument("--presets", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                        help="a subset writes nothing")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement; writes nothing")
    parser.add_argument("--memory-child", choices=["head", "logits"], help=argparse.SUPPRESS)
    args = parse_args(parser, argv)
    if args.memory_child:
        return memory_child(through_logits=args.memory_child == "logits")
    setup_torch()
    info = machine()
    plan = QUICK if args.quick else FULL
    results = [r for preset in args.presets for r in bench_preset(preset, plan)]
    if not args.no_memory:
        results += memory_results()
    finish(args, "train", "Training throughput vs transformers", results, info, [INTERLEAVING_NOTE])


if __name__ == "__main__":
    sys.exit(main())
