"""The alignment loop (`align.loop.fit`) on a tiny objective with a known answer."""
import pytest
import torch

from heron.align.loop import FLOAT32_MAX, FitSettings, fit
from heron.train.loop import DivergedError


def test_a_diverging_fit_stops_before_its_update_reaches_the_weights():
    """lr 1e30: step 1's AdamW update (about lr * sign(grad)) makes the weights ~1e30, finite, and
    step 2's loss y^4 and its gradient 4 y^3 x overflow fp32. The run stops before step 2's update,
    so the weights stay as step 1 left them; clipping an infinite gradient (inf * 0) would give NaN,
    and AdamW would write it into every weight."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    x = torch.randn(8, 4)  # (N, 4)

    def objective(rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return layer(x[rows]).squeeze(1) ** 4, {}  # (b,)

    rows = []
    with pytest.raises(DivergedError, match=r"step 2: the (training loss|gradient norm) is (nan|inf)"):
        fit(layer.parameters(), objective, len(x), FitSettings(steps=3, batch_size=8, lr=1e30, progress=False),
            on_step=rows.append)
    assert [row["step"] for row in rows] == [1]
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert layer.weight.abs().min() > 1e29  # step 1's update did happen


def test_a_learning_rate_adamw_cannot_step_in_fp32_is_refused_naming_the_field():
    """torch's AdamW scales step 1 by lr / (1 - beta1): with beta1 0.9, lr 1e39 (or anything above
    float32's largest / 10) made it fail inside the step with "value cannot be converted to type float
    without overflow", naming nothing. The settings refuse it; the largest lr they take steps without
    that error, each weight moving by lr (step 1's Adam update is lr * sign(grad))."""
    with pytest.raises(ValueError, match=r"^lr: must be at most 3\.40282e\+37, got 1e\+39: "):
        FitSettings(steps=1, batch_size=2, lr=1e39)
    with pytest.raises(ValueError, match=r"^lr: must be at most 3\.40282e\+35, got 1e\+37"):
        FitSettings(steps=1, batch_size=2, lr=1e37, weight_decay=1000.0)  # 1 - lr * weight_decay overflows
    weight = torch.nn.Parameter(torch.zeros(2))
    largest = FLOAT32_MAX * (1 - 0.9)
    fit([weight], lambda rows: (weight.sum().expand(len(rows)), {}), 2,
        FitSettings(steps=1, batch_size=2, lr=largest, progress=False))
    assert torch.isfinite(weight).all() and weight.detach().tolist() == pytest.approx([-largest] * 2, rel=1e-6)
