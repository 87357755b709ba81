"""Figures (govern/figures.py): Heron draws PNGs without switching the user's
matplotlib backend, neither when its modules are imported nor when it plots,
and without pyplot's global figure registry."""
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib
import pytest
import torch

from heron.govern.figures import new_figure, save_png
from heron.interpret.heads import plot_attention
from heron.interpret.plots import bars, heatmap
from heron.interpret.routing import RoutingReport, plot_load
from heron.train.report import plot_losses

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def svg_backend():
    """The user's session as a notebook might have it: a backend other than Agg."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(before)


def test_new_figure_gives_axes_as_pyplot_subplots_does(tmp_path):
    fig, ax = new_figure(figsize=(3, 2))
    assert hasattr(ax, "plot") and tuple(fig.get_size_inches()) == (3, 2)
    fig, axes = new_figure(1, 2, figsize=(4, 2))
    assert axes.shape == (2,)
    fig, axes = new_figure(1, 1, figsize=(4, 2), squeeze=False)
    assert axes.shape == (1, 1)
    path = save_png(fig, tmp_path / "new" / "folder" / "f.png", dpi=50)
    assert path.read_bytes().startswith(PNG_SIGNATURE)


PLOTS = {
    "train loss curve": lambda out: plot_losses(
        [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "val_loss": 2.7}], out / "loss.png", title="t"),
    "interpret heatmap": lambda out: heatmap(
        torch.randn(2, 3), out / "heat.png", rows=["a", "b"], columns=["x", " y", "\n"], title="t", label="v",
        cells=[["p", "q", "r"], ["s", "t", "u"]], diverging=True),
    "interpret bars": lambda out: bars(torch.tensor([0.5, -0.2]), ["a", "b"], out / "bars.png", title="t",
                                       xlabel="x"),
    "attention pattern": lambda out: plot_attention(
        torch.softmax(torch.randn(3, 4, 4), dim=-1), out / "attn.png", tokens=list("abcd"), title="t"),
    "expert load": lambda out: plot_load(
        RoutingReport([1], torch.tensor([[3, 1]]), torch.zeros(1, 5, 2, dtype=torch.long), 2), out / "load.png"),
}


@pytest.mark.parametrize("name", PLOTS)
def test_plotting_keeps_the_users_backend(name, svg_backend, tmp_path):
    path = Path(PLOTS[name](tmp_path))
    assert matplotlib.get_backend() == "svg"
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_importing_and_plotting_keep_the_backend_and_leave_pyplot_alone(tmp_path):
    """In a fresh interpreter, as in a notebook that imports Heron after choosing its backend."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import matplotlib
        matplotlib.use("svg")
        import heron.align.run, heron.compress.report, heron.interpret, heron.train.loop
        imported = matplotlib.get_backend()
        from heron.train.report import plot_losses
        plot_losses([{{"step": 1, "loss": 3.0}}], Path({str(tmp_path / "loss.png")!r}))
        print(imported, matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "svg", "False"]  # backend after import, after plotting; pyplot loaded
    assert (tmp_path / "loss.png").stat().st_size > 0
