"""The efficiency report: variants made from one model, side by side.

For each checkpoint folder: size on disk (every file a user would copy to
run it: a training checkpoint's optimizer state is left out), validation perplexity, decode speed (batch 1, greedy, KV-cached; median
of rounds) and energy per decoded token with the meter's source. Written as
a Markdown table, a JSON file and a Pareto plot of perplexity against size
and against speed; the variants no other variant beats on both axes are
marked. A variant whose lineage does not lead back to the reference (the
first folder) is measured all the same, with a warning.

    heron compress report runs/small/ckpt runs/small-int8 runs/small-int4 --shards runs/data/stdlib --out report/
"""
from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import heron
from heron.data import ShardSet, check_shards_fit, check_val_scorable
from heron.generate import Decoder, SamplingParams, decode_steps, perplexity
from heron.govern import EnergyMeter, EnergyReport
from heron.govern.energy import provenance
from heron.govern.digest import CONFIG_FILE
from heron.govern.figures import new_figure, save_png
from heron.interop.convert import imported_from
from heron.store.atomic import is_partial_write
from heron.train.checkpoint import LINEAGE_FILE, STATE_FILE, CheckpointError, resolve_checkpoint

REPORT_MD, REPORT_JSON, PARETO_PNG = "report.md", "report.json", "pareto.png"
REPORT_FILES = (REPORT_MD, REPORT_JSON, PARETO_PNG)  # what a report folder holds; a new report replaces them


@dataclass(frozen=True)
class VariantRow:
    name: str
    path: str
    size_bytes: int
    size_ratio: float  # against the first (reference) variant
    perplexity: float
    decode_tokens_per_s: float
    joules_per_token: float
    energy_source: str  # where the joules come from
    energy_measured: bool  # False: estimated (see the source)


def checkpoint_bytes(folder: str | Path) -> int:
    """The checkpoint's own files, as copied to another disk to run the model: those
    directly in the folder, which are all a checkpoint holds and all heron.load reads.
    A nested folder (another checkpoint written inside this one) is not counted, nor
    is a training checkpoint's optimizer state (trainer_state.pt)."""
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.name != STATE_FILE]
    if not files:
        raise FileNotFoundError(f"{folder}: no checkpoint files here")
    return sum(p.stat().st_size for p in files)


def _lineage(folder: Path) -> dict:
    file = folder / LINEAGE_FILE
    if not file.is_file():
        return {}  # a Hugging Face folder, say: no record of where it came from
    return json.loads(file.read_text(encoding="utf-8"))


def _imported_from(lineage: dict) -> Path | None:
    source = imported_from(lineage)
    return None if source is None else Path(source)


def lineage_sources(folder: str | Path) -> list[Path]:
    """The models a checkpoint was made from, as its lineage records them: the
    source it was quantised or pruned from, the teacher it was distilled from,
    the Hugging Face folder it was imported from."""
    lineage = _lineage(resolve_checkpoint(folder))
    found = [lineage.get("quantized_from"), lineage.get("pruned_from"),
             lineage.get("distillation", {}).get("teacher"), _imported_from(lineage)]
    return [Path(source) for source in found if source]


def _resolved(folder: Path) -> Path | None:
    try:
        return resolve_checkpoint(folder).resolve()
    except CheckpointError:
        return None  # a source that holds no model any more: the chain ends there


def derives_from(variant: str | Path, reference: str | Path) -> bool:
    """Whether `variant` is `reference`, or its lineage leads back to it through
    any chain of quantising, pruning, distilling and importing (`lineage_sources`).
    An import is exact, so a variant made from a Hugging Face folder derives
    from a Heron checkpoint imported from that folder too."""
    targets: set[Path] = set()
    reference_side: Path | None = Path(reference)
    while reference_side is not None and (folder := _resolved(reference_side)) and folder not in targets:
        targets.add(folder)
        reference_side = _imported_from(_lineage(folder))
    seen: set[Path] = set()
    pending = [Path(variant)]
    while pending:
        folder = _resolved(pending.pop())
        if folder is None or folder in seen:
            continue
        if folder in targets:
            return True
        seen.add(folder)
        pending.extend(lineage_sources(folder))
    return False


@torch.inference_mode()
def decode_speed(model: torch.nn.Module, prompt: list[int], *, new_tokens: int = 64,
                 rounds: int = 3) -> tuple[float, EnergyReport]:
    """(median tokens/s, the energy report) of greedy batch-1 decoding."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    for _ in decode_steps(Decoder(model, [prompt], params), new_tokens):
        pass  # a whole untimed decode first: first-call allocations and kernel set-up stay out of the figures
    meter, speeds = EnergyMeter().start(), []
    for _ in range(rounds):
        started = time.perf_counter()
        decoder = Decoder(model, [prompt], params)
        for _ in decode_steps(decoder, new_tokens):
            pass
        speeds.append(new_tokens / (time.perf_counter() - started))
    return statistics.median(speeds), meter.stop(tokens=rounds * new_tokens)


def measure(folders: Sequence[str | Path], val_tokens: np.ndarray | ShardSet, *,
            names: Sequence[str] | None = None, seq_len: int = 128, batch_size: int = 8,
            max_batches: int | None = 16, new_tokens: int = 64, rounds: int = 3,
            baselines: Collection[str | Path] = ()) -> list[VariantRow]:
    """One row per checkpoint folder (named by `names`, else by the folder); the
    first is the reference for size ratios. `val_tokens` are the validation ids, or the
    shard set holding them, against whose tokenizer each model is then checked.

    A folder whose lineage does not lead back to the reference gets a warning (a
    report across unrelated models is usually a mistake), unless it is among
    `baselines`: folders of `folders` compared without being variants, such as a
    student trained from scratch beside a distilled one.

    Windows of `seq_len` and decoding of `new_tokens` are shortened to fit a
    model whose context is shorter (variants of one model share it).
    """
    if not folders:
        raise ValueError("folders: give at least one checkpoint folder")
    if names is None:  # folder names, or whole paths where two folders share a name (step_00001000 ...)
        names = [Path(f).name for f in folders]
        names = names if len(set(names)) == len(names) else [str(f) for f in folders]
    names = list(names)
    if len(names) != len(folders) or len(set(names)) != len(names):
        raise ValueError(f"names: need one distinct name per folder, got {names}")
    shards = val_tokens if isinstance(val_tokens, ShardSet) else None
    val_tokens = shards.val if shards is not None else val_tokens
    if shards is not None:  # before loading any model
        check_val_scorable(shards)
    elif len(val_tokens) < 2:
        raise ValueError(f"val_tokens: holds {len(val_tokens)} tokens; nothing to score")
    declared = {Path(b) for b in baselines}
    unknown = declared - {Path(f) for f in folders}
    if unknown:
        raise ValueError(f"baselines: {', '.join(sorted(map(str, unknown)))} not among the folders measured")
    prompt = [int(t) for t in val_tokens[:16]]
    for folder in folders[1:]:
        if Path(folder) not in declared and not derives_from(folder, folders[0]):
            warnings.warn(f"{folder}: its lineage (quantized_from, pruned_from, distillation teacher) does not lead "
                          f"back to the reference {folders[0]}: not a variant of it", stacklevel=2)
    rows: list[VariantRow] = []
    for name, folder in zip(names, folders):
        model, tokenizer = heron.load(folder)
        if shards is not None:
            check_shards_fit(shards, str(folder), vocab_size=model.config.vocab_size, tokenizer=tokenizer)
        size = checkpoint_bytes(resolve_checkpoint(folder))  # what heron.load read: a run's latest
        context = model.config.max_seq_len
        ppl = perplexity(model, val_tokens, seq_len=min(seq_len, context), batch_size=batch_size,
                         max_batches=max_batches)
        fitted_prompt = prompt[:context // 4]
        speed, energy = decode_speed(model, fitted_prompt, new_tokens=min(new_tokens, context - len(fitted_prompt)),
                                     rounds=rounds)
        rows.append(VariantRow(name, str(folder), size, size / (rows[0].size_bytes if rows else size),
                               ppl, speed, energy.joules_per_token, energy.source, energy.measured))
    return rows


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Whether each (cost, perplexity) point is beaten by no other on both (lower is better)."""
    return [not any(c2 <= c and p2 <= p and (c2, p2) != (c, p) for c2, p2 in points) for c, p in points]


def report_folder(out_dir: str | Path) -> Path:
    """`out_dir`, if a report may be written there: nothing there yet, an empty folder, or an
    earlier report's (its files are replaced); never a model's folder nor one holding other files.
    Cheap: call it before measuring, so that a refused folder costs nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: a file; the report goes in a folder")
    names = {p.name for p in out.iterdir()
             if not any(is_partial_write(p, name) for name in REPORT_FILES)} if out.is_dir() else set()
    model = [name for name in (LINEAGE_FILE, CONFIG_FILE) if name in names]
    if model:
        raise FileExistsError(f"{out}: holds a model ({model[0]}); write the report to a folder of its own")
    others = sorted(names - set(REPORT_FILES))
    if others:
        raise FileExistsError(f"{out}: holds {', '.join(others[:3])}, not a report's files; write the report to a "
                              "new or empty folder")
    if names and not _is_report(out / REPORT_JSON):
        raise FileExistsError(f"{out}: holds {', '.join(sorted(names))}, but not an earlier report's {REPORT_JSON}; "
                              "write the report to a new or empty folder")
    return out


_REPORT_KEYS = {"name", "path", "size_bytes", "perplexity"}  # what every report.json row has held


def _is_report(file: Path) -> bool:
    """Whether `file` is the report.json of an earlier report: a list of rows holding at least
    VariantRow's core fields (not all of them: a field added since must not refuse every older report)."""
    try:
        rows = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(rows, list) and bool(rows) and all(isinstance(r, dict) and _REPORT_KEYS <= r.keys() for r in rows)


def write_report(rows: Sequence[VariantRow], out_dir: str | Path) -> Path:
    """report.md, report.json and pareto.png under out_dir (see `report_folder`); returns the Markdown file."""
    out = report_folder(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reference = rows[0]
    lines = ["| variant | size (MB) | size ratio | perplexity | ppl change | decode tok/s | speed-up | J/token "
             "| energy source |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.size_bytes / 1e6:.2f} | {r.size_ratio:.3f} | {r.perplexity:.3f} "
                     f"| {100 * (r.perplexity / reference.perplexity - 1):+.2f}% | {r.decode_tokens_per_s:.1f} "
                     f"| {r.decode_tokens_per_s / reference.decode_tokens_per_s:.2f}x | {r.joules_per_token:.3f} "
                     f"| {provenance(r.energy_source, r.energy_measured)} |")
    (out / REPORT_MD).write_text("\n".join(lines) + f"\n\nReference: `{reference.path}`. Pareto plot: "
                                 f"`{PARETO_PNG}`.\n", encoding="utf-8")
    (out / REPORT_JSON).write_text(json.dumps([asdict(r) for r in rows], indent=2), encoding="utf-8")
    _plot(rows, out / PARETO_PNG)
    return out / REPORT_MD


def _plot(rows: Sequence[VariantRow], file: Path) -> None:
    fig, axes = new_figure(1, 2, figsize=(10, 4.2))
    panels = [(axes[0], [r.size_bytes / 1e6 for r in rows], "size on disk (MB)"),
              (axes[1], [1e3 / r.decode_tokens_per_s for r in rows], "decode time per token (ms, batch 1)")]
    for ax, costs, label in panels:
        ppl = [r.perplexity for r in rows]
        front = pareto_front(list(zip(costs, ppl)))
        ax.scatter(costs, ppl, c=["tab:blue" if f else "tab:gray" for f in front], zorder=3)
        for r, x, y in zip(rows, costs, ppl):
            ax.annotate(f"{r.name}\n{r.joules_per_token:.2f} J/tok", (x, y), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.set(xlabel=label, ylabel="validation perplexity")
        ax.grid(alpha=0.3)
    fig.suptitle("Variants of one model: blue = on the Pareto front (no variant smaller/faster and better)")
    fig.tight_layout()
    save_png(fig, file, dpi=90)


__all__ = ["VariantRow", "checkpoint_bytes", "decode_speed", "derives_from", "lineage_sources", "measure",
           "pareto_front", "report_folder", "write_report"]
