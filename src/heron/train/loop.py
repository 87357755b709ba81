"""The one training loop.

Plain on purpose: one function per concern, no trainer class hierarchy.
Invariants the tests hold it to:

- gradient accumulation splits the same global batch: 1 x 8 equals 8 x 1;
- N processes (DDP or FSDP) each take a slice of that batch: equals 1 process;
- a run killed at any moment and resumed equals the unbroken run, bit for bit
  on CPU: batches are a pure function of the step (PackedBatches), the LR a
  pure function of the step (optim.lr_at), and the checkpoint holds weights,
  optimizer state and RNG states.

MoE models keep the third; the first two only in part. Their batch
statistics (the router-centring mean, the expert loads the balancing loss
weighs) are summed over the processes, so N processes equal 1, but each
accumulated micro-batch is centred and balanced on its own. Expert capacity
(`capacity_factor`) is sized and its drops made per forward on each process,
as Switch does per device batch, so with it neither holds.
"""
from __future__ import annotations

import fcntl
import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from heron.core.allocator import retain_freed_memory
from heron.core.gemm import BACKENDS, GEMM_ENV, cpu_gemm_libraries
from heron.core.head_loss import IGNORE_INDEX
from heron.core.hooks import attach_hooks
from heron.core.moe import moe_stats, share_batch_statistics
from heron.core.transformer import HeadLoss, Transformer
from heron.data.batches import PackedBatches, eval_batches
from heron.govern import EnergyMeter, EnergyReport
from heron.govern.audit import record_event
from heron.govern.audit_lineage import record_if_missing
from heron.govern.digest import METRICS_FILE, model_hash
from heron.store.atomic import is_partial_write, write_text_atomic
from heron.train import distributed as dist_
from heron.train.checkpoint import (
    CHECKPOINTS_DIR,
    LATEST_FILE,
    STATE_FILE,
    Checkpoint,
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    non_finite_weights,
    remove_folder,
    save_checkpoint,
    sweep_partial,
)
from heron.train.optim import build_optimizer, recipe_lr, set_lr
from heron.train.recipe import RecipeError, TrainRecipe, batch_plan, model_config, setting_changes
from heron.train.report import PLOT_FILE, append_metrics, logged_timings, plot_losses, write_metrics
from heron.train.rng import rng_states, set_rng_states
from heron.train.sources import TrainData, given_data, resolve_data

# The training objective of one micro-batch: (inputs x (b, T), the model's fp32 logits
# (b, T, V), targets y (b, T)) -> the loss summed over target tokens. Cross-entropy by
# default; distillation (compress/distill.py) brings its own. Validation stays cross-entropy.
TokenLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# A TokenLoss that also reads activations: (x, logits, y, {hook name: activation}) -> the same sum.
ActivationLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def cross_entropy_sum(x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the targets that are not IGNORE_INDEX."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@dataclass(frozen=True)
class Objective:
    """A training objective that needs more than the logits: distillation's
    hidden-state term (compress/distill.py) reads the model's residual stream
    through a projection it trains, and its token loss comes straight from the
    final hidden states, without the logits.

    The loop captures the activations at `hook_names` during the very forward
    that made the logits (with their gradients) and calls `loss(x, logits, y,
    activations)`. With `head`, called on each micro-batch's inputs first, the
    forward scores its final hidden states with the head loss `head(x)` returns
    (`Transformer.forward(head_loss=...)`: no logits are made) and `loss`
    receives that loss's value in place of the logits. `params` are the objective's own trainable parameters: the
    loop moves them to the model's device and steps them with a second AdamW
    under the same schedule, weight decay and clip norm (their gradients
    averaged over processes first, as DDP and FSDP do the model's). They and
    their optimizer state go into the trainer state, so a resumed run equals an
    unbroken one, and never into the model's weights: every checkpoint stays a
    plain model.
    """

    loss: ActivationLoss
    hook_names: tuple[str, ...] = ()
    params: nn.Module | None = None
    head: Callable[[torch.Tensor], HeadLoss] | None = None  # x -> the micro-batch's head loss

    @classmethod
    def of(cls, token_loss: TokenLoss) -> Objective:
        """A plain TokenLoss: no activations, no parameters."""
        return cls(lambda x, logits, y, _activations: token_loss(x, logits, y))


CROSS_ENTROPY = Objective.of(cross_entropy_sum)

STATE_FORMAT = 1
LOCK_FILE = ".train.lock"  # in the run folder; its flock is held by the one process training into it
RECIPE_FILE = "recipe.yaml"
# The files a run writes, replaces and (--no-resume) deletes in its folder (an alignment run's: align/run.py's
# RUN_FILES). Its checkpoints/ holds step_N folders and `latest`; killed writes leave hidden temps.
RUN_FILES = frozenset({RECIPE_FILE, METRICS_FILE, PLOT_FILE, CHECKPOINTS_DIR})
# Hidden entries too: killed writes (.tmp-*, .trash-*, .latest.*.partial) and a file browser's (.DS_Store).
_CHECKPOINT_ENTRY = re.compile(rf"step_[0-9]+|{LATEST_FILE}|\..+")

# Called after every step on every process with that step's row of history.
Callback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    checkpoint: Path | None  # the last checkpoint (written by rank 0; the same path on every rank)
    step: int
    history: list[dict[str, Any]]  # one row per step: step, loss, lr, grad_norm, tokens[, val_loss][, moe_*]
    is_main: bool = True  # rank 0, the process that writes checkpoints and speaks for the run

    @property
    def losses(self) -> list[float]:
        return [row["loss"] for row in self.history]

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return [(row["step"], row["val_loss"]) for row in self.history if "val_loss" in row]


@dataclass
class _Run:
    """Everything one training run holds while it runs."""

    recipe: TrainRecipe
    ctx: dist_.DistContext
    data: TrainData
    model: nn.Module  # possibly DDP-wrapped or FSDP-sharded
    optimizer: torch.optim.Optimizer
    objective: Objective
    objective_optimizer: torch.optim.Optimizer | None  # steps objective.params; None when it has none
    micro_batch: int
    grad_accum: int
    out_dir: Path
    meter: EnergyMeter  # started before the data and model were loaded
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: Path | None = None
    energy_before: EnergyReport | None = None  # the segments before a resume, from the checkpoint's lineage
    lineage_extra: dict[str, Any] = field(default_factory=dict)  # e.g. the teacher of a distillation


def train(recipe: TrainRecipe, *, resume: bool = True, data: TrainData | None = None,
          callbacks: Sequence[Callback] = (), token_loss: TokenLoss | Objective = cross_entropy_sum,
          lineage: dict[str, Any] | None = None) -> TrainResult:
    """Train as the recipe says; return the history and the last checkpoint.

    resume=True continues from the newest complete checkpoint in
    `recipe.out_dir` if there is one; resume=False starts over, deleting the
    earlier run's checkpoints and metrics there. `data` replaces the recipe's
    data section (tests, notebooks). `token_loss` replaces the training
    objective, a TokenLoss or an `Objective` (validation stays cross-entropy),
    and `lineage` adds entries to every checkpoint's lineage. Launch under
    torchrun for ddp/fsdp.
    """
    objective = (token_loss if isinstance(token_loss, Objective)
                 else CROSS_ENTROPY if token_loss is cross_entropy_sum else Objective.of(token_loss))
    ctx = dist_.setup(recipe.train.parallel, recipe.train.device)
    lock = _RunFolderLock(Path(recipe.out_dir))
    try:
        run = _start(recipe, ctx, resume, data, objective, lock, lineage or {})
        run.lineage_extra = dict(lineage or {})
        finished_before = run.step >= recipe.train.steps
        _loop(run, callbacks)
        if finished_before and ctx.is_main:
            _record_finished_run(run)
        return TrainResult(run.out_dir, run.last_checkpoint, run.step, run.history, ctx.is_main)
    finally:
        lock.release()
        dist_.teardown(ctx)


class _RunFolderLock:
    """An exclusive lock on a run folder, held by the process that trains into it (rank 0) from
    before it reads the folder until the run ends. A second run into the folder is refused at once:
    it would otherwise crash midway, after mixing its rows into the first one's metrics.jsonl.
    flock, because the kernel drops it when its holder exits, however it dies: a killed run's
    lock file blocks nothing."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._file = None  # the open lock file while held

    def hold(self) -> None:
        """Take the lock (the folder is made if missing), or RecipeError naming its holder's pid."""
        if self._file is not None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        file = open(self.out_dir / LOCK_FILE, "a+")  # appending: a refused run leaves the holder's pid
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise RecipeError(f"out_dir: run folder {self.out_dir} is in use by process {holder}; wait for that "
                              "run to end, or choose another out_dir") from None
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the lock
            self._file = None


# ----- setting up -------------------------------------------------------------


def _start(recipe: TrainRecipe, ctx: dist_.DistContext, resume: bool, data: TrainData | None,
           objective: Objective, lock: _RunFolderLock, lineage: Mapping[str, Any]) -> _Run:
    """Validate, load data, build (or restore) model and optimizers; `lineage`: train()'s extra entries."""
    meter = EnergyMeter().start()
    _hold_existing_folder(lock, ctx, recipe)
    # Under parallel=none, $WORLD_SIZE catches a torchrun launch that would train N copies.
    _, micro, accum = batch_plan(recipe.train, ctx.world_size if ctx.parallel != "none" else None)
    if ctx.is_main:
        _warn_if_warmup_fills_the_run(recipe)
    data = given_data(data) if data is not None else resolve_data(recipe.data, is_main=ctx.is_main,
                                                                  share=lambda failure: dist_.from_main(failure, ctx))
    _check_data_fits(recipe, data)
    config = model_config(recipe, data.vocab_size)
    out_dir = Path(recipe.out_dir)
    found = latest_checkpoint(out_dir) if resume else None
    ckpt = load_checkpoint(found) if found is not None else None
    if ckpt is not None:
        _check_resumable(ckpt, recipe, data, lineage)
        if ctx.is_main:
            _warn_of_changed_length(ckpt, recipe)
            _warn_of_other_gemm(ckpt, recipe, ctx.device)
    if recipe.train.threads is not None:
        torch.set_num_threads(recipe.train.threads)
    retain_freed_memory()  # activations reuse freed memory instead of faulting fresh pages in each step
    _seed_everything(recipe.train.seed)
    model = Transformer(config)
    if ckpt is not None:
        load_weights(model, ckpt.state_dict, source=ckpt.path)
    if ctx.world_size > 1:  # MoE routing statistics over the global micro-batch, not this rank's part
        share_batch_statistics(model, partial(dist_.all_reduce_sum, ctx=ctx))
    model = dist_.wrap_model(model.to(ctx.device), ctx)
    optimizer = build_optimizer(model, recipe.optim)
    objective_optimizer = None
    if objective.params is not None:
        objective_optimizer = build_optimizer(objective.params.to(ctx.device), recipe.optim)
    # Only now, every check passed: a run that cannot start leaves the folder as it was.
    _refused_on_main(ctx, lambda: _take_new_folder(lock, recipe, resume))
    dist_.barrier(ctx)
    run = _Run(recipe, ctx, data, model, optimizer, objective, objective_optimizer, micro, accum, out_dir, meter)
    if ckpt is not None:
        _restore(run, ckpt)
    elif ctx.is_main:  # rows a run that died before its first checkpoint logged
        write_metrics(out_dir, [])
    return run


def _warn_if_warmup_fills_the_run(recipe: TrainRecipe) -> None:
    """A short run under a long recipe's warm-up (`--set train.steps=50` with warm-up 100)
    is legal but is rarely meant: its learning rate climbs all the way and never decays."""
    warmup, steps = recipe.schedule.warmup_steps, recipe.train.steps
    if warmup >= steps:
        warnings.warn(f"schedule.warmup_steps {warmup} is not below train.steps {steps}: the learning rate "
                      f"climbs for the whole run and never reaches optim.lr {recipe.optim.lr:g}", stacklevel=3)


def _check_data_fits(recipe: TrainRecipe, data: TrainData) -> None:
    """Each split must hold an (x, y) window. An empty one is the corpus's or the split's doing,
    which no seq_len mends: the error says so, in `heron data prepare`'s words."""
    need = recipe.data.seq_len + 1  # one (x, y) window
    for split, tokens in (("train", data.train), ("validation", data.val)):
        if len(tokens) == 0:
            field = ("data" if data.meta.get("source") != "shards"  # streams from train(data=...)
                     else "data.corpus" if recipe.data.corpus is not None else "data.shards")
            raise RecipeError(f"{field}: the {split} split is empty: training needs both (add files, or prepare the "
                              "shards with another --val-fraction; a corpus of one file cannot be split)")
        if len(tokens) < need:
            raise RecipeError(f"data.seq_len: {recipe.data.seq_len} needs {need} tokens, the {split} split has {len(tokens)}")


def _hold_existing_folder(lock: _RunFolderLock, ctx: dist_.DistContext, recipe: TrainRecipe) -> None:
    """Check the run folder (`_check_out_dir`) and lock one that exists before any work, so that
    a run live there refuses this one at once, on every process (a new folder is locked as it
    is made: a run that cannot start must not leave one behind)."""
    def check() -> None:
        _check_out_dir(recipe)
        if lock.out_dir.is_dir():
            lock.hold()

    _refused_on_main(ctx, check)


def _take_new_folder(lock: _RunFolderLock, recipe: TrainRecipe, resume: bool) -> None:
    """Lock the run folder (already held, unless it was new) and prepare it. A folder that was new
    when this run looked was not locked meanwhile: another run may have made it, trained and ended
    there, and this one, which found no checkpoint to resume, would wipe that run's metrics."""
    out_dir, was_new = Path(recipe.out_dir), not lock.held
    lock.hold()
    if was_new and (latest_checkpoint(out_dir) is not None or (out_dir / METRICS_FILE).exists()):
        raise RecipeError(f"out_dir: another run wrote into {out_dir} meanwhile; rerun to resume it, or "
                          "choose another out_dir")
    _prepare_out_dir(out_dir, recipe, resume)


def _refused_on_main(ctx: dist_.DistContext, check: Callable[[], None]) -> None:
    """Run `check` on the main process; its RecipeError is raised on every process (the others
    would otherwise wait at the next collective for a main process that has gone)."""
    refusal = None
    if ctx.is_main:
        try:
            check()
        except RecipeError as err:
            refusal = str(err)
    refusal = dist_.from_main(refusal, ctx)
    if refusal is not None:
        raise RecipeError(refusal)


def _check_out_dir(recipe: TrainRecipe) -> None:
    """Refuse an out_dir whose files a run would replace or delete but did not write: a file, the
    shard folder or a folder in it, files with a run's names (RUN_FILES) beside no recipe.yaml that
    heron train wrote (a run replaces its metrics, plot and recipe), or anything but checkpoints in
    checkpoints/ (--no-resume deletes it whole). Other files may lie beside a run, untouched (the
    README's `runs/mine/data` shards, a benchmark's log)."""
    out_dir = Path(recipe.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RecipeError(f"out_dir: {out_dir} is a file; name a folder for the run")
    shards = recipe.data.shards
    if shards is not None and out_dir.resolve().is_relative_to(Path(shards).resolve()):
        raise RecipeError(f"out_dir: {out_dir} is in the shard folder data.shards {shards}; choose another out_dir")
    if not out_dir.is_dir():
        return
    checkpoints = out_dir / CHECKPOINTS_DIR
    foreign = sorted(f"{CHECKPOINTS_DIR}/{p.name}" for p in (checkpoints.iterdir() if checkpoints.is_dir() else ())
                     if not _CHECKPOINT_ENTRY.fullmatch(p.name))
    if foreign:
        raise RecipeError(f"out_dir: {out_dir} holds {', '.join(foreign[:3])}, not a checkpoint of a training run; "
                          "choose another out_dir")
    run_named = sorted(p.name for p in out_dir.iterdir() if p.name in RUN_FILES)
    if run_named and not _is_run_recipe(out_dir / RECIPE_FILE):
        raise RecipeError(f"out_dir: {out_dir} holds {', '.join(run_named)} but no {RECIPE_FILE} that heron train "
                          "wrote: not a run folder, whose files a run would replace; choose another out_dir")


def _is_run_recipe(file: Path) -> bool:
    """Whether `file` is the recipe.yaml a run wrote (`TrainRecipe.to_dict`), not a user's file."""
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and {"out_dir", "model", "data", "train"} <= raw.keys()


def _prepare_out_dir(out_dir: Path, recipe: TrainRecipe, resume: bool) -> None:
    """Make the run folder, sweep what killed runs left in it, and (not resuming) delete the
    earlier run's files. Called holding the run's lock: nothing swept is a live writer's, whatever
    process now has the pid a killed writer had."""
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = out_dir / CHECKPOINTS_DIR
    for folder, names in ((out_dir, (RECIPE_FILE, METRICS_FILE, PLOT_FILE)), (checkpoints, (LATEST_FILE,))):
        sweep_partial(folder, live_check=False)  # e.g. the .trash-checkpoints-* of a killed --no-resume
        for leftover in folder.iterdir() if folder.is_dir() else ():
            if any(is_partial_write(leftover, name) for name in names):
                leftover.unlink()
    if not resume:  # checkpoints/ holds only checkpoints (`_check_out_dir`): deleted whole, atomically
        if checkpoints.exists():
            remove_folder(checkpoints)
        for name in (METRICS_FILE, PLOT_FILE):
            (out_dir / name).unlink(missing_ok=True)
    write_text_atomic(out_dir / RECIPE_FILE, yaml.safe_dump(recipe.to_dict(), sort_keys=False))


# Lineage entries an objective records through train(lineage=...), and the command that resumes such a run.
RESUMED_BY = {"distillation": "heron compress distill"}


def _check_resumable(ckpt: Checkpoint, recipe: TrainRecipe, data: TrainData, lineage: Mapping[str, Any]) -> None:
    """Refuse to continue a run whose model, data or batch stream would differ, or (`lineage`:
    the entries this training adds) one trained under an objective this training is not given:
    its checkpoints would go on without it, their lineage no longer naming it (a teacher)."""
    for entry, command in RESUMED_BY.items():
        if entry in ckpt.lineage and entry not in lineage:
            raise RecipeError(
                f"{entry}: {recipe.out_dir} holds a {entry} run ({ckpt.path.name}'s lineage records it), which "
                f"this training would continue without it, dropping it from the lineage; resume it with "
                f"`{command}`, choose another out_dir, or pass --no-resume (resume=False) to delete that run's "
                "checkpoints and metrics and start over"
            )
    then = TrainRecipe.model_validate(ckpt.lineage["recipe"])
    fields = {
        "model": (then.model, recipe.model),
        "data.seq_len": (then.data.seq_len, recipe.data.seq_len),
        "train.batch_size": (then.train.batch_size, recipe.train.batch_size),
        "train.seed": (then.train.seed, recipe.train.seed),
        "data": (_data_identity(ckpt.lineage.get("data", {})), _data_identity(data.meta)),
    }
    for name, (old, new) in fields.items():
        shown = setting_changes(name, old, new)
        if shown:
            raise RecipeError(
                f"{name}: {recipe.out_dir} holds a run this recipe cannot continue ({shown}); choose another "
                "out_dir, or pass --no-resume (resume=False) to delete that run's checkpoints and metrics and "
                "start over"
            )


def _warn_of_other_gemm(ckpt: Checkpoint, recipe: TrainRecipe, device: torch.device) -> None:
    """A CPU run resumed where its products go through other libraries than when it was saved
    goes on, but rounds otherwise from here: it will not repeat the unbroken run bit for bit."""
    then, now = ckpt.lineage.get("cpu_gemm"), cpu_gemm_libraries()
    if device.type != "cpu" or then is None or then == now:
        return
    shown = ", ".join(f"{part} {then.get(part)} -> {now[part]}" for part in now if then.get(part) != now[part])
    same = then.get("products") if then.get("products") == then.get("weight_gradients") else None
    fix = f"; set {GEMM_ENV}={same} to compute as it did" if same in BACKENDS else ""
    warnings.warn(f"resuming {recipe.out_dir} at step {ckpt.lineage['step']} on a CPU whose fp32 products go through "
                  f"other libraries than when it was saved ({shown}): it continues, but rounds otherwise, so it will "
                  f"not repeat an unbroken run bit for bit{fix}", stacklevel=4)


def _warn_of_changed_length(ckpt: Checkpoint, recipe: TrainRecipe) -> None:
    """Resuming is allowed under another length or schedule, but its result is then neither
    run's: say so, and say when there is nothing left to train."""
    then, step, steps = TrainRecipe.model_validate(ckpt.lineage["recipe"]), ckpt.lineage["step"], recipe.train.steps
    if step >= steps:
        warnings.warn(f"{recipe.out_dir} already holds step {step}, and train.steps is {steps}: nothing to train "
                      "(raise train.steps to continue, or --no-resume (resume=False) to delete it and start over)", stacklevel=4)
    elif (then.train.steps, then.schedule, then.optim) != (steps, recipe.schedule, recipe.optim):
        warnings.warn(f"resuming {recipe.out_dir} at step {step} under another train.steps, schedule or optim than "
                      "it began with: the new settings (learning rate, weight decay, betas, eps) apply from here on", stacklevel=4)


def _data_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """The parts of data metadata that decide the token stream (not where it lies)."""
    return {k: v for k, v in meta.items() if k != "path"}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _with_recipe_settings(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer state dict whose groups' settings (weight decay, betas, eps, fused, ...) are
    `optimizer`'s, which the recipe built: a resumed run follows its recipe, and what carries over
    from the checkpoint is the moment estimates and step counts. Set before loading, which would
    otherwise put back the saved settings, and which places the step counts where the recipe's
    kernel (fused or not) wants them."""
    groups = [{**saved, **{key: value for key, value in own.items() if key != "params"}}
              for saved, own in zip(state["param_groups"], optimizer.param_groups, strict=True)]
    return {**state, "param_groups": groups}


def _restore(run: _Run, ckpt: Checkpoint) -> None:
    state = ckpt.trainer_state
    if state is None or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{ckpt.path / STATE_FILE}: missing or of an unknown format; cannot resume from it")
    dist_.load_optimizer_state(run.model, run.optimizer, _with_recipe_settings(state["optimizer"], run.optimizer))
    if run.objective_optimizer is not None:
        if "objective" not in state:
            raise CheckpointError(f"{ckpt.path / STATE_FILE}: holds no state for the objective's own parameters "
                                  "(a run without them); resume with the objective it was trained with")
        run.objective.params.load_state_dict(state["objective"]["params"])
        run.objective_optimizer.load_state_dict(_with_recipe_settings(state["objective"]["optimizer"],
                                                                      run.objective_optimizer))
    set_rng_states(state["rng"])
    run.step, run.history, run.last_checkpoint = state["step"], list(state["history"]), ckpt.path
    if "energy" in ckpt.lineage:
        run.energy_before = EnergyReport.from_dict(ckpt.lineage["energy"])
    if run.ctx.is_main:  # drop rows logged after the checkpoint by the run that died; keep the rest's timings
        timings = logged_timings(run.out_dir)
        write_metrics(run.out_dir, [{**row, **timings.get(row["step"], {})} for row in run.history
                                    if _logged(row, run.recipe)])


# ----- the loop ---------------------------------------------------------------


def _loop(run: _Run, callbacks: Sequence[Callback]) -> None:
    t = run.recipe.train
    batches = PackedBatches(run.data.train, t.batch_size, run.recipe.data.seq_len, seed=t.seed)
    bar = tqdm(total=t.steps, initial=run.step, unit="step", dynamic_ncols=True,
               disable=not (run.ctx.is_main and t.progress))
    tokens_per_step = t.batch_size * run.recipe.data.seq_len
    while run.step < t.steps:
        started = time.perf_counter()
        loss, grad_norm, lr, moe = _train_step(run, batches)
        run.meter.sample()  # RAPL counters wrap (every ~45 min at 100 W): read them every step
        speed = tokens_per_step / (time.perf_counter() - started)  # training alone: validation is not timed
        run.step += 1
        row = {"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "tokens": run.step * tokens_per_step, **moe}
        if _due(run.step, t.eval_every, t.steps):
            row["val_loss"] = evaluate(run)
            _check_finite_value(run.step, "validation loss", row["val_loss"])
        run.history.append(row)
        _record(run, row, speed, bar)
        if _due(run.step, t.ckpt_every, t.steps):
            _checkpoint(run)
        for callback in callbacks:
            callback(row)
    bar.close()


class DivergedError(ValueError):
    """The training loss stopped being a finite number: what the step made is not kept."""


def check_finite_loss(step: int, loss: float) -> None:
    """Stop a run whose loss is NaN or infinite (a learning rate far too high, say) before its
    metrics row or a checkpoint of it is written: the last good checkpoint stays the latest."""
    _check_finite_value(step, "training loss", loss)


def check_finite_update(step: int, loss: float, grad_norm: float) -> None:
    """Call between clipping and `optimizer.step()`. An infinite gradient norm is not saved by
    clipping (inf / inf is NaN), and one NaN gradient makes AdamW write NaN into every weight
    it updates; stopping here keeps the weights as the last finite step left them."""
    _check_finite_value(step, "training loss", loss)
    _check_finite_value(step, "gradient norm", grad_norm)


def check_finite_weights(step: int, state: dict[str, torch.Tensor]) -> None:
    """Refuse to keep a state dict holding NaN or infinite weights (an update that overflowed)."""
    bad = non_finite_weights(state)
    if bad:
        raise DivergedError(f"step {step}: {len(bad)} weight tensor(s) hold NaN or infinite values "
                            f"(first: {bad[0]}); stopped before checkpointing them (lower the learning rate)")


def _check_finite_value(step: int, name: str, value: float) -> None:
    if not math.isfinite(value):
        raise DivergedError(f"step {step}: the {name} is {value}; stopped before keeping anything of it "
                            "(lower the learning rate, or clip gradients)")


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _logged(row: dict[str, Any], recipe: TrainRecipe) -> bool:
    """Which history rows go to metrics.jsonl (the same rule on resume)."""
    return "val_loss" in row or _due(row["step"], recipe.train.log_every, recipe.train.steps)


def _record(run: _Run, row: dict[str, Any], tokens_per_s: float, bar: tqdm) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
    if run.ctx.is_main and _logged(row, run.recipe):
        append_metrics(run.out_dir, {**row, "tokens_per_s": round(tokens_per_s, 1)})


def _train_step(run: _Run, batches: PackedBatches) -> tuple[float, float, float, dict[str, float]]:
    """One optimizer step over the global batch: (mean loss, grad norm, lr, MoE metrics)."""
    t, ctx = run.recipe.train, run.ctx
    lr = recipe_lr(run.step, run.recipe.optim, run.recipe.schedule, t.steps)
    for optimizer in _optimizers(run):
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
    # Micro-batch m of rank r is row block r*accum+m of the global batch, so any
    # split of the same batch_size over processes and accumulation sees the same rows.
    parts = [batches.batch(run.step, ctx.rank * run.grad_accum + m, ctx.world_size * run.grad_accum)
             for m in range(run.grad_accum)]
    counted = torch.stack([(y != IGNORE_INDEX).sum() for _, y in parts]).sum().to(ctx.device)
    n_tokens = dist_.all_reduce_sum(counted, ctx)  # targets in the global batch
    loss_sum = torch.zeros((), device=ctx.device)
    moe_sums: dict[str, torch.Tensor] = {}
    for m, (x, y) in enumerate(parts):
        with dist_.gradient_sync(run.model, enabled=m == run.grad_accum - 1):
            token_loss, aux = _forward_loss(run, x, y, run.objective)
            # Sum over tokens / tokens in the global batch: the global mean whatever the
            # split. x world undoes the mean over ranks that DDP and FSDP apply to gradients.
            (token_loss * ctx.world_size / n_tokens + aux / run.grad_accum).backward()
        loss_sum += token_loss.detach()
        for name, value in moe_stats(run.model).items():
            moe_sums[name] = moe_sums.get(name, 0) + value
    norm = dist_.grad_norm_value(nn.utils.clip_grad_norm_(run.model.parameters(), t.clip_norm or float("inf")))
    loss = float(dist_.all_reduce_sum(loss_sum, ctx) / n_tokens)
    check_finite_update(run.step + 1, loss, norm)  # the same values on every rank: all stop together
    if run.objective_optimizer is not None:
        _check_objective_gradients(run)
    run.optimizer.step()
    if run.objective_optimizer is not None:
        run.objective_optimizer.step()
    return loss, norm, lr, _moe_metrics(run, moe_sums)


def _optimizers(run: _Run) -> list[torch.optim.Optimizer]:
    return [run.optimizer] if run.objective_optimizer is None else [run.optimizer, run.objective_optimizer]


def _check_objective_gradients(run: _Run) -> None:
    """Ready the objective's own parameters for their update as the model's: gradients averaged
    over processes (the model's are, by DDP or FSDP; these sit outside the wrapper), clipped to
    the same norm on their own, and refused when their norm is not finite."""
    params = [p for p in run.objective.params.parameters() if p.grad is not None]
    for p in params:
        p.grad = dist_.all_reduce_sum(p.grad, run.ctx) / run.ctx.world_size
    norm = nn.utils.clip_grad_norm_(params, run.recipe.train.clip_norm or float("inf"))
    _check_finite_value(run.step + 1, "objective's gradient norm", float(norm))


def _moe_metrics(run: _Run, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Routing statistics summed over micro-batches -> `moe_<name>` means over
    micro-batches and processes; {} for a dense model, whose rows stay as they were."""
    if not sums:
        return {}
    names = sorted(sums)
    totals = dist_.all_reduce_sum(torch.stack([sums[n] for n in names]).to(run.ctx.device), run.ctx)  # (S,)
    count = run.grad_accum * run.ctx.world_size
    return {f"moe_{name}": float(total) / count for name, total in zip(names, totals)}


def _forward_loss(run: _Run, x: torch.Tensor, y: torch.Tensor,
                  objective: Objective = CROSS_ENTROPY) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, aux loss) for one micro-batch x, y: (b, T)."""
    device = run.ctx.device
    x, y = x.to(device), y.to(device)
    activations: dict[str, torch.Tensor] = {}  # by hook name, as the objective asks; none by default

    def record(activation: torch.Tensor, name: str) -> None:  # returns None: reads, replaces nothing
        activations[name] = activation

    head = objective.head(x) if objective.head is not None else None
    fused = objective is CROSS_ENTROPY or head is not None  # a head loss: no logits made (core/head_loss.py)
    with attach_hooks(dist_.unwrap(run.model), dict.fromkeys(objective.hook_names, record)), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.recipe.train.precision == "bf16"):
        out = run.model(x, targets=y if fused else None, **({} if head is None else {"head_loss": head}))
    if objective is CROSS_ENTROPY:
        return out.loss, out.aux_loss.float()
    scored = out.loss if fused else out.logits.float()  # logits (b, T, V) in fp32 even under bf16 autocast
    return objective.loss(x, scored, y, activations), out.aux_loss.float()


@torch.no_grad()
def evaluate(run: _Run) -> float:
    """Mean validation loss over `eval_batches` global batches of
    non-overlapping windows spread evenly over the split; the same windows
    whatever the process layout."""
    t, ctx = run.recipe.train, run.ctx
    run.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # (loss sum, tokens)
    for x, y in eval_batches(run.data.val, t.batch_size, run.recipe.data.seq_len, max_batches=t.eval_batches):
        x, y = rank_rows(x, y, ctx.rank, ctx.world_size)
        for xm, ym in zip(x.split(run.micro_batch), y.split(run.micro_batch)):
            loss, _ = _forward_loss(run, xm, ym)
            total += torch.stack([loss.double(), (ym != IGNORE_INDEX).sum().to(total)])
    run.model.train()
    total = dist_.all_reduce_sum(total, run.ctx)
    return float(total[0] / total[1])


def rank_rows(x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s share of a validation batch x, y (B, T), topped up to ceil(B / world_size)
    rows with rows whose targets are all IGNORE_INDEX (they score nothing): every rank then runs
    as many forwards, which FSDP's gathers must pair up, even when B does not divide evenly or
    is less than the number of processes; each window is scored once, as in one process."""
    rows = -(-x.shape[0] // world_size)
    x_share, y_share = x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]
    pad = rows - x_share.shape[0]
    if pad == 0:
        return x_share, y_share
    return (torch.cat([x_share, x[:1].expand(pad, -1)]),
            torch.cat([y_share, torch.full((pad, y.shape[1]), IGNORE_INDEX, dtype=y.dtype)]))


# ----- checkpoints --------------------------------------------------------------


def _checkpoint(run: _Run) -> None:
    """Gather full state on every rank (a collective), write from rank 0 only."""
    model_state, optim_state = dist_.full_state_dicts(run.model, run.optimizer)
    check_finite_weights(run.step, model_state)  # every rank holds the full state: all stop together
    run.last_checkpoint = run.out_dir / CHECKPOINTS_DIR / checkpoint_name(run.step)
    energy = _energy(run)  # a collective too
    if run.ctx.is_main:
        t = run.recipe.train
        trainer_state = {"format": STATE_FORMAT, "step": run.step, "optimizer": optim_state,
                         "rng": rng_states(), "history": run.history}
        if run.objective_optimizer is not None:
            trainer_state["objective"] = {"params": run.objective.params.state_dict(),
                                          "optimizer": run.objective_optimizer.state_dict()}
        lineage = _lineage(run, energy)  # once: the audit record states what the checkpoint does, energy included
        save_checkpoint(
            run.out_dir, run.step, dist_.unwrap(run.model), keep_last=t.keep_last,
            tokenizer=run.data.tokenizer, lineage=lineage, state_dict=model_state,
            trainer_state=trainer_state,
        )
        plot_losses(run.history, run.out_dir / PLOT_FILE, title=run.recipe.name)
        if run.step == t.steps:  # the run's last checkpoint: one audit record per finished run
            _record_train(run, lineage)
    dist_.barrier(run.ctx)


def _record_train(run: _Run, lineage: dict[str, Any]) -> None:
    record_event("train", inputs={"data": run.data.meta}, outputs={"checkpoint": run.last_checkpoint},
                 model_hash=model_hash(run.last_checkpoint), parameters=lineage)


def _record_finished_run(run: _Run) -> None:
    """A rerun of a finished run writes the audit record its last checkpoint lacks: a kill
    between that checkpoint and its record lost it (the log off, or holding it: nothing to do)."""
    if run.last_checkpoint is not None:
        record_if_missing(run.last_checkpoint,
                          lambda last: _record_train(run, load_checkpoint(last, trainer_state=False).lineage))


def _lineage(run: _Run, energy: EnergyReport) -> dict[str, Any]:
    last = run.history[-1] if run.history else {}
    val = [row["val_loss"] for row in run.history if "val_loss" in row]
    return {
        "kind": "pretrain",
        "recipe": run.recipe.to_dict(),
        "seed": run.recipe.train.seed,
        "step": run.step,
        "tokens_seen": last.get("tokens", 0),
        "data": run.data.meta,
        "metrics": {"train_loss": last.get("loss"), "val_loss": val[-1] if val else None},
        "world_size": run.ctx.world_size,
        "parallel": run.ctx.parallel,
        "energy": energy.to_dict(),
        **run.lineage_extra,
    }


def _energy(run: _Run) -> EnergyReport:
    """Energy of the whole run so far: the segments before a resume, as the checkpoint's
    lineage recorded them, plus this one's, summed over the processes (each one's own
    estimate, and the node-wide counters read by local rank 0). A collective: every rank calls it."""
    report = run.meter.read(node_counters=run.ctx.local_rank == 0)
    if run.ctx.world_size > 1:
        joules = dist_.all_reduce_sum(torch.tensor([report.joules], dtype=torch.float64, device=run.ctx.device),
                                      run.ctx)
        report = replace(report, joules=float(joules[0]),
                         source=f"{report.source}, summed over {run.ctx.world_size} processes")
    if run.energy_before is not None:
        report = run.energy_before + report
    return replace(report, tokens=run.history[-1]["tokens"] if run.history else None)


__all__ = ["ActivationLoss", "Callback", "DivergedError", "Objective", "TokenLoss", "TrainResult", "check_finite_loss",
           "check_finite_update", "check_finite_weights",
           "cross_entropy_sum", "evaluate", "train"]
