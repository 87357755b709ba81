"""What a run leaves for people to read: metrics.jsonl and a loss-curve PNG."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from heron.govern.digest import METRICS_FILE
from heron.store.atomic import write_text_atomic

PLOT_FILE = "loss.png"


def append_metrics(out_dir: Path, row: dict[str, Any]) -> None:
    """Add one JSON line. A crash mid-write can leave a torn last line; resuming
    rewrites the file from the checkpoint's history (`write_metrics`)."""
    with open(out_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def write_metrics(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    write_text_atomic(out_dir / METRICS_FILE, text)


TIMING_FIELDS = ("tokens_per_s",)  # measured, so in metrics.jsonl but not in the (reproducible) history


def logged_timings(out_dir: Path) -> dict[int, dict[str, Any]]:
    """{step: its timing fields} from the metrics file as it is, a torn last line skipped:
    what rewriting the file from a checkpoint's history must carry over."""
    file = Path(out_dir) / METRICS_FILE
    timings: dict[int, dict[str, Any]] = {}
    for line in file.read_text().splitlines() if file.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            timings[row["step"]] = {k: row[k] for k in TIMING_FIELDS if k in row}
    return timings


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    file = Path(out_dir) / METRICS_FILE
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.exists() else []


def plot_losses(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train loss per step and validation loss where measured, on one axis."""
    from heron.govern.figures import new_figure, save_png  # here: importing the training loop need not load matplotlib

    fig, ax = new_figure(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train", linewidth=1)
    val = [r for r in history if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path, dpi=100)


__all__ = ["PLOT_FILE", "append_metrics", "plot_losses", "read_metrics", "write_metrics"]
