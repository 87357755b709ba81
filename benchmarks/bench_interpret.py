"""Interpretability tools on a known mechanism and on the dense `tiny` model (issue 7).

Induction heads (`heron.interpret.induction`): for seeds 0, 1 and 2,
`induction_head_score_margin(InductionTask(seed=s))` trains a two-layer,
two-heads-per-layer attention-only model (d_model 64, 64-token vocabulary) on
random tokens repeated once (period 8-24, drawn per batch) until the repeated
half's loss is below 0.3 (at most 2,000 steps), then scores every head on 32
unseen sequences of period 16. A head's induction score is its mean attention
from each second-half query t to key t - 15, the token after the previous
occurrence of the current one; the margin is the weakest head scoring >= 0.4
minus the strongest other head (with none at 0.4, the best minus the
runner-up). The key is the smallest margin of the three seeds. The same model
is trained again (training is deterministic at one thread) for the notes:
the previous-token heads and their margin, and the share of the in-context
loss gap (unrepeated half's loss - repeated half's) that zero-ablating the
found heads removes, on 64 other sequences. One torch thread, as the tests.

Sparse autoencoder (`heron.interpret.sae`) on the dense `tiny` model: the
shipped `tiny` recipe (the demo's shape without the experts and sliding
windows of the demo's own `tiny-moe-sparse`; 360 steps of 8 x 128 tokens on
the standard library's shards) trained in runs/bench-interpret/tiny, resumed
if it is there. First, on 64
windows of 128 tokens from the first half of the validation split, the loss
increase from zero-ablating each block's `blocks.{i}.hook_mlp_out`; the SAE
is trained on the block whose MLP output matters most (ablating a
component that hardly matters makes "loss recovered" a ratio of two tiny
numbers). The SAE keeps the module's defaults (top-k, k 32, expansion 8,
AuxK 256, 500 steps of 1,024 activations) on 1,024 training windows; it is
measured on 64 windows from the validation split's second half: L0,
normalised MSE, dead features, the next-token loss clean, with the MLP
output zeroed, replaced by its training mean, and replaced by the SAE's
reconstruction, and the top-activating contexts of three features drawn at
random. Two torch threads.

    python benchmarks/bench_interpret.py [--smoke] [--no-write]
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import HERE, Result, machine, finish, plan_args, setup_torch
import heron
from heron.cli.commands import recipe_path
from heron.core.transformer import Transformer
from heron.data import load_shards
from heron.interpret.ablation import ablated, gap_removed, repeat_losses, token_losses
from heron.interpret.heads import FoundHeads, detect_heads, repeated_tokens
from heron.interpret.induction import InductionTask, induction_head_score_margin, train_induction_model
from heron.interpret.plots import token_label
from heron.interpret.sae import (SAEMetrics, SAESettings, SparseAutoencoder, sample_windows,
                                 top_activating_contexts, train_sae_on_model)
from heron.tokenizer import Tokenizer
from heron.train import load_recipe, train

RUNS = HERE.parent / "runs" / "bench-interpret"
SHARDS = HERE.parent / "runs" / "data" / "stdlib"
SEQ_LEN = 128  # the tiny recipe's
MARGIN_TARGET = 0.3
SHOWN_FEATURES, SHOWN_CONTEXTS, CONTEXT = 3, 3, 6  # features, windows each, tokens either side of the peak


@dataclass(frozen=True)
class Plan:
    runs: Path
    seeds: tuple[int, ...]
    induction_steps: int  # InductionTask.max_steps
    tiny_steps: int | None  # None: the recipe's own
    sae_steps: int
    train_windows: int  # the SAE's training activations: windows x SEQ_LEN tokens
    val_windows: int  # each of: choosing the block, measuring the SAE
    ablation_sequences: int  # repeated-token sequences for the head ablations


FULL = Plan(RUNS, seeds=(0, 1, 2), induction_steps=InductionTask().max_steps, tiny_steps=None,
            sae_steps=SAESettings().steps, train_windows=1024, val_windows=64, ablation_sequences=64)
SMOKE = Plan(HERE.parent / "runs" / "bench-interpret-smoke", seeds=(0,), induction_steps=20, tiny_steps=4,
             sae_steps=5, train_windows=16, val_windows=4, ablation_sequences=8)  # minutes; writes nothing


# ----- induction heads -------------------------------------------------------------


@dataclass(frozen=True)
class InductionRun:
    seed: int
    margin: float  # induction_head_score_margin's value
    steps: int
    induction: FoundHeads
    previous: FoundHeads
    gap_removed: dict[str, float]  # heads ablated -> share of the in-context loss gap removed


def induction_run(seed: int, plan: Plan) -> InductionRun:
    task = InductionTask(seed=seed, max_steps=plan.induction_steps)
    margin = induction_head_score_margin(task)
    trained = train_induction_model(task)  # the same model again, for its heads and ablations
    found = detect_heads(trained.model, period=task.eval_period, seed=task.seed + 3)  # as the function scores
    if found["induction"].margin != margin:
        raise RuntimeError(f"seed {seed}: retraining gave margin {found['induction'].margin}, not {margin}")
    induction, previous = found["induction"].heads, found["previous_token"].heads
    others = [(layer, h) for layer in range(2) for h in range(task.n_heads) if (layer, h) not in induction + previous]
    groups = {"induction": induction, "previous-token": previous, "both": induction + previous, "all others": others}
    return InductionRun(seed, margin, trained.steps, found["induction"], found["previous_token"],
                        head_ablations(trained.model, task, groups, plan.ablation_sequences))


def head_ablations(model: Transformer, task: InductionTask, groups: dict[str, list | tuple],
                   sequences: int) -> dict[str, float]:
    """{group: share of the clean in-context gap that zero-ablating its heads removes},
    on sequences neither training, stopping nor scoring saw."""
    ids = repeated_tokens(sequences, task.eval_period, task.vocab_size, seed=task.seed + 100)  # (B, 2L)
    clean = repeat_losses(model, ids, task.eval_period)
    removed = {}
    for name, heads in groups.items():
        with ablated(model, heads=list(heads)):
            removed[name] = gap_removed(clean, repeat_losses(model, ids, task.eval_period))
    return removed


def induction_notes(runs: list[InductionRun]) -> list[str]:
    def heads(found: FoundHeads) -> str:
        return ", ".join(f"L{layer}H{h}" for layer, h in found.heads) or "none"

    lines = [f"Seed {r.seed} ({r.steps} steps): induction margin {r.margin:.3f} (heads {heads(r.induction)}, best "
             f"score {r.induction.best_score:.2f}); previous-token margin {r.previous.margin:.3f} (heads "
             f"{heads(r.previous)}, best {r.previous.best_score:.2f}); zero-ablating the heads removes this share of "
             "the in-context loss gap: " + ", ".join(f"{k} {v:+.2f}" for k, v in r.gap_removed.items()) + "."
             for r in runs]
    return [*lines, f"Target {MARGIN_TARGET}: scores are attention fractions in [0, 1] (near-uniform causal attention "
            "over these 32 positions gives about 0.03-0.06), so a 0.3 gap means every found induction head puts at "
            "least 30 points more of its attention on the induction target than any other head: the detector names "
            "the circuit without ambiguity, whichever seed trained it."]


# ----- the SAE on the tiny model ----------------------------------------------------


def tiny_model(plan: Plan) -> tuple[Transformer, Tokenizer, Path]:
    steps = [] if plan.tiny_steps is None else [f"train.steps={plan.tiny_steps}"]
    recipe = load_recipe(recipe_path("tiny"), [f"out_dir={plan.runs / 'tiny'}", f"data.shards={SHARDS}", *steps])
    checkpoint = train(recipe).checkpoint  # resumes; a no-op once the run is complete
    model, tokenizer = heron.load(checkpoint)
    return model, tokenizer, checkpoint


@torch.no_grad()
def mean_loss(model: Transformer, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over windows (N, T)."""
    losses = [token_losses(model, windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
    return torch.cat(losses).mean().item()


def mlp_ablation_increases(model: Transformer, windows: torch.Tensor) -> tuple[float, list[float]]:
    """(clean loss, [loss increase when block i's MLP output is zeroed])."""
    clean = mean_loss(model, windows)
    increases = []
    for i in range(model.config.n_layers):
        with ablated(model, mlps=[i]):
            increases.append(mean_loss(model, windows) - clean)
    return clean, increases


def context_notes(sae: SparseAutoencoder, model: Transformer, tokenizer: Tokenizer, windows: torch.Tensor,
                  hook: str) -> list[str]:
    """Top-activating contexts of a few features drawn at random (seed 0) among those that
    peak in at least SHOWN_CONTEXTS windows, the peak token in brackets."""
    top = top_activating_contexts(model, sae, windows, hook, k=SHOWN_CONTEXTS, context=CONTEXT)
    live = (top.values[:, -1] > 0).nonzero().flatten()  # (n,): features with SHOWN_CONTEXTS contexts
    pick = live[torch.randperm(len(live), generator=torch.Generator().manual_seed(0))[:SHOWN_FEATURES]].sort().values
    lines = []
    for j in pick.tolist():
        shown = []
        for rank in range(SHOWN_CONTEXTS):
            ids = top.tokens[j, rank].tolist()
            left, peak, right = ([t for t in part if t >= 0] for part in (ids[:CONTEXT], ids[CONTEXT:CONTEXT + 1],
                                                                          ids[CONTEXT + 1:]))
            text = "".join(token_label(tokenizer.decode(p)) if i != 1 else f"[{token_label(tokenizer.decode(p))}]"
                           for i, p in enumerate((left, peak, right)))
            shown.append(f"{code_span(text)} ({top.values[j, rank]:.2f})")
        lines.append(f"Feature {j}: " + "; ".join(shown) + ".")
    return lines


def code_span(text: str) -> str:
    """Markdown inline code for any text: fenced by one backtick more than its longest run of them."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def sae_notes(clean: float, increases: list[float], layer: int, m: SAEMetrics) -> list[str]:
    return [
        f"Next-token loss on the block-choosing windows: clean {clean:.3f}; increase when zero-ablating "
        "`blocks.{i}.hook_mlp_out`: " + ", ".join(f"{i}: {d:+.3f}" for i, d in enumerate(increases))
        + f". The SAE is trained on block {layer}, the largest; where ablating an MLP output costs hundredths of "
        "a nat, loss recovered divides by almost nothing.",
        f"SAE on `blocks.{layer}.hook_mlp_out`, {m.tokens:,} held-out tokens: loss clean {m.loss_clean:.3f}, "
        f"MLP output zeroed {m.loss_zero:.3f}, replaced by its training mean {m.loss_mean:.3f}, SAE spliced in "
        f"{m.loss_sae:.3f}; recovered {m.loss_recovered:.3f} against zero ablation and "
        f"{m.loss_recovered_mean:.3f} against mean ablation; L0 {m.l0:.1f}, normalised MSE {m.normalized_mse:.4f}, "
        f"dead features (silent over the last {SAESettings().dead_tokens:,} training tokens) "
        f"{100 * m.dead_fraction:.1f}%.",
    ]


# ----- the run --------------------------------------------------------------------


def main() -> None:
    args, plan = plan_args(__doc__, FULL, SMOKE)
    setup_torch()
    info = machine()
    started = time.perf_counter()

    torch.set_num_threads(1)  # the induction model's training is deterministic per thread count; tests use 1
    runs = []
    for seed in plan.seeds:
        runs.append(induction_run(seed, plan))
        print(f"induction seed {seed}: margin {runs[-1].margin:.3f} after {runs[-1].steps} steps", flush=True)
    induction_minutes = (time.perf_counter() - started) / 60
    setup_torch()

    trained_at = time.perf_counter()
    model, tokenizer, checkpoint = tiny_model(plan)
    tiny_minutes = (time.perf_counter() - trained_at) / 60
    val = load_shards(SHARDS).val
    half = len(val) // 2  # choose the block on the first half, measure the SAE on the second
    choose = sample_windows(val[:half], plan.val_windows, SEQ_LEN, seed=1)
    held_out = sample_windows(val[half:], plan.val_windows, SEQ_LEN, seed=2)
    clean, increases = mlp_ablation_increases(model, choose)
    layer = max(range(len(increases)), key=increases.__getitem__)
    hook = f"blocks.{layer}.hook_mlp_out"
    print(f"MLP zero-ablation increases {[round(d, 3) for d in increases]}: SAE on {hook}", flush=True)
    settings = SAESettings(steps=plan.sae_steps)
    train_ids = sample_windows(SHARDS, plan.train_windows, SEQ_LEN, split="train", seed=0)
    sae, metrics = train_sae_on_model(model, train_ids, hook, settings, eval_windows=held_out, progress=False)
    contexts = context_notes(sae, model, tokenizer, held_out, hook)

    seeds = ", ".join(map(str, plan.seeds))
    sae_setup = (f"top-k SAE (module defaults: expansion {settings.expansion}, {sae.n_features} features, k "
                 f"{settings.k}, AuxK {settings.aux_k}, lr {settings.lr:g}, {settings.steps} steps x "
                 f"{settings.batch_size} activations from {plan.train_windows} training windows of {SEQ_LEN} tokens) at "
                 f"`{hook}` of the tiny model ({checkpoint.name} of the shipped recipe), measured on "
                 f"{plan.val_windows} held-out validation windows")
    results = [
        Result("induction_head_score_margin", min(r.margin for r in runs), "",
               f"smallest over seeds {seeds} of induction_head_score_margin(InductionTask(seed=s)): in a 2-layer "
               "attention-only model trained on repeated random tokens, the weakest head whose induction score "
               "(mean attention from second-half queries to the token after the current token's earlier occurrence, "
               "period 16, 32 unseen sequences) is >= 0.4, minus the strongest other head's score; 1 torch thread",
               MARGIN_TARGET),
        Result("sae_loss_recovered", metrics.loss_recovered, "",
               f"(L_zero - L_sae) / (L_zero - L_clean), next-token loss with the MLP output zeroed, replaced by the "
               f"SAE's reconstruction, and untouched: {sae_setup}", 0.8),
        Result("sae_l0", metrics.l0, "features",
               f"mean active features per token (top-k keeps at most k = {settings.k}): {sae_setup}", 32,
               at_most=True),
    ]
    minutes = (time.perf_counter() - started) / 60
    notes = [
        *induction_notes(runs),
        *sae_notes(clean, increases, layer, metrics),
        f"Top-activating held-out contexts ({CONTEXT} tokens either side, peak token in brackets, '·' a space, "
        f"'⏎' a newline; peak activation in parentheses) of {SHOWN_FEATURES} features drawn at random among those "
        f"peaking in at least {SHOWN_CONTEXTS} held-out windows:",
        *contexts,
        f"Whole benchmark: {minutes:.1f} min: induction models {induction_minutes:.1f} min, training the tiny model "
        f"{tiny_minutes:.1f} min (nothing left to do when its run is complete), the rest the ablations and the SAE.",
    ]
    finish(args, "interpret", "Interpretability: induction heads and a sparse autoencoder", results, info, notes)


if __name__ == "__main__":
    main()
