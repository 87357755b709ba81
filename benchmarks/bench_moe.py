"""Mixture-of-Experts against dense at equal active parameters (issue 3).

Quality per step and per second. The shipped `tiny` and `tiny-moe` recipes
(tiny-moe: every feed-forward is a shared SwiGLU expert and 8 routed ones, all
a quarter of the dense width, top-3, the routed weights summing to 3, so a
token passes through as many weights as in tiny, weighed alike) are trained
by Heron's own loop (`heron.train.train`) on the default corpus, the standard
library shards the recipes prepare at runs/data/stdlib (tokenised once, then
reused). Both runs share everything but the feed-forward: data order, seed,
schedule (AdamW 2e-3, 15 warm-up steps, cosine to 0.1x), batch 8 x 256 and
steps; `recipes` asserts it. Sequence length and warm-up are this benchmark's
own (SCHEDULE), whatever the recipes ship. Validation loss is measured every
1/20 of the run on the same 10 batches (20k tokens) of the validation split,
so both curves are read on one fixed set. `moe_steps_to_dense_loss_fraction` is the
first evaluated step at which the MoE's validation loss is at or below the
dense run's final one, over the dense run's steps (resolution 1/20).

Shape. The `tiny` preset (8 layers x 288) costs ~2.6 CPU-seconds a step on
one thread here: three runs of even 180 of its steps, with evaluation,
need ~2,000 CPU-seconds, over half an hour of the two cores while others use
them, and this benchmark must finish in 20-25 minutes. Both recipes therefore
train in the `test` preset widened to 192 (4 layers, 6 heads of 32, 3 KV
heads, SwiGLU 512; MoE: a shared expert and 8 routed ones of 128, top-3, the
recipe's split of the dense width (`expert_width`); 2.4M parameters dense or
active), ~1 CPU-second a step, for 300 steps (614k tokens): ~15 minutes in
all on the shared machine, the four runs sharing its two cores. Only the shape is changed, the same for both.

Time. The four runs (dense; MoE as shipped; MoE without the auxiliary losses;
MoE without them and without router centring) run at once, one process and
one torch thread each, so load from other users falls on all alike. The time axis is each process's CPU time spent in training steps
(steps that also evaluated count as the run's median step): on one thread
that is the wall-clock the run would take on a core of its own, and it does
not depend on how busy the shared machine was.

Layer throughput. One MoE layer of tiny-moe's shape against tiny's dense MLP
(same active parameters: a shared and 3 routed experts 192 wide vs one 768
wide MLP, d 288),
2048 tokens (batch 8 x 256), forward + backward (input gradient and the MoE's
auxiliary loss included) and forward alone under inference_mode, tokens/s
interleaved round by round, median of per-round ratios. The key is on one
thread; two threads are reported beside it. (On this shared 2-core machine a
two-thread step swings up to 10x with others' load: OpenMP threads wait for
each other whenever one is descheduled, and the MoE has more small ops.)

Load balance. A global forward hook reads every MoE layer's routing
statistics after each training forward (the loop logs only their mean over
layers); `moe_max_expert_load_over_fair` is the maximum over layers and over
every step after the 15 warm-up steps of (assignments to the busiest expert /
fair share), with the Switch load-balancing and z losses and router centring
(core/moe.py) on as tiny-moe ships them; `..._last_half` is the same over the
second half of the run. The third run switches both losses off to show what
they prevent, the fourth also centring. With top-3 of 8 the ceiling is 8/3
(every token picks the busiest expert; with top-2 it was 4).

    python benchmarks/bench_moe.py [--quick] [--no-write]

--quick (30-step runs, fewer rounds) checks the script: it prints the section
and writes nothing (common.WRITE_RULE).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.modules.module import register_module_forward_hook  # noqa: E402

from common import (  # noqa: E402
    HERE, Result, Stats, bench_parser, finish, interleave, machine, parse_args, ratio, setup_torch, timed,
)
from heron.cli.commands import recipe_path  # noqa: E402
from heron.core.config import ModelConfig  # noqa: E402
from heron.core.mlp import MLP  # noqa: E402
from heron.core.moe import MoE  # noqa: E402
from heron.core.transformer import Transformer  # noqa: E402
from heron.models.presets import parameter_count  # noqa: E402
from heron.train import TrainRecipe, load_recipe, resolve_data, train  # noqa: E402
from heron.train.recipe import model_config  # noqa: E402
from heron.train.report import read_metrics  # noqa: E402

ROOT = HERE.parent
RUNS = ROOT / "runs" / "bench-moe"  # runs/ is git-ignored
RESULT_FILE = "bench.json"
PLOT = HERE / "moe.png"
STEPS_TARGET, LAYER_TARGET, LOAD_TARGET = 0.7, 0.7, 2.0
# The shape both recipes train at (why: module docstring).
SHAPE = {"model.preset": "test", "model.overrides.d_model": 192, "model.overrides.n_heads": 6,
         "model.overrides.n_kv_heads": 3}
# The schedule both train on, pinned here so that the shipped recipes' own plan (the demo's)
# can change without moving this benchmark's figures.
SCHEDULE = {"data.seq_len": 256, "schedule.warmup_steps": 15}
NO_AUX = {"model.overrides.moe.aux_loss_coef": 0, "model.overrides.moe.z_loss_coef": 0}
NO_BALANCING = {**NO_AUX, "model.overrides.moe.router_centering": False}
RUN_SOURCES = {"dense": ("tiny", {}), "moe": ("tiny-moe", {}), "moe-no-aux": ("tiny-moe", NO_AUX),
               "moe-no-balancing": ("tiny-moe", NO_BALANCING)}
MOE_RUNS = [name for name in RUN_SOURCES if name != "dense"]
LAYER_REPEATS = 3  # calls per timed measurement


@dataclass(frozen=True)
class Plan:
    steps: int
    evals: int  # validation points over the run
    eval_batches: int
    rounds: int  # interleaved rounds of the layer timing


FULL, QUICK = Plan(steps=300, evals=20, eval_batches=10, rounds=9), Plan(steps=30, evals=3, eval_batches=2, rounds=3)


# ----- the training runs -------------------------------------------------------------------


def recipes(plan: Plan) -> dict[str, TrainRecipe]:
    """dense, moe, moe-no-aux and moe-no-balancing: the shipped recipes in SHAPE, on the same plan."""
    shards = ROOT / load_recipe(recipe_path("tiny")).data.shards  # where `heron train tiny` prepares them
    shared = {**SHAPE, **SCHEDULE, "data.shards": shards, "train.steps": plan.steps,
              "train.eval_every": plan.steps // plan.evals, "train.eval_batches": plan.eval_batches,
              "train.ckpt_every": 0, "train.keep_last": 1, "train.threads": 1, "train.progress": False}
    runs = {}
    for name, (shipped, extra) in RUN_SOURCES.items():
        sets = {**shared, **extra, "out_dir": RUNS / name}
        if name in MOE_RUNS:
            sets["model.overrides.moe.d_ff"] = expert_width(runs["dense"], load_recipe(recipe_path(shipped)))
        runs[name] = load_recipe(recipe_path(shipped), [f"{key}={value}" for key, value in sets.items()])
    for name in MOE_RUNS:
        if _training_part(runs[name]) != _training_part(runs["dense"]):
            raise AssertionError(f"{name} and dense differ in more than the feed-forward")
    return runs


def expert_width(dense: TrainRecipe, moe: TrainRecipe) -> int:
    """The expert width in `dense`'s shape: the dense MLP's width split among the experts a
    token visits (its shared expert and top_k routed ones), as `moe` splits its own."""
    settings = model_config(moe, moe.data.vocab_size).moe
    return model_config(dense, dense.data.vocab_size).resolved_d_ff // (settings.top_k + int(settings.shared_expert))


def layout(config: ModelConfig) -> str:
    """A MoE config's experts in words: "a shared expert and 8 routed experts of 192, top-3"."""
    m = config.moe
    return (f"{'a shared expert and ' if m.shared_expert else ''}{m.n_experts} routed experts of "
            f"{config.resolved_expert_d_ff}, top-{m.top_k}")


def _training_part(recipe: TrainRecipe) -> dict[str, Any]:
    """A recipe without its name, folder and feed-forward choice."""
    raw = recipe.to_dict()
    raw["model"]["overrides"] = {k: v for k, v in raw["model"]["overrides"].items() if k not in ("feed_forward", "moe")}
    return {k: v for k, v in raw.items() if k not in ("name", "out_dir")}


def train_child(recipe: TrainRecipe) -> None:
    """Child process: train one recipe, then write every step's row, CPU seconds
    and per-layer routing load to <out_dir>/bench.json."""
    steps: list[dict[str, Any]] = []
    loads: list[float] = []  # the current step's max load / fair share, one per MoE layer in order
    clock = [time.process_time()]

    def on_forward(module: nn.Module, _inputs: tuple, _output: torch.Tensor) -> None:
        if isinstance(module, MoE) and module.training:  # training forwards only, not evaluation
            loads.append(float(module.last_stats["max_load_over_fair"]))

    def on_step(row: dict[str, Any]) -> None:
        now = time.process_time()
        steps.append({**row, "cpu_s": now - clock[0], "layer_loads": list(loads)})
        loads.clear()
        clock[0] = now

    start = time.perf_counter()
    handle = register_module_forward_hook(on_forward)  # on every module: the loop builds its model itself
    try:
        train(recipe, resume=False, callbacks=[on_step])
    finally:
        handle.remove()
    out = {"steps": steps, "wall_s": time.perf_counter() - start}
    (Path(recipe.out_dir) / RESULT_FILE).write_text(json.dumps(out))


def train_all(runs: dict[str, TrainRecipe], quick: bool) -> dict[str, dict[str, Any]]:
    """Run every recipe at once, each in its own one-thread process; their results by name."""
    procs = {}
    for name, recipe in runs.items():
        Path(recipe.out_dir).mkdir(parents=True, exist_ok=True)
        log = open(Path(recipe.out_dir) / "bench.log", "w")  # noqa: SIM115 - closed with the process
        args = [sys.executable, __file__, "--train-child", name, *(["--quick"] if quick else [])]
        procs[name] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), log)
    while any(p.poll() is None for p, _ in procs.values()):
        time.sleep(5 if quick else 60)
        print("  " + ", ".join(f"{name} step {_last_step(runs[name])}" for name in runs), flush=True)
    for name, (proc, log) in procs.items():
        log.close()
        if proc.returncode:
            tail = (Path(runs[name].out_dir) / "bench.log").read_text()[-3000:]
            raise RuntimeError(f"training run {name} failed ({proc.returncode}):\n{tail}")
    return {name: json.loads((Path(r.out_dir) / RESULT_FILE).read_text()) for name, r in runs.items()}


def _last_step(recipe: TrainRecipe) -> int:
    try:
        rows = read_metrics(Path(recipe.out_dir))
    except ValueError:  # a line being written
        return -1
    return rows[-1]["step"] if rows else 0


# ----- reading the runs --------------------------------------------------------------------


def val_curve(run: dict[str, Any]) -> list[tuple[int, float]]:
    return [(s["step"], s["val_loss"]) for s in run["steps"] if "val_loss" in s]


def step_seconds(run: dict[str, Any]) -> float:
    """Median CPU seconds of a training step that did not also evaluate."""
    return statistics.median(s["cpu_s"] for s in run["steps"] if "val_loss" not in s)


def train_seconds(run: dict[str, Any]) -> list[float]:
    """Cumulative CPU seconds of training after each step; a step that also
    evaluated (or checkpointed) counts as the run's median plain step."""
    plain = step_seconds(run)
    return list(itertools.accumulate(plain if "val_loss" in s else s["cpu_s"] for s in run["steps"]))


def first_reaching(curve: list[tuple[int, float]], level: float) -> int | None:
    """The first evaluated step whose loss is <= level."""
    return next((step for step, loss in curve if loss <= level), None)


def layer_max_loads(run: dict[str, Any]) -> list[float]:
    """Per step: the busiest expert's load / fair share, maximum over layers."""
    return [max(s["layer_loads"]) for s in run["steps"]]


def max_load(run: dict[str, Any], after: int) -> float:
    """The busiest expert's load / fair share, maximum over layers and over the steps after `after`."""
    return max(max(s["layer_loads"]) for s in run["steps"] if s["step"] > after)


def median_layer_loads(run: dict[str, Any], after: int) -> list[float]:
    """Per layer: the median over the steps after `after` of its busiest expert's load / fair share."""
    rows = [s["layer_loads"] for s in run["steps"] if s["step"] > after]
    return [statistics.median(column) for column in zip(*rows)]


def parameters(recipe: TrainRecipe, vocab_size: int) -> tuple[int, int]:
    """(total, active per token) parameters of a recipe's model."""
    model = Transformer(model_config(recipe, vocab_size))
    idle = sum((m.settings.n_experts - m.settings.top_k) * (m.up[0].numel() + m.down[0].numel())
               for m in model.modules() if isinstance(m, MoE))  # experts a token does not visit
    total = parameter_count(model)
    return total, total - idle


# ----- one layer: MoE vs dense MLP --------------------------------------------------------


def layer_pair() -> tuple[MLP, MoE]:
    """tiny's dense MLP and tiny-moe's MoE layer, as the shipped recipes build them."""
    recipe = load_recipe(recipe_path("tiny-moe"))
    config = model_config(recipe, recipe.data.vocab_size)
    return MLP(config.replace(feed_forward=(), moe=None)), MoE(config)


def forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    outputs, grads = [layer(x)], [grad]  # (B, T, d) each
    if isinstance(layer, MoE):  # the router also learns from the balancing losses
        outputs.append(layer.pop_aux_loss())
        grads.append(torch.ones(()))
    torch.autograd.backward(outputs, grads)


@torch.inference_mode()
def forward(layer: nn.Module, x: torch.Tensor) -> None:
    layer(x)
    if isinstance(layer, MoE):
        layer.pop_aux_loss()


@dataclass(frozen=True)
class LayerTiming:
    threads: int
    stats: dict[str, Stats]  # tokens/s by "<dense|moe> <fwd+bwd|fwd>"
    balance: float  # the MoE's busiest expert / fair share on these inputs
    load_avg: float  # the machine's 1-minute load average when timing began


def layer_throughput(threads: int, rounds: int) -> LayerTiming:
    """Tokens/s of each (layer, pass), interleaved round by round."""
    torch.set_num_threads(threads)
    load_avg = os.getloadavg()[0]
    print(f"layer throughput, {threads} thread(s), load average {load_avg:.1f}, tokens/s:", flush=True)
    torch.manual_seed(0)
    dense, moe = layer_pair()
    x = torch.randn(8, 256, dense.up.in_features, requires_grad=True)  # (B, T, d)
    grad = torch.randn_like(x)
    calls: dict[str, Callable[[], None]] = {}
    for kind, layer in (("dense", dense), ("moe", moe)):
        calls[f"{kind} fwd+bwd"] = lambda layer=layer: forward_backward(layer, x, grad)
        calls[f"{kind} fwd"] = lambda layer=layer: forward(layer, x)
    for call in calls.values():
        call()  # warm-up
    tokens = LAYER_REPEATS * x.shape[0] * x.shape[1]
    stats = interleave({name: lambda c=call: tokens / timed(lambda: [c() for _ in range(LAYER_REPEATS)])
                        for name, call in calls.items()}, rounds)
    return LayerTiming(threads, stats, float(moe.last_stats["max_load_over_fair"]), load_avg)


# ----- the report --------------------------------------------------------------------------


def plot(runs: dict[str, dict[str, Any]], warmup: int) -> list[Path]:
    fig, (ax_s, ax_t, ax_l) = plt.subplots(1, 3, figsize=(15, 4.3))
    dense_final = val_curve(runs["dense"])[-1][1]
    for name, run in runs.items():
        curve, seconds = val_curve(run), train_seconds(run)
        steps = [step for step, _ in curve]
        losses = [loss for _, loss in curve]
        color = f"C{list(runs).index(name)}"  # one color per run on every panel
        ax_s.plot(steps, losses, marker="o", markersize=3, label=name, color=color)
        ax_s.plot([s["step"] for s in run["steps"]], [s["loss"] for s in run["steps"]],
                  color=color, alpha=0.2, linewidth=0.8)
        ax_t.plot([seconds[step - 1] for step in steps], losses, marker="o", markersize=3, label=name, color=color)
        if name != "dense":
            ax_l.plot([s["step"] for s in run["steps"]], layer_max_loads(run), label=name, linewidth=0.9, color=color)
    for ax in (ax_s, ax_t):
        ax.axhline(dense_final, color="gray", linestyle="--", linewidth=0.8, label="dense final")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_ylim(top=max(loss for _, loss in val_curve(runs["dense"])[1:]) + 0.3)
    ax_s.set(xlabel="step (faint: training loss)", title="Validation loss against steps")
    ax_t.set(xlabel="training time, CPU s on one thread", title="Validation loss against training time")
    ax_l.axhline(LOAD_TARGET, color="gray", linestyle="--", linewidth=0.8, label="2x fair share")
    ax_l.axvline(warmup, color="gray", linestyle=":", linewidth=0.8, label="end of warm-up")
    ax_l.set(xlabel="step", ylabel="busiest expert / fair share", title="Expert load, max over layers", ylim=(1, 4.1))
    for ax in (ax_s, ax_t, ax_l):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=90)
    plt.close(fig)
    return [PLOT]


def training_results(runs: dict[str, dict[str, Any]], recipes_: dict[str, TrainRecipe], plan: Plan) -> list[Result]:
    warmup, routing = recipes_["moe"].schedule.warmup_steps, recipes_["moe"].model.overrides["moe"]
    dense, moe = val_curve(runs["dense"]), val_curve(runs["moe"])
    dense_final, dense_steps = dense[-1][1], dense[-1][0]
    reached = first_reaching(moe, dense_final)
    fraction = reached / dense_steps if reached is not None else float("inf")
    time_fraction = (train_seconds(runs["moe"])[reached - 1] / train_seconds(runs["dense"])[-1]
                     if reached is not None else float("inf"))
    how = (f"{plan.steps}-step runs of the tiny and tiny-moe recipes in the widened test shape (module docstring), batch 8 x "
           f"256, validation every {plan.steps // plan.evals} steps on {plan.eval_batches} fixed batches"
           if plan == FULL else f"quick plan {plan}")
    return [
        Result("moe_steps_to_dense_loss_fraction", fraction, "fraction",
               f"first evaluated step at which the MoE's validation loss <= the dense run's final "
               f"{dense_final:.4f} ({reached if reached is not None else 'never'}) / the dense run's "
               f"{dense_steps} steps; {how}", STEPS_TARGET, at_most=True),
        Result("moe_time_to_dense_loss_fraction", time_fraction, "fraction",
               "the same crossing in training time: MoE CPU seconds (one thread) to that step / the dense run's"),
        Result("moe_train_step_time_vs_dense", step_seconds(runs["moe"]) / step_seconds(runs["dense"]), "x",
               "median CPU seconds of a training step (one thread, evaluation steps left out), MoE / dense"),
        Result("moe_final_val_loss", moe[-1][1], "nats/token", f"MoE validation loss at step {moe[-1][0]}"),
        Result("moe_dense_final_val_loss", dense_final, "nats/token", f"dense validation loss at step {dense_steps}"),
        Result("moe_max_expert_load_over_fair", max_load(runs["moe"], warmup), "x",
               f"assignments to the busiest expert / fair share (N x k / E), maximum over the 4 layers and over "
               f"every training step after the {warmup} warm-up steps; aux losses on (Switch alpha "
               f"{routing['aux_loss_coef']}, z {routing['z_loss_coef']})",
               LOAD_TARGET, at_most=True),
        Result("moe_max_expert_load_over_fair_no_aux", max_load(runs["moe-no-aux"], warmup), "x",
               f"the same with aux_loss_coef = z_loss_coef = 0, router centring on as shipped (ceiling "
               f"{routing['n_experts'] / routing['top_k']:.2f} for top-{routing['top_k']} of {routing['n_experts']})"),
        Result("moe_max_expert_load_over_fair_no_balancing", max_load(runs["moe-no-balancing"], warmup), "x",
               "the same with the aux losses and router centring all off"),
        Result("moe_max_expert_load_over_fair_last_half", max_load(runs["moe"], plan.steps // 2), "x",
               f"as moe_max_expert_load_over_fair, over the steps after {plan.steps // 2} only"),
    ]


def layer_results(timings: list[LayerTiming], rounds: int) -> list[Result]:
    config = model_config(load_recipe(recipe_path("tiny-moe")), 4096)
    how = (f"tiny-moe's MoE layer ({layout(config)}, d {config.d_model}) / tiny's dense MLP "
           f"({config.resolved_d_ff}), 2048 tokens, "
           f"{rounds} interleaved rounds of {LAYER_REPEATS} calls, median of per-round ratios")
    out = []
    for t in timings:
        suffix = "" if t.threads == 1 else f"_{t.threads}threads"
        for pass_, key in (("fwd+bwd", "moe_layer_throughput_vs_dense_mlp"), ("fwd", "moe_layer_forward_throughput_vs_dense_mlp")):
            r = ratio(t.stats[f"moe {pass_}"], t.stats[f"dense {pass_}"])
            target = LAYER_TARGET if t.threads == 1 and pass_ == "fwd+bwd" else None
            what = "forward + backward (input gradient, aux loss)" if pass_ == "fwd+bwd" else "forward, inference_mode"
            out.append(Result(key + suffix, r.median, "x",
                              f"tokens/s, {what}, {t.threads} thread(s): {how}; {r}; routing max load "
                              f"{t.balance:.2f}x fair; load average {t.load_avg:.1f} when timing began", target))
    return out


def notes(runs: dict[str, dict[str, Any]], recipes_: dict[str, TrainRecipe], vocab: int, warmup: int,
          timings: list[LayerTiming], elapsed: float) -> list[str]:
    counts = {name: parameters(r, vocab) for name, r in recipes_.items()}
    curves = {name: dict(val_curve(run)) for name, run in runs.items()}
    half = len(runs["moe"]["steps"]) // 2
    logged = {name: max(s["moe_max_load_over_fair"] for s in runs[name]["steps"] if s["step"] > warmup)
              for name in MOE_RUNS}
    lines = [
        f"Plot: `{PLOT.name}` (validation loss against steps and against training time; expert load).",
        f"Parameters (vocabulary {vocab}): dense {counts['dense'][0] / 1e6:.2f}M; MoE {counts['moe'][0] / 1e6:.2f}M "
        f"total, {counts['moe'][1] / 1e6:.2f}M active per token (the experts' share matches the dense MLP's; the "
        f"rest is the 8-way routers).",
        f"The {len(runs)} runs ran at once, one process and one torch thread each; wall time "
        + ", ".join(f"{name} {run['wall_s'] / 60:.1f} min" for name, run in runs.items())
        + f"; the training-time axis is CPU time, which does not depend on that sharing. Whole benchmark: "
        f"{elapsed / 60:.1f} min.",
        "Load, the loop's logged `moe_max_load_over_fair` (mean over layers) after warm-up, at most: "
        + ", ".join(f"{name} {value:.2f}" for name, value in logged.items())
        + ". Busiest expert / fair share per layer, median over the last half of the run: " + "; ".join(
            f"{name} " + ", ".join(f"{v:.2f}" for v in median_layer_loads(runs[name], half))
            for name in MOE_RUNS) + ".",
        "Layer timings, median ms per call (2048 tokens): " + "; ".join(
            f"{t.threads} thread(s) " + ", ".join(f"{name} {2048 / s.median * 1e3:.0f}" for name, s in t.stats.items())
            for t in timings) + ". Forward + backward speed on two threads over one: " + ", ".join(
            f"{kind} {timings[-1].stats[f'{kind} fwd+bwd'].median / timings[0].stats[f'{kind} fwd+bwd'].median:.2f}x"
            for kind in ("dense", "moe")) + " (a second thread pays only while a core is free; module docstring).",
        "",
        "| step | " + " | ".join(runs) + " |",
        "|---:|" + "---:|" * len(runs),
    ]
    lines += [f"| {step} | " + " | ".join(f"{curves[name][step]:.4f}" for name in runs) + " |"
              for step in curves["dense"]]
    return lines


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="30-step runs, fewer rounds; writes nothing")
    parser.add_argument("--train-child", choices=list(RUN_SOURCES), help=argparse.SUPPRESS)
    args = parse_args(parser)
    plan = QUICK if args.quick else FULL
    if args.train_child:
        train_child(recipes(plan)[args.train_child])
        return
    started = time.perf_counter()
    setup_torch(threads=1)
    info = machine()
    timings = [layer_throughput(threads, plan.rounds) for threads in (1, 2)]
    torch.set_num_threads(1)
    runs_ = recipes(plan)
    vocab = resolve_data(runs_["dense"].data).vocab_size  # tokenise once here, not in every child at once
    runs = train_all(runs_, args.quick)
    warmup = runs_["moe"].schedule.warmup_steps
    results = training_results(runs, runs_, plan) + layer_results(timings, plan.rounds)
    lines = notes(runs, runs_, vocab, warmup, timings, time.perf_counter() - started)
    finish(args, "moe", "Mixture-of-Experts against dense at equal active parameters", results, info, lines,
           files=lambda: plot(runs, warmup))


if __name__ == "__main__":
    main()
