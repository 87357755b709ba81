"""AWQ: scaling salient input channels lowers the output error of rounding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heron.compress.awq import awq_quantize
from heron.compress.qlinear import QuantLinear
from heron.compress.schemes import Int4Grouped, Int8PerChannel, quantize_rtn


def salient_inputs(n: int, k: int, channels: list[int], seed: int) -> torch.Tensor:
    """(n, k) activations where a few channels are 20x larger than the rest."""
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    x[:, channels] *= 20
    return x


@pytest.mark.parametrize("scheme", [Int4Grouped(group_size=32), Int8PerChannel()], ids=lambda s: s.name)
def test_awq_beats_round_to_nearest_with_salient_channels(scheme) -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    x = salient_inputs(512, 128, [3, 40, 77, 100], seed=1)
    result = awq_quantize(w, x, scheme, grid=20)
    rtn_codes, rtn_params = quantize_rtn(w, scheme)
    rtn_error = float((F.linear(x, scheme.dequantize(rtn_codes, rtn_params)) - F.linear(x, w)).pow(2).mean())
    assert result.rtn_error == pytest.approx(rtn_error, rel=1e-6)  # α = 0 is round-to-nearest
    assert result.alpha > 0 and result.input_scale is not None
    assert result.error < 0.8 * result.rtn_error
    # the layer built from the result reproduces the error the search measured (exact kernel)
    layer = QuantLinear.from_codes(result.codes, result.params, scheme, input_scale=result.input_scale,
                                   kernel="dequant")
    with torch.inference_mode():
        error = float((layer(x) - F.linear(x, w)).pow(2).mean())
    assert error == pytest.approx(result.error, rel=1e-3)


def test_without_salient_channels_awq_is_never_worse_than_rtn() -> None:
    torch.manual_seed(2)
    w = torch.randn(16, 64) * 0.05
    x = torch.randn(256, 64)
    result = awq_quantize(w, x, Int4Grouped(group_size=16), grid=5)
    assert result.error <= result.rtn_error
    if result.alpha == 0:
        assert result.input_scale is None


def test_grid_needs_two_points() -> None:
    with pytest.raises(ValueError, match="grid"):
        awq_quantize(torch.randn(4, 8), torch.randn(10, 8), Int8PerChannel(), grid=1)


@pytest.mark.parametrize("scheme", [Int4Grouped(group_size=16), Int8PerChannel()], ids=lambda s: s.name)
def test_a_grid_of_two_tries_alpha_0_and_1_and_1_wins_on_one_loud_channel_of_small_weights(scheme) -> None:
    """Inputs of |x| = 1 but channel 5 at 100, whose weights are 100x smaller than the rest: their
    rounding error, times 100, dominates RTN. α = 1 gives s = mean|x| / sqrt(100 * 1), i.e. 0.1 and 10,
    and divides that error by the largest s the grid allows; grid 2 is exactly the points 0 and 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (256, 64), generator=g).float() * 2 - 1  # (n, K) signs: mean |x| exactly 1
    x[:, 5] *= 100
    w = torch.randn(16, 64, generator=g) * 0.05
    w[:, 5] *= 0.01
    result = awq_quantize(w, x, scheme, grid=2)
    assert result.alpha == 1.0 and result.error < 0.5 * result.rtn_error
    expected = torch.full((64,), 10.0)  # 1 / s
    expected[5] = 0.1
    torch.testing.assert_close(result.input_scale, expected, rtol=1e-6, atol=0)
