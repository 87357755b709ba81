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
