"""Weight formats against slow, obviously correct element-by-element loops:
codes, parameters and packed bytes must match bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from heron.compress.schemes import FP16_MAX, FP16_TINY, Int4Grouped, Int8PerChannel, get_scheme, quantize_rtn

F32 = torch.float32


def f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F32)


def fp16_up(value: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 >= value, stepped with numpy's own nextafter, in [2^-24, 65504]."""
    h = np.float16(float(value))
    if float(h) < float(value):
        h = np.nextafter(h, np.float16(np.inf))
    return f32(float(h)).clamp(FP16_TINY, FP16_MAX)


def reference_int8(w: torch.Tensor) -> tuple[list[list[int]], list[float]]:
    """Row by row: s = max|w| / 127 (1 for a zero row), code = clamp(round(w / s), -127, 127)."""
    codes, scales = [], []
    for row in w:
        absmax = max(abs(float(v)) for v in row)
        s = f32(absmax) / 127 if absmax > 0 else f32(1.0)
        codes.append([int(torch.round(v / s).clamp(-127, 127)) for v in row])
        scales.append(float(s))
    return codes, scales


def reference_int4(w: torch.Tensor, g: int) -> tuple[list[list[int]], list[list[float]], list[list[int]]]:
    """Group by group: range [min(w, 0), max(w, 0)], scale (hi - lo) / 15 rounded up to fp16, zero round(-lo / s)."""
    codes, scales, zeros = [], [], []
    for row in w:
        row_codes, row_scales, row_zeros = [], [], []
        for start in range(0, len(row), g):
            group = [float(v) for v in row[start:start + g]]
            lo, hi = f32(min(min(group), 0.0)), f32(max(max(group), 0.0))
            if hi > lo:
                s = fp16_up((hi - lo) / 15)
            else:
                s = f32(1.0)
            z = int(torch.round(-lo / s).clamp(0, 15))
            row_codes += [int((torch.round(f32(v) / s) + z).clamp(0, 15)) for v in group]
            row_scales.append(float(s))
            row_zeros.append(z)
        codes.append(row_codes)
        scales.append(row_scales)
        zeros.append(row_zeros)
    return codes, scales, zeros


def reference_int4_symmetric(w: torch.Tensor, g: int) -> tuple[list[list[int]], list[list[float]]]:
    """llama.cpp's Q4_0 grid, group by group: m the value of largest |w|,
    scale m / -8 with |s| rounded up to fp16 (1 for a zero group), code = clamp(round(w / s) + 8, 0, 15)."""
    codes, scales = [], []
    for row in w:
        row_codes, row_scales = [], []
        for start in range(0, len(row), g):
            group = [f32(float(v)) for v in row[start:start + g]]
            m = max(group, key=lambda v: abs(float(v)))
            s = -fp16_up(m.abs() / 8) * m.sign() if m != 0 else f32(1.0)
            row_codes += [int((torch.round(v / s) + 8).clamp(0, 15)) for v in group]
            row_scales.append(float(s))
        codes.append(row_codes)
        scales.append(row_scales)
    return codes, scales


def awkward_matrix(n: int, k: int, seed: int) -> torch.Tensor:
    """Random rows plus the edge cases: a zero row, an all-positive and an all-negative row."""
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    w[0] = 0
    w[1] = w[1].abs()
    w[2] = -w[2].abs()
    return w


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_codes_and_scales_match_the_reference_bit_for_bit(seed: int) -> None:
    w = awkward_matrix(7, 24, seed)
    scheme = Int8PerChannel()
    codes, params = quantize_rtn(w, scheme)
    ref_codes, ref_scales = reference_int8(w)
    assert codes.dtype == torch.int8
    assert codes.tolist() == ref_codes
    assert params.scale[:, 0].tolist() == ref_scales
    w_hat = scheme.dequantize(codes, params)
    assert torch.equal(w_hat, torch.tensor(ref_codes, dtype=F32) * torch.tensor(ref_scales)[:, None])
    assert torch.all((w - w_hat).abs() <= params.scale / 2 + 1e-9)


@pytest.mark.parametrize(("group", "seed"), [(8, 0), (6, 1), (24, 2)])
def test_int4_codes_scales_and_zeros_match_the_reference_bit_for_bit(group: int, seed: int) -> None:
    w = awkward_matrix(6, 24, seed)
    scheme = Int4Grouped(group_size=group)
    codes, params = quantize_rtn(w, scheme)
    ref_codes, ref_scales, ref_zeros = reference_int4(w, group)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == ref_codes
    assert params.scale.tolist() == ref_scales
    assert params.zero.tolist() == ref_zeros
    w_hat = scheme.dequantize(codes, params)
    expected = [[(c - ref_zeros[n][k // group]) * ref_scales[n][k // group] for k, c in enumerate(row)]
                for n, row in enumerate(ref_codes)]
    assert torch.equal(w_hat, torch.tensor(expected, dtype=F32))
    assert torch.all(w_hat[0] == 0)  # a zero row stays exactly zero
    step = params.scale.repeat_interleave(group, dim=1)
    assert torch.all((w - w_hat).abs() <= step / 2 + 1e-7)


@pytest.mark.parametrize(("group", "seed"), [(8, 0), (24, 2)])
def test_symmetric_int4_is_llama_cpp_q4_0s_grid(group: int, seed: int) -> None:
    w = awkward_matrix(6, 24, seed)
    scheme = Int4Grouped(group_size=group, symmetric=True)
    codes, params = quantize_rtn(w, scheme)
    ref_codes, ref_scales = reference_int4_symmetric(w, group)
    assert codes.tolist() == ref_codes
    assert params.scale.tolist() == ref_scales
    assert torch.all(params.zero == 8)
    assert (params.scale[1] < 0).all() and (params.scale[2] > 0).all()  # all-positive row: s < 0; all-negative: s > 0
    w_hat = scheme.dequantize(codes, params)
    assert torch.all(w_hat[0] == 0)
    step = params.scale.abs().repeat_interleave(group, dim=1)
    # Half a step, plus the largest weight's share of the scale's fp16 rounding (8 steps x 2^-11).
    assert torch.all((w - w_hat).abs() <= step * (0.5 + 8 * 2**-11) + 1e-7)
    assert get_scheme("int4", group, symmetric=True) == scheme
    assert scheme.describe() == {"scheme": "int4", "group_size": group, "symmetric": True}


def test_symmetric_int4_keeps_a_tiny_groups_scale_and_zero_code() -> None:
    """max|w| / -8 below fp16's smallest subnormal rounds to 0; the scale is floored at 2^-24
    with the weight's sign, so codes stay meaningful (a zero weight is code 8) and close."""
    scheme = Int4Grouped(group_size=4, symmetric=True)
    w = torch.tensor([[2e-7, -1e-7, 0.0, 6.7e-8]])
    codes, params = quantize_rtn(w, scheme)
    assert params.scale.item() == -(2.0 ** -24)
    assert codes.tolist() == [[5, 10, 8, 7]]  # round(w / scale) + 8
    assert torch.all((scheme.dequantize(codes, params) - w).abs() <= 2.0 ** -25)


@pytest.mark.parametrize(("symmetric", "weight", "scale", "codes"), [
    (False, 1.3e-6, 2.0**-23, [11, 0]),  # (hi - lo) / 15 = 1.45 x 2^-24: nearest fp16 2^-24 put 1.3e-6 at code 21
    (True, 7e-7, -(2.0**-23), [2, 8]),  # m / 8 = 1.47 x 2^-24: nearest fp16 2^-24 put 7e-7 at code -4
])
def test_a_tiny_groups_subnormal_scale_is_rounded_up_so_its_largest_weight_fits(
    symmetric: bool, weight: float, scale: float, codes: list[int]
) -> None:
    """fp16's subnormals are 2^-24 apart; a scale rounded down to one clipped the group's largest
    weight to the last code, a third of its value lost. Rounded up, it is within half a step."""
    scheme = Int4Grouped(group_size=2, symmetric=symmetric)
    w = torch.tensor([[weight, 0.0]])
    got_codes, params = quantize_rtn(w, scheme)
    assert params.scale.item() == scale and got_codes.tolist() == [codes]
    assert (scheme.dequantize(got_codes, params) - w).abs().max() <= 2.0**-24


@pytest.mark.parametrize("symmetric", [False, True])
def test_every_weight_of_tiny_groups_is_within_half_a_step(symmetric: bool) -> None:
    """Groups of range 1e-8 to 1e-3, where fp16 scales are subnormal or barely normal."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g) * torch.logspace(-8, -3, 64)[:, None]  # (N, K), one magnitude a row
    scheme = Int4Grouped(group_size=8, symmetric=symmetric)
    codes, params = quantize_rtn(w, scheme)
    w_hat = scheme.dequantize(codes, params)
    step = params.scale.abs().repeat_interleave(8, dim=1)
    # Q4_0's grid reaches m, not -m: weights on the far side of zero from m may clip by a step.
    m_side = w * -params.scale.sign().repeat_interleave(8, dim=1) >= 0 if symmetric else torch.ones_like(w) > 0
    assert torch.all(((w - w_hat).abs() <= step / 2)[m_side])


def test_int4_packs_two_codes_per_byte_low_nibble_first() -> None:
    w = awkward_matrix(4, 16, 3)
    scheme = Int4Grouped(group_size=8)
    codes, params = quantize_rtn(w, scheme)
    packed = scheme.pack(codes, params)
    expected = [[row[2 * j] | (row[2 * j + 1] << 4) for j in range(8)] for row in codes.tolist()]
    assert packed["qweight"].dtype == torch.uint8 and packed["qweight"].tolist() == expected
    assert packed["scale"].dtype == torch.float16 and torch.equal(packed["scale"].float(), params.scale)
    assert packed["zero"].dtype == torch.uint8
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == scheme.packed_specs(4, 16)


@pytest.mark.parametrize("scheme", [Int8PerChannel(), Int4Grouped(group_size=4),
                                    Int4Grouped(group_size=4, symmetric=True)])
def test_unpack_inverts_pack(scheme) -> None:
    w = awkward_matrix(5, 12, 4)
    codes, params = quantize_rtn(w, scheme)
    back_codes, back_params = scheme.unpack(scheme.pack(codes, params))
    assert torch.equal(back_codes, codes)
    assert torch.equal(scheme.dequantize(back_codes, back_params), scheme.dequantize(codes, params))


def test_parameters_of_one_column_quantise_it_as_the_whole_matrix_does() -> None:
    """GPTQ quantises column by column with its group's parameters."""
    w = awkward_matrix(5, 12, 5)
    scheme = Int4Grouped(group_size=4)
    codes, params = quantize_rtn(w, scheme)
    for j in range(12):
        column = scheme.quantize(w[:, j:j + 1], params.columns(j // 4, j // 4 + 1))
        assert torch.equal(column[:, 0], codes[:, j])


def test_bad_names_and_group_sizes_fail_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="scheme: unknown 'int3'"):
        get_scheme("int3")
    with pytest.raises(ValueError, match="group_size"):
        get_scheme("int4", 7)
    with pytest.raises(ValueError, match="group_size: 128 does not divide the 288 input features of blocks.0.attn.qkv"):
        get_scheme("int4", 128).check(64, 288, "blocks.0.attn.qkv")
    # every even divisor in range is offered, not only the round ones (48 works for 288 too)
    with pytest.raises(ValueError, match=r"from 16 to 256: \[16, 18, 24, 32, 36, 48, 72, 96, 144\]"):
        get_scheme("int4", 128).check(64, 288)
    assert get_scheme("int4").group_size == 128
