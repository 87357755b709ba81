"""Figures for reports, drawn and written as PNG without touching the user's matplotlib.

`matplotlib.use("Agg")` and pyplot change process-wide state: in a notebook,
importing or calling a library that does so switches the notebook's backend.
A `Figure` given its own Agg canvas needs neither (matplotlib's "embedding"
pattern, https://matplotlib.org/stable/gallery/user_interfaces/web_application_server_sgskip.html),
and it is freed like any object once unreferenced, so there is nothing to close.

    fig, ax = new_figure(figsize=(6, 4))
    ax.plot(xs, ys)
    save_png(fig, "out/curve.png", dpi=100)

Imports matplotlib and nothing model-specific, so every layer may draw with it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from heron.store.atomic import write_file_atomic


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **subplots: Any) -> tuple[Figure, Any]:
    """(figure, axes) as `pyplot.subplots` returns them (one Axes, or an array of them),
    on an Agg canvas of the figure's own: no global backend, no pyplot figure registry."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **subplots)


def save_png(fig: Figure, path: str | Path, *, dpi: int) -> Path:
    """Write `fig` to `path` as PNG, atomically (its folder made if missing); returns the path."""
    return write_file_atomic(Path(path), lambda file: fig.savefig(file, format="png", dpi=dpi))


__all__ = ["new_figure", "save_png"]
