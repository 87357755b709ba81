"""Compression of one ~30M model trained on the default corpus (issue 6), side by side.

The model: the `small` preset at the demo's 4096-token vocabulary (27.8M
parameters), trained on the Python standard library's shards for 3,000 steps
of 8 x 128 tokens (3.1M tokens, 1.1 passes over the 2.75M-token training
split) in runs/bench-compress/small (resumed if it is there; about 75 minutes
here on its own). Until 2026-12-03 it trained for 1,500 steps (0.56 passes),
a model so far from trained that removing half its block weights by
magnitude cost it only ~1.3% perplexity (benchmarks/NOTES.md). Every variant
is made from its last checkpoint with Heron's own commands' functions and
written as a checkpoint under runs/bench-compress/variants/ (reused when
present):

- int8 per channel (round to nearest); int4, group 128, by RTN, GPTQ and AWQ
  (embedding and head int8);
- 50% unstructured by magnitude, Wanda and SparseGPT; 2:4 by SparseGPT;
- 25% of MLP channels removed (activation-weighted importance, 100 steps of
  masked recovery);
- a student at half the parameters (d_model 352) trained for 600
  steps from scratch and, with the same recipe, distilled from the model
  (T = 2, alpha 0.5).

Perplexity: every window of 128 tokens of the validation split (89k tokens
of the current default corpus; an earlier version scored the first 32k of
older shards, mostly codec tables, on which pruning and quantisation cost
something else than on code). Ratios of perplexity increases need the
baseline's increase to be positive: where it is not (int4 RTN barely moves
this model), the target is reported as not met.
Size: every file of the checkpoint folder against the fp32 one.
Decode: batch 1, greedy, 64 new tokens after a 16-token prompt, KV-cached;
the fp32 model, the int8 model, PyTorch's `quantize_dynamic` int8 of the same
model, the int8 model on Heron's `dynamic` kernel (activations rounded to 8
bits at run time as `quantize_dynamic` does: the like-for-like comparison,
with its perplexity beside the weight-only default's), the int4 GPTQ model and
the structured-pruned model run in one process, in lockstep (a step of each in
turn; `lockstep_decode_speed`) over 15 rounds; speed-ups are medians of
per-round ratios. Until 2026-11-30 each model decoded its 64 tokens in one
turn, over five rounds, with the prefill timed too. Energy per decoded
token and its source come from Heron's meter (estimated on this machine).

    python benchmarks/bench_compress.py [--no-write]
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import HERE, Result, Stats, finish, machine, plan_args, ratio, setup_torch
import heron
from heron.compress.distill import distill
from heron.compress.prune_checkpoint import PruneSettings, prune_checkpoint
from heron.compress.qlinear import set_kernel
from heron.compress.quantize import QuantizeSettings
from heron.compress.quantize_checkpoint import QuantizeCheckpointSettings, quantize_checkpoint
from heron.compress.report import measure, write_report
from heron.core.linear import Linear
from heron.data import load_shards
from heron.generate.engine import Decoder
from heron.generate.perplexity import perplexity
from heron.generate.sampling import SamplingParams
from heron.train import load_recipe, train
from heron.train.recipe import TrainRecipe

RUNS = HERE.parent / "runs" / "bench-compress"
SHARDS = HERE.parent / "runs" / "data" / "stdlib"
SMALL_RECIPE = HERE.parent / "src" / "heron" / "recipes" / "small.yaml"
TRAINING = ["data.vocab_size=4096", "data.seq_len=128", "train.batch_size=8", "train.grad_accum=1",
            "schedule.warmup_steps=50", "optim.lr=1.5e-3", "train.eval_every=250", "train.eval_batches=8",
            "train.ckpt_every=100", "train.keep_last=2", f"data.shards={SHARDS}"]
STUDENT_WIDTH, NEW_TOKENS = 352, 64
CALIBRATION = dict(calib_shards=str(SHARDS), calib_batch_size=8, seq_len=128)


@dataclass(frozen=True)
class Plan:
    runs: Path
    teacher_steps: int
    student_steps: int
    eval_batches: int | None  # None: the whole validation split
    calib_batches: int
    rounds: int


FULL = Plan(RUNS, teacher_steps=3000, student_steps=600, eval_batches=None, calib_batches=16, rounds=15)
SMOKE = Plan(HERE.parent / "runs" / "bench-compress-smoke", teacher_steps=4, student_steps=2, eval_batches=1,
             calib_batches=1, rounds=1)  # checks the script end to end in minutes; writes nothing


def small_recipe(out_dir: Path, steps: int, *extra: str) -> TrainRecipe:
    return load_recipe(SMALL_RECIPE, [*TRAINING, f"out_dir={out_dir}", f"train.steps={steps}", *extra])


def teacher(plan: Plan) -> Path:
    return train(small_recipe(plan.runs / "small", plan.teacher_steps)).checkpoint


def variants(source: Path, plan: Plan) -> dict[str, Path]:
    """name -> checkpoint folder, each made once."""
    out = plan.runs / "variants"
    calibration = {**CALIBRATION, "calib_batches": plan.calib_batches}
    quantized = {"int8": QuantizeSettings("int8"), "int4-rtn": QuantizeSettings("int4", "rtn"),
                 "int4-gptq": QuantizeSettings("int4", "gptq"), "int4-awq": QuantizeSettings("int4", "awq")}
    pruned = {"sparse50-magnitude": PruneSettings("magnitude", sparsity=0.5, **calibration),
              "sparse50-wanda": PruneSettings("wanda", sparsity=0.5, **calibration),
              "sparse50-sparsegpt": PruneSettings("sparsegpt", sparsity=0.5, **calibration),
              "2:4-sparsegpt": PruneSettings("sparsegpt", nm=(2, 4), **calibration),
              "mlp25": PruneSettings(mlp_channels=0.25, recover_steps=100, recover_lr=1e-4, **calibration)}
    made = {}
    for name, settings in quantized.items():
        made[name] = out / name
        if not made[name].exists():
            print(f"making {name}", flush=True)
            quantize_checkpoint(source, made[name], QuantizeCheckpointSettings(settings, **calibration))
    for name, settings in pruned.items():
        made[name] = out / name
        if not made[name].exists():
            print(f"making {name}", flush=True)
            prune_checkpoint(source, made[name], settings)
    return made


def students(source: Path, plan: Plan) -> dict[str, Path]:
    """The half-size student from scratch and distilled, same recipe and steps."""
    width = f"model.overrides.d_model={STUDENT_WIDTH}"
    scratch = train(small_recipe(plan.runs / "student-scratch", plan.student_steps, width)).checkpoint
    distilled = distill(source, small_recipe(plan.runs / "student-distilled", plan.student_steps, width),
                        temperature=2.0, alpha=0.5).checkpoint
    return {"student-scratch": scratch, "student-distilled": distilled}


def torch_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """PyTorch's own dynamic int8 quantisation of every linear, on a copy. Its converter
    takes exact `nn.Linear`s only, so Heron's subclass (same parameters) is relabelled first."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = torch.nn.Linear
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def lockstep_decode_speed(models: dict[str, torch.nn.Module], prompt: list[int], rounds: int) -> dict[str, Stats]:
    """Decode tokens/s of each model, one figure a round: every round decodes NEW_TOKENS
    greedy tokens with each model in lockstep, one step of each in turn (the order
    reversed every other round), timing the steps alone (prefill left out).

    Why lockstep: a step takes milliseconds, so the machine's drift falls on every
    model alike. Taking turns of a whole 64-token decode each (as until 2026-11-30)
    put seconds between the models' turns: the per-round ratio of the structured-pruned
    model to fp32 ranged 0.85x to 1.45x over 15 rounds, in lockstep 1.06x to 1.12x."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    names = list(models)
    values: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:  # warm-up: first-call allocations stay out of the figures
            Decoder(models[name], [prompt], params)
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            decoders = {name: Decoder(models[name], [prompt], params) for name in order}
            ids: dict[str, torch.Tensor | None] = dict.fromkeys(order)
            seconds = dict.fromkeys(order, 0.0)
            for _ in range(NEW_TOKENS):
                for name in order:
                    start = time.perf_counter()
                    ids[name] = decoders[name].step(ids[name])
                    seconds[name] += time.perf_counter() - start
            for name in names:
                values[name].append(NEW_TOKENS / seconds[name])
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {values[n][-1]:,.1f}" for n in names), flush=True)
    return {name: Stats(tuple(v)) for name, v in values.items()}


def main() -> None:
    args, plan = plan_args(__doc__, FULL, SMOKE)
    setup_torch()
    info = machine()
    started = time.perf_counter()
    source = teacher(plan)
    folders = {"fp32": source, **variants(source, plan), **students(source, plan)}
    val = load_shards(SHARDS).val
    evaluation = dict(seq_len=128, batch_size=8, max_batches=plan.eval_batches)
    listed = measure(list(folders.values()), val, names=list(folders), **evaluation, new_tokens=NEW_TOKENS,
                     baselines=[folders["student-scratch"]])  # trained from scratch: no variant of the model
    by = {row.name: row for row in listed}
    report = write_report(listed, plan.runs / "report")

    fp32, _ = heron.load(source)
    int8, _ = heron.load(folders["int8"])
    int4, _ = heron.load(folders["int4-gptq"])
    mlp25, _ = heron.load(folders["mlp25"])
    dynamic = torch_dynamic_int8(fp32)
    int8_dynamic = copy.deepcopy(int8)  # the int8 checkpoint on the kernel that rounds activations too
    set_kernel(int8_dynamic, "dynamic")
    activation_rounded = {name: perplexity(m, val, **evaluation)
                          for name, m in {"int8-dynamic": int8_dynamic, "torch-dynamic": dynamic}.items()}
    prompt = [int(t) for t in val[:16]]
    speed = lockstep_decode_speed({"fp32": fp32, "int8": int8, "torch-dynamic": dynamic, "int8-dynamic": int8_dynamic,
                                   "int4": int4, "mlp25": mlp25}, prompt, plan.rounds)

    def increase(name: str) -> float:
        ppl = activation_rounded[name] if name in activation_rounded else by[name].perplexity
        return ppl / by["fp32"].perplexity - 1

    windows = ("every window" if plan.eval_batches is None
               else f"{plan.eval_batches} x {evaluation['batch_size']} windows spread evenly")
    how = (f"validation perplexity over {windows} of {evaluation['seq_len']} tokens of the validation split "
           f"({len(val):,} tokens)")

    def ratio_of_increases(key: str, name: str, baseline: str, what: str) -> Result:
        """`name`'s perplexity increase over `baseline`'s; the target (at most half)
        cannot be met where the baseline did not raise perplexity at all."""
        why = (f"{baseline} did not raise perplexity ({100 * increase(baseline):+.3f}%), so there is no "
               "increase to halve" if increase(baseline) <= 0 else "")
        return Result(key, increase(name) / increase(baseline), "x", f"{what} ({how})", 0.5, at_most=True,
                      unmeasurable=why)
    results = [
        Result("int8_ppl_increase_pct", 100 * increase("int8"), "%", f"int8 per channel (RTN): {how}", 1.0,
               at_most=True),
        Result("int8_size_ratio", by["int8"].size_ratio, "x", "whole checkpoint folder on disk, int8 / fp32", 0.27,
               at_most=True),
        Result("int8_decode_speedup", ratio(speed["int8"], speed["fp32"]).median, "x",
               f"decode tokens/s, batch 1, greedy, {NEW_TOKENS} tokens, int8 / fp32, {plan.rounds} rounds in "
               "lockstep"),
        Result("int8_decode_vs_torch_dynamic", ratio(speed["int8"], speed["torch-dynamic"]).median, "x",
               "decode tokens/s, Heron int8 (default kernel, weight-only) / torch.ao.quantization.quantize_dynamic "
               "int8 of the same model, in lockstep", 1.0),
        Result("int8_dynamic_kernel_decode_vs_torch_dynamic",
               ratio(speed["int8-dynamic"], speed["torch-dynamic"]).median, "x",
               "like for like: decode tokens/s, Heron int8 on its `dynamic` kernel (activations rounded to 8 bits "
               "at run time, as quantize_dynamic does) / quantize_dynamic, in lockstep"),
        Result("int8_dynamic_kernel_ppl_increase_pct", 100 * increase("int8-dynamic"), "%",
               f"Heron int8 on its `dynamic` kernel: {how}"),
        Result("torch_dynamic_ppl_increase_pct", 100 * increase("torch-dynamic"), "%",
               f"torch.ao.quantization.quantize_dynamic int8: {how}"),
        ratio_of_increases("int4_gptq_over_rtn_ppl_increase", "int4-gptq", "int4-rtn",
                           "int4 group 128: GPTQ's perplexity increase / RTN's"),
        Result("int4_size_ratio", by["int4-gptq"].size_ratio, "x",
               "whole checkpoint folder, int4 g128 (embedding and head int8) / fp32", 0.16, at_most=True),
        Result("int4_decode_speedup", ratio(speed["int4"], speed["fp32"]).median, "x",
               "decode tokens/s, int4 g128 (GPTQ; embedding and head int8) / fp32, in lockstep"),
        ratio_of_increases("wanda_over_magnitude_ppl_increase", "sparse50-wanda", "sparse50-magnitude",
                           "50% unstructured: Wanda's perplexity increase / magnitude's"),
        ratio_of_increases("sparsegpt_over_magnitude_ppl_increase", "sparse50-sparsegpt", "sparse50-magnitude",
                           "50% unstructured: SparseGPT's perplexity increase / magnitude's"),
        Result("structured25_decode_speedup", ratio(speed["mlp25"], speed["fp32"]).median, "x",
               "25% of MLP channels removed (100 recovery steps): decode tokens/s / fp32's, in lockstep", 1.15),
        Result("distill_ppl_over_scratch", by["student-distilled"].perplexity / by["student-scratch"].perplexity,
               "x", f"student at half the parameters (d_model {STUDENT_WIDTH}), {plan.student_steps} steps: distilled "
               f"(T 2, alpha 0.5) perplexity / from scratch ({how})", 1.0, at_most=True),
    ]
    table = report.read_text().split("\n\n")[0]
    notes = [
        "Every variant of the one model (`runs/bench-compress/report/`, Pareto plot `pareto.png` there); decode "
        "speeds in this table are one sequential pass each, the keys above come from the lockstep rounds; "
        "AWQ and 2:4 are reported beside GPTQ and the 50% methods:",
        "",
        table,
        "",
        "Lockstep decode tokens/s (median): " + ", ".join(f"{n} {s.median:.1f}" for n, s in speed.items()) + ".",
        f"Whole benchmark (variants reused when present): {(time.perf_counter() - started) / 60:.1f} min.",
    ]
    finish(args, "compress", "Compression of a ~30M model trained on the default corpus", results, info, notes)


if __name__ == "__main__":
    main()
