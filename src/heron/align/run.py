"""`heron align METHOD RECIPE`: one alignment run from a recipe to a checkpoint folder.

Writes <out_dir>/model (a Heron checkpoint whose lineage records the method,
the base checkpoint, the recipe and the final metrics), <out_dir>/metrics.jsonl
(one row a step) and, for ppo and grpo, <out_dir>/reward_kl.png. Every
`save_every` steps it saves the run's state to <out_dir>/state.pt, from which
a rerun of a killed run goes on exactly (`align.resume`); the finished run
deletes it.
"""
from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import heron
from heron.align.data import Messages, RowTooLong, as_messages, check_ids_fit, encode_chats, encode_pairs
from heron.align.grpo import grpo
from heron.align.heads import with_scalar_head
from heron.align.loop import fit
from heron.align.objectives import (
    NEEDS_REFERENCE,
    cached_reference_logprobs,
    preference_objective,
    reward_objective,
    sft_objective,
)
from heron.align.ppo import ppo
from heron.align.recipe import METHODS, AlignRecipe
from heron.align.resume import ModuleBuffers, Resumable, read_state
from heron.align.rollout import Reward, RewardModel
from heron.align.synthetic import RepeatTask
from heron.compress.prune_model import sparsity_of
from heron.compress.qlinear import is_quantized
from heron.compress.sparse_store import is_sparse_folder
from heron.data.chat import read_chat_jsonl
from heron.govern import EnergyMeter, EnergyReport
from heron.govern.audit import record_event
from heron.govern.audit_lineage import record_if_missing
from heron.govern.digest import LINEAGE_FILE, METRICS_FILE, model_hash
from heron.govern.figures import new_figure, save_png
from heron.store.atomic import is_partial_write
from heron.store.jsonl import read_jsonl_objects
from heron.train.checkpoint import (RUN_MODEL_DIR, is_leftover, resolve_checkpoint, save_model_folder, sha256_file,
                                    weights_identity)
from heron.train.loop import check_finite_weights
from heron.train.recipe import setting_changes

PLOT_FILE, MODEL_DIR, CACHE_DIR = "reward_kl.png", RUN_MODEL_DIR, "cache"  # METRICS_FILE: a training run's name
STATE_FILE = "state.pt"
RUN_FILES = (METRICS_FILE, PLOT_FILE, MODEL_DIR, CACHE_DIR, STATE_FILE)  # an alignment run's own files


def run_alignment(method: str, recipe: AlignRecipe, *, resume: bool = True, restart_other: bool = False) -> Path:
    """Run `method` as the recipe says; returns the written checkpoint folder. A run that was
    killed goes on from its last saved state; `resume=False` starts it over. The state of
    another run (another method, settings, base, reward model or data) is refused, or with
    `restart_other` deleted, and the run starts over (the demo, whose stages follow its base)."""
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    out = Path(recipe.out_dir)
    if (out / MODEL_DIR).exists():
        (out / STATE_FILE).unlink(missing_ok=True)  # a finished run's: killed before it deleted it
        written = record_finished_model(out / MODEL_DIR)
        recorded = " (the audit record a kill left it without: now written)" if written else ""
        raise FileExistsError(f"{out / MODEL_DIR}: exists{recorded}; choose another out_dir")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and not _unfinished_write(p)
                     ) if out.is_dir() else []
    if foreign or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"out_dir: {out} holds {', '.join(foreign[:3]) or 'a file'}, not an alignment run's "
                              "files; choose another out_dir")
    data = recipe.data.file
    if data is not None and Path(data).is_dir():
        raise IsADirectoryError(f"data.file: {data}: a folder; give the JSONL file")
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"data.file: {data}: no such file")
    meter = EnergyMeter().start()
    model, tokenizer = heron.load(recipe.base)
    if tokenizer is None:
        raise ValueError(f"base: {recipe.base} has no tokenizer")
    if is_quantized(model):
        raise ValueError(f"base: {recipe.base} is quantised; align the full-precision model, then quantise "
                         "the result")
    if is_sparse_folder(recipe.base):  # trainable, unlike a quantised one, but its zeros do not stay zero
        warnings.warn(f"base: {recipe.base} is pruned ({sparsity_of(model):.0%} of its block weights are zero); "
                      "alignment trains every weight, so the aligned model is dense: prune it again afterwards "
                      "(heron compress prune) for a sparse one", stacklevel=2)
    with _out_dir(out):  # a run that fails before it writes anything leaves no folder that looks like one
        model.train()
        spec = recipe.data.task
        try:
            task = RepeatTask(target=spec.target, max_count=spec.max_count) if spec else None
        except ValueError as err:
            raise ValueError(f"data.task.{err}") from None
        energy = _EnergySoFar(meter)
        state = _resumable(method, recipe, resume, restart_other, energy)
        log = (out / METRICS_FILE).open("w", encoding="utf-8")
        log.writelines(json.dumps(row) + "\n" for row in state.rows)  # a resumed run's earlier steps

        def on_step(row: dict[str, Any]) -> None:
            meter.sample()  # RAPL counters wrap; read them every step
            log.write(json.dumps(row) + "\n")
            log.flush()

        try:
            trained = _METHODS[method](model, tokenizer, recipe, task, on_step, state)
        finally:
            log.close()
        rows = state.rows
        if method in ("ppo", "grpo"):
            _plot_reward_kl(rows, out / PLOT_FILE, method)
        # No tokens: the objectives do not count what they process, so no joules per token here.
        lineage = {"alignment": {"method": method, "base": str(resolve_checkpoint(recipe.base).resolve()),  # the step
                                 "recipe": recipe.model_dump(), "final": rows[-1] if rows else {},
                                 "energy": energy.report().to_dict()}}
        check_finite_weights(len(rows), trained.state_dict())  # the last update may have overflowed
        folder = save_model_folder(out / MODEL_DIR, trained, tokenizer=tokenizer, lineage=lineage)
        state.file.unlink(missing_ok=True)  # the finished model holds all there is
        _record_align(folder, lineage["alignment"])
        return folder


@contextmanager
def _out_dir(out: Path) -> Iterator[None]:
    """Make `out` (and its missing parents) for the run; if the run then fails before it has
    written anything (a data file refused, a reward model that cannot be read, a Ctrl-C before
    step 1), take away again what it made, so that no empty folder is left looking like a run:
    the metrics file, if this run made it and it is still empty, then each folder it made, deepest
    first, while it is empty. A folder that was there before, or that holds anything (a killed
    run's state.pt, to resume from), stays."""
    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    metrics_made = not (out / METRICS_FILE).exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        _remove_unwritten(out / METRICS_FILE if metrics_made else None, made)
        raise


def _remove_unwritten(metrics: Path | None, made: list[Path]) -> None:
    """Remove `metrics` if it is empty, then the `made` folders, deepest first, until one is not
    empty. Best effort: the run's own error is what the user must see, not one of these."""
    try:
        if metrics is not None and metrics.is_file() and metrics.stat().st_size == 0:
            metrics.unlink()
        for folder in made:
            folder.rmdir()  # refuses a folder that holds anything
    except OSError:
        pass


def _record_align(folder: Path, alignment: dict[str, Any]) -> None:
    """The model's audit record, its inputs named by what its lineage records (not by a rerun's
    recipe, which may name another base or data file); an input gone since is left out."""
    base, data = resolve_checkpoint(alignment["base"]), alignment["recipe"]["data"]["file"]
    inputs = {"base": base, "data": data}
    record_event("align", inputs={role: path for role, path in inputs.items() if path and Path(path).exists()},
                 outputs={"checkpoint": folder}, model_hash=model_hash(folder), parameters=alignment)


def record_finished_model(folder: Path) -> bool:
    """Write the audit record a finished run's model lacks, when a kill came between the model and
    its record (as train/loop.py's rerun of a finished run does); True when it was written.
    A record that wrote the folder as it is, or before documents were written into it, counts.
    A model/ folder whose lineage records no alignment is no run's model: nothing to write."""
    alignment = _recorded_alignment(folder)
    return alignment is not None and record_if_missing(folder, lambda model: _record_align(model, alignment))


def _recorded_alignment(folder: Path) -> dict[str, Any] | None:
    """The `alignment` section of the model's lineage.json; None when there is none to read."""
    try:
        lineage = json.loads((folder / LINEAGE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    alignment = lineage.get("alignment") if isinstance(lineage, dict) else None
    return alignment if isinstance(alignment, dict) and "base" in alignment and "recipe" in alignment else None


def _resumable(method: str, recipe: AlignRecipe, resume: bool, restart_other: bool,
               energy: _EnergySoFar) -> Resumable:
    """The run's saved state: what a killed run of the same method, settings and inputs left, or
    none; another run's is refused, or deleted (not resume, or restart_other)."""
    file = Path(recipe.out_dir) / STATE_FILE
    for leftover in filter(_unfinished_write, file.parent.iterdir()):
        if leftover.is_file():  # a model's temp folder is swept by save_model_folder when it next writes
            leftover.unlink()
    identity = _identity(method, recipe)
    if not resume:
        file.unlink(missing_ok=True)
    saved = read_state(file)
    if saved is not None:
        changed = "; ".join(filter(None, (setting_changes(key, saved["identity"].get(key), value)
                                          for key, value in identity.items())))
        if changed and restart_other:
            file.unlink()
            saved = None
        elif changed:
            raise ValueError(f"out_dir: {recipe.out_dir} holds a killed run this one cannot continue ({changed}); "
                             "choose another out_dir, or pass --no-resume (resume=False) to start over")
    return Resumable(file, recipe.save_every, identity, saved, extra={"energy": energy})


def _identity(method: str, recipe: AlignRecipe) -> dict[str, Any]:
    """What a saved state must match to be continued: the method, the settings (not where the
    run or its inputs lie: a moved run folder, or a base named by another path, is the same run)
    and what the inputs hold: the base's weights, the reward model's, the data file's bytes."""
    settings = recipe.model_dump(exclude={"save_every", "out_dir", "name", "base", "reward"})
    settings["data"].pop("file")
    data = recipe.data.file
    return {"method": method, "recipe": settings, "base_weights": weights_identity(recipe.base),
            "reward": recipe.reward if recipe.reward == "judge" else weights_identity(recipe.reward),
            "data_file": None if data is None else sha256_file(Path(data))}


def _unfinished_write(path: Path) -> bool:
    """What a write the run makes, killed midway, left: a temp file of the state or the plot
    (`write_file_atomic`'s), or a temp or trash folder of the model (`save_model_folder`'s)."""
    return any(is_partial_write(path, name) for name in (STATE_FILE, PLOT_FILE)) or is_leftover(path, MODEL_DIR)


class _EnergySoFar:
    """The run's energy: what the segments before a resume used, saved with the state, plus this one's."""

    def __init__(self, meter: EnergyMeter) -> None:
        self.meter, self.before = meter, None

    def report(self) -> EnergyReport:
        now = self.meter.read()
        return self.before + now if self.before is not None else now

    def state_dict(self) -> dict[str, Any]:
        return self.report().to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = EnergyReport.from_dict(state)


def _sft(model, tokenizer, recipe: AlignRecipe, task: RepeatTask | None, on_step: Callable,
         state: Resumable) -> torch.nn.Module:
    if task:
        chats = task.sft_chats(recipe.data.task.n, recipe.data.task.seed)
        names = [f"chat {i}" for i in range(1, len(chats) + 1)]
    else:  # a file's chats are named by file:line, where the user can find them
        lines = read_chat_jsonl(recipe.data.file)
        chats, names = [chat for _, chat in lines], [f"{recipe.data.file}:{number}" for number, _ in lines]
    if not chats:
        raise ValueError(f"data.file: {recipe.data.file} holds no chats")
    for name, chat in zip(names, chats):
        if chat[-1]["role"] != "assistant":
            raise ValueError(f"data.file: {name}: the chat does not end with an assistant reply")
        if len(chat) == 1:
            raise ValueError(f"data.file: {name}: the chat is an assistant reply alone; give the user (or system) "
                             "turn it answers before it")
    with _max_len_named():  # every assistant turn trained
        data = encode_chats(tokenizer, chats, recipe.data.max_len, describe=lambda i: names[i],
                            vocab_size=model.config.vocab_size)
    state.extra["buffers"] = ModuleBuffers(model)  # fit saves the parameters; a router's centre is a buffer
    fit(model.parameters(), sft_objective(model, data), len(data), recipe.fit_settings(), on_step, resume=state)
    return model


def _pairs(tokenizer, recipe: AlignRecipe, task: RepeatTask | None, vocab_size: int):
    if task:
        pairs, names = task.preference_pairs(recipe.data.task.n, recipe.data.task.seed), None
    else:
        lines = _jsonl_lines(recipe.data.file)
        pairs, names = [row for _, row in lines], [f"{recipe.data.file}:{number}" for number, _ in lines]
    with _max_len_named():
        return encode_pairs(tokenizer, pairs, recipe.data.max_len, names, vocab_size)


@contextmanager
def _max_len_named() -> Iterator[None]:
    """A row over the recipe's max_len, named as the recipe field to change."""
    try:
        yield
    except RowTooLong as err:
        raise ValueError(f"data.max_len: {err}; raise data.max_len or shorten the row") from None


def _rm(model, tokenizer, recipe: AlignRecipe, task: RepeatTask | None, on_step: Callable,
        state: Resumable) -> torch.nn.Module:
    chosen, rejected = _pairs(tokenizer, recipe, task, model.config.vocab_size)
    reward_model = with_scalar_head(model, seed=recipe.fit.seed).train()
    state.extra["buffers"] = ModuleBuffers(reward_model)
    fit(reward_model.parameters(), reward_objective(reward_model, chosen, rejected), len(chosen),
        recipe.fit_settings(), on_step, resume=state)
    return reward_model


def _dpo(model, tokenizer, recipe: AlignRecipe, task: RepeatTask | None, on_step: Callable,
         state: Resumable) -> torch.nn.Module:
    chosen, rejected = _pairs(tokenizer, recipe, task, model.config.vocab_size)
    p = recipe.preference
    reference = (cached_reference_logprobs(model, chosen, rejected, Path(recipe.out_dir) / CACHE_DIR)
                 if p.loss in NEEDS_REFERENCE else None)
    policy = model.train()
    state.extra["buffers"] = ModuleBuffers(policy)
    loss_args = {"gamma": p.gamma} if p.gamma is not None else {}
    fit(policy.parameters(), preference_objective(policy, chosen, rejected, p.loss, beta=p.beta, reference=reference,
                                                  sft_weight=p.sft_weight, **loss_args), len(chosen),
        recipe.fit_settings(), on_step, resume=state)
    return policy


def _prompts(recipe: AlignRecipe, task: RepeatTask | None) -> list[Messages]:
    if task:
        return task.prompts(recipe.data.task.n, recipe.data.task.seed)
    return [as_messages(row["prompt"]) for row in _jsonl(recipe.data.file)]


def _reward(recipe: AlignRecipe, task: RepeatTask | None, tokenizer) -> Reward | RewardModel:
    if recipe.reward == "judge":
        if task is None:
            raise ValueError("reward: 'judge' needs data.task; give a reward-model checkpoint for data.file")
        return task.judge
    reward_model, reward_tokenizer = heron.load(recipe.reward)
    if reward_model.config.head != "scalar":
        raise ValueError(f"reward: {recipe.reward} is not a reward model (its head is {reward_model.config.head!r})")
    if reward_tokenizer is None or reward_tokenizer.fingerprint() != tokenizer.fingerprint():
        raise ValueError(f"reward: {recipe.reward} reads another tokenizer than the policy's {recipe.base}; it scores "
                         "the policy's own tokens, so train it from the same base (heron align rm)")
    return RewardModel(reward_model)


def _rollout_prompts(recipe: AlignRecipe, task: RepeatTask | None, tokenizer, method: str,
                     max_new_tokens: int, vocab_size: int) -> list[Messages]:
    """The prompts PPO or GRPO samples from, each within the policy's vocabulary. A reward model
    scores the rollout's rows, which must fit data.max_len, the rows it was trained on: the
    longest prompt and reply, end token included."""
    prompts, lengths = _prompts(recipe, task), []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.chat_prompt_ids(prompt)
        check_ids_fit(tokenizer, ids, vocab_size, f"data: prompt {i + 1}")
        lengths.append(len(ids))
    if recipe.reward == "judge":  # the judge reads text: no row length to respect
        return prompts
    longest = max(lengths)
    if longest + max_new_tokens + 1 > recipe.data.max_len:
        raise ValueError(f"data.max_len: {recipe.data.max_len} is less than the longest prompt ({longest} tokens) "
                         f"plus {method}.max_new_tokens ({max_new_tokens}) and the reply's end token")
    return prompts


def _ppo(model, tokenizer, recipe: AlignRecipe, task: RepeatTask | None, on_step: Callable,
         state: Resumable) -> torch.nn.Module:
    settings = recipe.ppo_settings()
    prompts = _rollout_prompts(recipe, task, tokenizer, "ppo", settings.max_new_tokens, model.config.vocab_size)
    reference = copy.deepcopy(model).eval()
    value_model = with_scalar_head(model, seed=settings.seed)  # seeded: reruns agree
    ppo(model, value_model, reference, tokenizer, prompts, _reward(recipe, task, tokenizer), settings, on_step, state)
    return model


def _grpo(model, tokenizer, recipe: AlignRecipe, task: RepeatTask | None, on_step: Callable,
          state: Resumable) -> torch.nn.Module:
    settings = recipe.grpo_settings()
    prompts = _rollout_prompts(recipe, task, tokenizer, "grpo", settings.max_new_tokens, model.config.vocab_size)
    reference = copy.deepcopy(model).eval()
    grpo(model, reference, tokenizer, prompts, _reward(recipe, task, tokenizer), settings, on_step, state)
    return model


_METHODS = {"sft": _sft, "rm": _rm, "dpo": _dpo, "ppo": _ppo, "grpo": _grpo}
# recipe.py's METHODS is the list that is checked and shown (run_alignment, recipes): the same, in order.
assert tuple(_METHODS) == METHODS, f"align methods: run.py has {tuple(_METHODS)}, recipe.py {METHODS}"


def _jsonl(path: str) -> list[dict[str, Any]]:
    return [row for _, row in _jsonl_lines(path)]


def _jsonl_lines(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each line of a JSONL file that is not blank."""
    rows = read_jsonl_objects(path)
    if not rows:
        raise ValueError(f"data.file: {path} holds no rows")
    return rows


def _plot_reward_kl(rows: list[dict[str, Any]], file: Path, method: str) -> None:
    fig, ax = new_figure(figsize=(6, 4))
    ax.plot([r["kl"] for r in rows], [r["reward"] for r in rows], marker="o", markersize=2, linewidth=0.8)
    ax.set(xlabel="KL to the reference (training rollouts)", ylabel="mean reward", title=f"{method}: reward against KL")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, file, dpi=90)


__all__ = ["record_finished_model", "run_alignment"]
