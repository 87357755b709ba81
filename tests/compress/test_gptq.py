"""GPTQ: a known answer (identity Hessian is round-to-nearest), and lower
output error than round-to-nearest where inputs are correlated."""
from __future__ import annotations

import pytest
import torch

from heron.compress.gptq import HessianAccumulator, gptq_quantize, inverse_cholesky_upper
from heron.compress.schemes import Int4Grouped, Int8PerChannel, Scheme, quantize_rtn

SCHEMES = [Int8PerChannel(), Int4Grouped(group_size=16), Int4Grouped(group_size=16, symmetric=True)]


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """(n, k) rows with strongly correlated, unevenly scaled features, like hidden states."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return (torch.randn(n, k, generator=g) * torch.linspace(0.2, 3.0, k)) @ mix


def output_error(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, params, scheme: Scheme) -> float:
    return float((x @ w.T - x @ scheme.dequantize(codes, params).T).norm())


def test_hessian_is_twice_the_mean_outer_product_over_any_batching() -> None:
    x = torch.randn(37, 6)
    acc = HessianAccumulator(6)
    for part in x.split([0, 5, 0, 20, 12]):  # an empty batch first and between: no change
        acc.add(part.reshape(1, -1, 6))
    assert acc.rows == 37
    torch.testing.assert_close(acc.H, 2 * x.T @ x / 37, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name + ("-symmetric" if getattr(s, "symmetric", False) else ""))
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_gives_round_to_nearest_exactly(scheme: Scheme, act_order: bool) -> None:
    """With H = I no error is propagated to other columns (Hinv is diagonal)."""
    torch.manual_seed(0)
    w = torch.randn(24, 64) * 0.1
    codes, params = gptq_quantize(w, torch.eye(64), scheme, block_size=32, act_order=act_order)
    rtn_codes, rtn_params = quantize_rtn(w, scheme)
    assert torch.equal(codes, rtn_codes)
    assert torch.equal(params.scale, rtn_params.scale)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name + ("-symmetric" if getattr(s, "symmetric", False) else ""))
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(scheme: Scheme, act_order: bool) -> None:
    torch.manual_seed(1)
    w = torch.randn(32, 64) * 0.1
    x = correlated_inputs(512, 64, seed=2)
    acc = HessianAccumulator(64)
    acc.add(x)
    codes, params = gptq_quantize(w, acc.H, scheme, block_size=32, act_order=act_order)
    rtn = output_error(x, w, *quantize_rtn(w, scheme), scheme)
    gptq = output_error(x, w, codes, params, scheme)
    assert gptq < 0.85 * rtn
    # still a valid tensor of the format: codes in range, parameters in shape, packable
    assert codes.dtype == scheme.code_dtype and codes.shape == w.shape
    low, high = (-127, 127) if scheme.name == "int8" else (0, 15)
    assert int(codes.min()) >= low and int(codes.max()) <= high
    packed = scheme.pack(codes, params)
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == scheme.packed_specs(32, 64)
    back_codes, back_params = scheme.unpack(packed)
    assert torch.equal(scheme.dequantize(back_codes, back_params), scheme.dequantize(codes, params))


def test_dead_inputs_get_zero_weights_and_no_nans() -> None:
    torch.manual_seed(3)
    w = torch.randn(16, 32) * 0.1
    x = correlated_inputs(256, 32, seed=4)
    x[:, 5] = 0  # never active in calibration
    acc = HessianAccumulator(32)
    acc.add(x)
    scheme = Int4Grouped(group_size=8)
    codes, params = gptq_quantize(w, acc.H, scheme)
    w_hat = scheme.dequantize(codes, params)
    assert torch.isfinite(w_hat).all()
    assert torch.all(w_hat[:, 5] == 0)


def test_groups_larger_than_the_block_and_mid_block_groups_both_work() -> None:
    torch.manual_seed(5)
    w = torch.randn(16, 64) * 0.1
    x = correlated_inputs(256, 64, seed=6)
    acc = HessianAccumulator(64)
    acc.add(x)
    for group, block in [(32, 8), (8, 32)]:
        scheme = Int4Grouped(group_size=group)
        codes, params = gptq_quantize(w, acc.H, scheme, block_size=block)
        assert params.scale.shape == (16, 64 // group)
        assert output_error(x, w, codes, params, scheme) < output_error(x, w, *quantize_rtn(w, scheme), scheme)


def test_a_group_size_that_does_not_divide_fails_naming_it() -> None:
    with pytest.raises(ValueError, match="group_size: 16 does not divide the 40 input features"):
        gptq_quantize(torch.randn(4, 40), torch.eye(40), Int4Grouped(group_size=16))


def test_no_dampening_on_a_singular_hessian_still_finds_one() -> None:
    """percdamp 0 is allowed; a singular Hessian (two equal input columns) then needs some
    dampening, which grows from a floor: tenfold growth from 0 stays 0."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    x[:, 1] = x[:, 0]
    H = 2 * x.T @ x / 4
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    codes, params = gptq_quantize(w, H, Int8PerChannel(), percdamp=0.0)
    assert codes.shape == w.shape and torch.isfinite(params.scale).all()
    # Undamped, H does not factor; the first retry adds the floor 1e-6 * mean(diag H). In float32, with
    # H + d I this ill-conditioned, U matches the float64 factor for that d to a few per cent; the next
    # tenfold step would be off by more than its whole size.
    assert torch.linalg.cholesky_ex(H).info != 0
    U = inverse_cholesky_upper(H, 0.0).double()

    def upper_factor(damp: float) -> torch.Tensor:
        return torch.linalg.cholesky(torch.linalg.inv(H.double() + damp * torch.eye(16, dtype=torch.float64)),
                                     upper=True)

    floor = 1e-6 * float(torch.diag(H).mean())
    for damp, close in ((floor, True), (10 * floor, False)):
        expected = upper_factor(damp)
        assert bool((U - expected).abs().max() < 0.1 * expected.abs().max()) == close, damp


def test_dampening_is_percdamp_times_the_mean_diagonal() -> None:
    """H = 100 I (K = 4), percdamp 0.01: damp = 0.01 * 100 = 1, so U, the upper factor of
    (H + I)^-1 = I / 101, is I / sqrt(101)."""
    U = inverse_cholesky_upper(100 * torch.eye(4), 0.01)
    torch.testing.assert_close(U, torch.eye(4) / 101**0.5, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name + ("-symmetric" if getattr(s, "symmetric", False) else ""))
def test_lazy_block_updates_equal_one_block(scheme: Scheme) -> None:
    """The lazy batch update is an exact reformulation (GPTQ, sec. 3, step 2): blocks of 8 columns
    (a group of 16 for the grouped schemes) give the codes of one block of 64."""
    torch.manual_seed(1)
    w = torch.randn(32, 64) * 0.1
    acc = HessianAccumulator(64)
    acc.add(correlated_inputs(512, 64, seed=2))
    small, small_params = gptq_quantize(w, acc.H, scheme, block_size=8)
    whole, whole_params = gptq_quantize(w, acc.H, scheme, block_size=64)
    assert torch.equal(small, whole)
    torch.testing.assert_close(small_params.scale, whole_params.scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name + ("-symmetric" if getattr(s, "symmetric", False) else ""))
@pytest.mark.parametrize("act_order", [False, True])
def test_a_pruned_weight_stays_pruned_and_gptq_still_beats_round_to_nearest(scheme: Scheme, act_order: bool) -> None:
    """A 2:4-pruned weight: its zeros dequantise to exactly 0 (the error feedback of other columns
    used to leave them nonzero, undoing the pruning), and the kept weights still take the error."""
    torch.manual_seed(3)
    w = torch.randn(32, 64) * 0.1
    smallest = w.abs().reshape(32, 16, 4).argsort(dim=-1)[..., :2]
    w = w.reshape(32, 16, 4).scatter(-1, smallest, 0.0).reshape(32, 64)  # 2:4, as a pruned checkpoint holds it
    x = correlated_inputs(512, 64, seed=4)
    acc = HessianAccumulator(64)
    acc.add(x)
    codes, params = gptq_quantize(w, acc.H, scheme, block_size=32, act_order=act_order)
    assert bool((scheme.dequantize(codes, params)[w == 0] == 0).all())  # (kept ones may round to 0 too)
    assert output_error(x, w, codes, params, scheme) < output_error(x, w, *quantize_rtn(w, scheme), scheme)
