"""The report's figures, one function each, written as PNG files (`govern.figures`: no pyplot).

Each takes plain tensors and labels and returns the path it wrote, so a
figure can be remade from numbers alone. Token labels are shown as repr-like
text (spaces and newlines visible) since the tokens of code are mostly those.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from heron.govern.figures import new_figure, save_png


def token_label(text: str) -> str:
    """A token's text with whitespace made visible ('·' a space, '⏎' a newline, '⇥' a tab) and
    other unprintable characters escaped (\\x1a), which fonts have no glyph for."""
    visible = text.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in visible) or "∅"


def _save(fig: Figure, path: str | Path) -> Path:
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def heatmap(values: torch.Tensor, path: str | Path, *, rows: Sequence[str], columns: Sequence[str], title: str,
            label: str, cells: Sequence[Sequence[str]] | None = None, diverging: bool = False) -> Path:
    """A (rows, columns) grid of values with a colour bar; `cells` writes text into each square."""
    values = values.detach().float().cpu()
    fig, ax = new_figure(figsize=(min(2 + 0.7 * len(columns), 18), min(1.5 + 0.42 * len(rows), 14)))
    limit = float(values.abs().max()) or 1.0
    image = ax.imshow(values.numpy(), aspect="auto", cmap="RdBu" if diverging else "viridis",
                      vmin=-limit if diverging else None, vmax=limit if diverging else None)
    ax.set_xticks(range(len(columns)), [token_label(c) for c in columns], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    if cells is not None:
        for i, row in enumerate(cells):
            for j, text in enumerate(row):
                ax.text(j, i, token_label(text)[:8], ha="center", va="center", fontsize=6, color="white")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    return _save(fig, path)


def bars(values: torch.Tensor, labels: Sequence[str], path: str | Path, *, title: str, xlabel: str) -> Path:
    """Horizontal bars, positive and negative in two colours, in the order given."""
    values = values.detach().float().cpu()
    fig, ax = new_figure(figsize=(7, 1 + 0.28 * len(labels)))
    ax.barh(range(len(labels)), values.numpy(), color=["#2a7ab9" if v >= 0 else "#c8553d" for v in values.tolist()])
    ax.set_yticks(range(len(labels)), [token_label(label) for label in labels], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="#555", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _save(fig, path)


__all__ = ["bars", "heatmap", "token_label"]
