"""Decode speed: Heron's generate layer vs transformers' `generate`, same weights.

Greedy decoding of exactly N new tokens (no stop tokens) after a P-token
prompt, at batch 1, 8 and 32 (prompts of different lengths, left-padded,
with an attention mask on both sides). Speeds are end to end: B x N new tokens
over the wall time of the whole call, prefill included, for both sides.

The bandwidth fraction compares Heron's batch-1 decode steps (prefill
excluded) with the memory-bandwidth limit: a decode step must read every
weight once, so tokens/s cannot exceed read bandwidth / parameter bytes (a
tied embedding counted once; it is read as the output projection). Read
bandwidth is measured in the same process as the best of several `sum`s over
a 1 GiB fp32 buffer (bytes read / time), taken before, between and after the
presets; copy bandwidth is reported too.

    python benchmarks/bench_decode.py [--quick] [--presets small base] [--no-write]

Only the whole run writes (common.WRITE_RULE): --quick or a subset of presets
prints the section and leaves the results files alone.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common import (INTERLEAVING_NOTE, Result, Stats, bench_parser, finish, interleave, machine, memory_bandwidth,
                    parse_args, ratio, setup_torch)
from heron.generate import Decoder, Generator, SamplingParams, decode_steps, left_pad
from heron.interop import to_transformers
from heron.models.presets import build_model, parameter_count

PROMPT, NEW = 32, 128
BATCHES = (1, 8, 32)
TARGETS = {("small", 1): 2.0, ("base", 1): 1.5}
BANDWIDTH_TARGET = 0.6


@dataclass(frozen=True)
class Plan:
    rounds: int


FULL, QUICK = Plan(rounds=4), Plan(rounds=2)


def prompts(batch: int, vocab: int) -> list[list[int]]:
    """Batch 1: one P-token prompt. Larger: lengths P, P-2, ..., P-14, P, ... so rows need padding."""
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(1, vocab, (PROMPT - 2 * (i % 8),), generator=g).tolist() for i in range(batch)]


class HeronRun:
    """Heron through `heron.generate`: the Decoder and decode_steps that
    `Generator.generate_ids` runs when nothing but the length can stop a row,
    driven here directly to time prefill and decode apart."""

    def __init__(self, model: nn.Module, batch: list[list[int]]) -> None:
        self.model, self.batch = model, batch
        self.params = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
        self.decode_tok_s: list[float] = []  # batch x (N - 1) forward steps / decode time

    def generate(self) -> list[list[int]]:
        """The public API's answer, to check the timed loop against transformers."""
        return Generator(self.model).generate_ids(self.batch, self.params)  # (B, N)

    def __call__(self) -> float:
        start = time.perf_counter()
        decoder = Decoder(self.model, self.batch, self.params)  # prefill
        prefilled = time.perf_counter()
        torch.stack(list(decode_steps(decoder, NEW)), dim=1).tolist()  # one host sync at the end
        end = time.perf_counter()
        B = len(self.batch)
        self.decode_tok_s.append(B * (NEW - 1) / (end - prefilled))
        return B * NEW / (end - start)


class HFRun:
    """`LlamaForCausalLM.generate`, greedy, exactly N new tokens."""

    def __init__(self, hf: nn.Module, batch: list[list[int]], vocab: int) -> None:
        ids, mask = left_pad(batch, 0, vocab, hf.device)
        self.hf, self.ids = hf, ids
        self.mask = torch.ones_like(ids) if mask is None else mask.long()

    def generate(self) -> list[list[int]]:
        out = self.hf.generate(self.ids, attention_mask=self.mask, max_new_tokens=NEW, min_new_tokens=NEW,
                               do_sample=False, pad_token_id=0)
        return out[:, self.ids.shape[1]:].tolist()

    def __call__(self) -> float:
        start = time.perf_counter()
        self.generate()
        return self.ids.shape[0] * NEW / (time.perf_counter() - start)


def bench_batch(model: nn.Module, hf: nn.Module, preset: str, batch: int, plan: Plan) -> tuple[list[Result], HeronRun]:
    vocab = model.config.vocab_size
    ps = prompts(batch, vocab)
    runs: dict[str, Callable[[], float]] = {"heron": HeronRun(model, ps), "transformers": HFRun(hf, ps, vocab)}
    same = runs["heron"].generate() == runs["transformers"].generate()  # also the warm-up
    print(f"{preset} batch {batch}: greedy tokens identical: {same}", flush=True)
    stats = interleave(runs, plan.rounds)
    speedup = ratio(stats["heron"], stats["transformers"])
    print(f"  heron {stats['heron']} tok/s, transformers {stats['transformers']} tok/s, speedup {speedup}")
    how = (f"{preset} preset, fp32, batch {batch}, {PROMPT}-token prompt{'s left-padded' if batch > 1 else ''}, "
           f"{NEW} greedy new tokens, tokens/s = B x N / wall time of the whole call incl. prefill; "
           f"{plan.rounds} interleaved rounds; greedy tokens identical: {same}")
    key = f"b{batch}_{preset}"
    return [
        Result(f"decode_speedup_vs_transformers_{key}", speedup.median, "x",
               f"Heron Decoder/decode_steps vs LlamaForCausalLM.generate (sdpa, DynamicCache); median of per-round "
               f"ratios, spread {100 * speedup.spread:.0f}%; {how}", TARGETS.get((preset, batch))),
        Result(f"decode_tokens_per_s_heron_{key}", stats["heron"].median, "tokens/s", how),
        Result(f"decode_tokens_per_s_transformers_{key}", stats["transformers"].median, "tokens/s", how),
    ], runs["heron"]


def bandwidth_results(weight_bytes: int, decode: Stats, bandwidth: dict[str, float], preset: str) -> list[Result]:
    limit = bandwidth["read"] / weight_bytes
    fraction = decode.median / limit
    print(f"{preset}: {weight_bytes / 1e6:.0f} MB of weights, read {bandwidth['read'] / 1e9:.1f} GB/s -> "
          f"limit {limit:.1f} tok/s; Heron decodes {decode} tok/s = {fraction:.2f} of the limit")
    return [
        Result(f"decode_bandwidth_fraction_{preset}", fraction, "fraction",
               f"Heron batch-1 decode steps/s (prefill excluded, median of {len(decode.values)}) / (read bandwidth "
               f"{bandwidth['read'] / 1e9:.1f} GB/s / {weight_bytes / 1e6:.0f} MB fp32 parameter bytes incl. lm_head, "
               f"tied embedding once) = {decode.median:.1f} / {limit:.1f} tok/s",
               BANDWIDTH_TARGET if preset == "base" else None),
        Result(f"decode_steps_per_s_heron_b1_{preset}", decode.median, "tokens/s",
               "Heron batch-1 decode steps only (prefill excluded)"),
    ]


def bench_preset(preset: str, plan: Plan) -> tuple[list[Result], int, Stats]:
    """Speed results, parameter bytes, and Heron's batch-1 decode-only steps/s."""
    model = build_model(preset).eval()
    hf = to_transformers(model).eval()
    print(f"{preset}: {parameter_count(model) / 1e6:.1f}M parameters", flush=True)
    results: list[Result] = []
    decode = Stats(())
    for batch in BATCHES:
        rows, heron = bench_batch(model, hf, preset, batch, plan)
        results += rows
        if batch == 1:
            decode = Stats(tuple(heron.decode_tok_s))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    return results, weight_bytes, decode


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds; writes nothing")
    parser.add_argument("--presets", nargs="+", default=["small", "base"], choices=["small", "base"],
                        help="a subset writes nothing")
    args = parse_args(parser, argv)
    setup_torch()
    info = machine()
    plan = QUICK if args.quick else FULL
    # The machine is shared and its `sum` reads jump between levels (32 and 54 GB/s within minutes on
    # the Zen 4 host, benchmarks/NOTES.md): keep the best seen before, between and after the presets,
    # so the limit is not understated.
    seen = [memory_bandwidth()]
    runs = {}
    for preset in args.presets:
        runs[preset] = bench_preset(preset, plan)
        seen.append(memory_bandwidth())
    bandwidth = {k: max(b[k] for b in seen) for k in seen[0]}
    print(f"memory bandwidth: read {bandwidth['read'] / 1e9:.1f} GB/s, copy {bandwidth['copy'] / 1e9:.1f} GB/s "
          f"(read + written), best of {len(seen)} measurements (read: "
          + ", ".join(f"{b['read'] / 1e9:.1f}" for b in seen) + ")", flush=True)
    results = [r for rows, _, _ in runs.values() for r in rows]
    for preset, (_, weight_bytes, decode) in runs.items():
        results += bandwidth_results(weight_bytes, decode, bandwidth, preset)
    results += [
        Result("memory_read_bandwidth", bandwidth["read"] / 1e9, "GB/s",
               f"best of 5 sums over a 1 GiB fp32 buffer, before, between and after the presets ({len(seen)} times)"),
        Result("memory_copy_bandwidth", bandwidth["copy"] / 1e9, "GB/s",
               f"best of 5 copy_ of a 1 GiB fp32 buffer, bytes read + written, before, between and after the presets "
               f"({len(seen)} times)"),
    ]
    finish(args, "decode", "Decode throughput vs transformers", results, info, [INTERLEAVING_NOTE])


if __name__ == "__main__":
    sys.exit(main())
