"""QuantLinear and QuantEmbedding: every kernel computes x @ Ŵᵀ for the
dequantised weight Ŵ, at batch 1 and over many rows."""
from __future__ import annotations

import copy
import shutil
import sys

import pytest
import torch

import heron.compress
from heron.compress import kernels
from heron.compress.kernels import KERNELS, choose_kernel, default_kernels
from heron.compress.qlinear import QuantEmbedding, QuantLinear, set_kernel
from heron.compress.schemes import Int4Grouped, Int8PerChannel, quantize_rtn

# Relative error of each kernel against the float64 product with Ŵ (fp32 F.linear: ~2e-7).
# fp16 holds int8 codes exactly, but fp16(Ŵ) for int4 (rounding of at most 2^-11 per weight);
# dynamic quantises activations to 7 bits, as quantize_dynamic does.
TOLERANCE = {("aten", "int8"): 2e-6, ("aten", "int4"): 2e-6, ("fp16", "int8"): 2e-6, ("fp16", "int4"): 5e-4,
             ("fused", "int8"): 1e-6, ("fused", "int4"): 1e-6, ("dequant", "int8"): 1e-6, ("dequant", "int4"): 1e-6,
             ("dynamic", "int8"): 5e-2}
SCHEMES = [Int8PerChannel(), Int4Grouped(group_size=32), Int4Grouped(group_size=32, symmetric=True)]


def layer_for(scheme, kernel: str | None, *, bias: bool = False, input_scale: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(96, 128) * 0.05
    codes, params = quantize_rtn(w, scheme)
    b = torch.randn(96) if bias else None
    s = torch.rand(128) + 0.5 if input_scale else None
    layer = QuantLinear.from_codes(codes, params, scheme, bias=b, input_scale=s, kernel=kernel)
    reference = scheme.dequantize(codes, params).double()
    return layer, reference, b, s


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name + ("-symmetric" if getattr(s, "symmetric", False) else ""))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_each_kernel_computes_the_dequantised_product(scheme, kernel: str) -> None:
    if not KERNELS[kernel].supports(scheme, 96, 128):
        pytest.skip(f"{kernel} does not take {scheme.name}")
    layer, w, b, s = layer_for(scheme, kernel, bias=True, input_scale=True)
    assert layer.kernel == kernel
    for shape in [(1, 128), (1, 1, 128), (3, 5, 128), (2, 40, 128)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            y = layer(x)
        assert y.shape == (*shape[:-1], 96)
        ref = (x.double() * s.double()) @ w.T + b.double()
        assert relative_error(y, ref) < TOLERANCE[kernel, scheme.name], (kernel, shape)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "bias-and-input-scale"])
def test_each_kernel_takes_inputs_of_any_rank(kernel: str, extras: bool) -> None:
    """One row (K,), rows of rows and no rows: F.linear's shapes, whichever
    way the kernel is wrapped (a plain layer runs the bound op alone)."""
    layer, w, b, s = layer_for(Int8PerChannel(), kernel, bias=extras, input_scale=extras)
    with torch.inference_mode():
        for shape in [(128,), (2, 3, 1, 128), (0, 128)]:
            x = torch.randn(shape)
            y = layer(x)
            assert y.shape == (*shape[:-1], 96), (kernel, shape)
            if y.numel():
                ref = (x.double() * (s.double() if extras else 1)) @ w.T + (b.double() if extras else 0)
                assert relative_error(y, ref) < TOLERANCE[kernel, "int8"], (kernel, shape)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name + ("-symmetric" if getattr(s, "symmetric", False) else ""))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_each_kernel_takes_strided_inputs_as_f_linear_does(scheme, kernel: str) -> None:
    """A transposed view and every other row of a batch: aten's ops refused both
    ("A must be contiguous"), though a Linear takes them."""
    if not KERNELS[kernel].supports(scheme, 96, 128):
        pytest.skip(f"{kernel} does not take {scheme.name}")
    layer, w, _, _ = layer_for(scheme, kernel)
    for x in [torch.randn(128, 5).T, torch.randn(6, 128)[::2], torch.randn(4, 3, 128)[:, 1]]:
        assert not x.is_contiguous()
        with torch.inference_mode():
            y = layer(x)
        assert relative_error(y, x.double() @ w.T) < TOLERANCE[kernel, scheme.name], (kernel, x.stride())


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_the_decode_product_is_forward_bit_for_bit(kernel: str) -> None:
    """What a decoding step runs (core/token_step.py): the same numbers, with
    bias and input scale; other dtypes still take forward's reference path."""
    layer, _, _, _ = layer_for(Int8PerChannel(), kernel, bias=True, input_scale=True)
    product = layer.decode_product()
    with torch.inference_mode():
        for shape in [(1, 1, 128), (3, 1, 128)]:
            x = torch.randn(shape)
            assert torch.equal(product(x), layer(x))
        x64 = torch.randn(2, 1, 128, dtype=torch.float64)
        assert torch.equal(product(x64), layer(x64))


def test_fused_kernel_is_built_and_default_where_it_can_be() -> None:
    """setup.py builds it as an optional extension; with a C compiler on an
    AVX2 or AVX-512 machine, a missing module means the build broke. It is the
    default on both: torch's own weight-only kernels (aten) ran 9-60x slower
    than it on an AVX-512 CPU, where they were once preferred (kernels.py)."""
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")) or shutil.which("cc") is None:
        pytest.skip("no AVX2 or no C compiler: the fused kernel is not expected here")
    assert KERNELS["fused"].supports(Int8PerChannel(), 96, 128)
    for scheme in (Int8PerChannel(), Int4Grouped(group_size=128)):
        assert choose_kernel(scheme, 96, 128).name == "fused"


def test_a_missing_fused_kernel_is_said_not_silent(monkeypatch) -> None:
    """Where setup.py could not build it, quantised layers fall back, and say so."""
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        pytest.skip("the fused kernel is not looked for without AVX2")
    monkeypatch.setitem(sys.modules, "heron.compress._fused", None)  # makes the import fail
    monkeypatch.delattr(heron.compress, "_fused", raising=False)
    with pytest.warns(RuntimeWarning, match="fused int8/int4 kernel .* is not built"):
        assert kernels._fused_module.__wrapped__() is None


FUSED_SHAPES = {  # (out_features, in_features) per scheme, off every tile of the kernel
    "int8": [(1, 1), (37, 5), (70, 131), (33, 200)],
    "int4": [(1, 32), (37, 64), (70, 96), (33, 256)],
}


@pytest.fixture(params=["avx2", "avx512"])
def fused_tiles(request):
    """Each set of the fused kernel's few-row tiles in turn: AVX-512 where the CPU runs it, else AVX2
    (the module picks AVX-512 where it can, so an AVX-512 machine tests both)."""
    fused = kernels._fused_module()
    before = fused.avx512()
    try:
        fused.avx512(request.param == "avx512")
    except ValueError:
        pytest.skip("this CPU has no AVX-512F")
    yield request.param
    fused.avx512(before)


@pytest.mark.skipif(not KERNELS["fused"].supports(Int8PerChannel(), 1, 1), reason="fused kernel not built or no AVX2")
@pytest.mark.parametrize("scheme", [Int8PerChannel(), Int4Grouped(group_size=32), Int4Grouped(group_size=64, symmetric=True)],
                         ids=["int8", "int4-g32", "int4-g64-symmetric"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 16, 17, 50, 63, 64, 101])
def test_fused_kernel_at_shapes_off_its_tiles(scheme, rows: int, fused_tiles: str) -> None:
    """Heron's C kernel (csrc/fused.c) tiles rows by 1-4 (int8 on AVX-512 1-8; in blocks of 4 or 8 up
    to 63, int4 on AVX2 up to 16), then by 3 and 48, and from DEQUANTIZED_ROWS dequantises for the GEMM;
    outputs by 1-4 and 32-row chunks; inputs by 8, 16, 32 and 64: shapes that
    fill none of those exactly still give the dequantised product, on either
    set of few-row tiles."""
    torch.manual_seed(rows)
    for out_features, in_features in FUSED_SHAPES[scheme.name]:
        if in_features % getattr(scheme, "group_size", 1):
            continue
        w = torch.randn(out_features, in_features)
        codes, params = quantize_rtn(w, scheme)
        layer = QuantLinear.from_codes(codes, params, scheme, kernel="fused")
        assert layer.kernel == "fused"
        x = torch.randn(rows, in_features)
        with torch.inference_mode():
            y = layer(x)
        ref = x.double() @ scheme.dequantize(codes, params).double().T
        assert relative_error(y, ref) < TOLERANCE["fused", scheme.name], (rows, out_features, in_features)


@pytest.mark.skipif(not KERNELS["fused"].supports(Int8PerChannel(), 1, 1), reason="fused kernel not built or no AVX2")
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name + ("-symmetric" if getattr(s, "symmetric", False) else ""))
def test_the_fused_kernel_dequantises_as_the_scheme_does(scheme) -> None:
    """Over many rows the product dequantises Ŵ for the GEMM: the scheme's own fp32 numbers, bit for
    bit, for any span of output rows."""
    torch.manual_seed(3)
    codes, params = quantize_rtn(torch.randn(37, 128), scheme)
    bits, packed, scale, zero, group = kernels._fused_prepare(scheme, codes, params)
    weights = (bits, packed.data_ptr(), scale.data_ptr(), 0 if zero is None else zero.data_ptr(), 37, 128, group)
    out = torch.full((37, 128), float("nan"))
    kernels._fused_module().dequantize(*weights, 4, 37, out[4:].data_ptr(), 2)  # rows 4-36 only
    assert torch.equal(out[4:], scheme.dequantize(codes, params)[4:]) and out[:4].isnan().all()
    with pytest.raises(ValueError, match="0 <= n0 <= n1 <= N"):
        kernels._fused_module().dequantize(*weights, 5, 38, out.data_ptr(), 1)


@pytest.mark.skipif(not KERNELS["fused"].supports(Int8PerChannel(), 1, 1), reason="fused kernel not built or no AVX2")
def test_many_rows_multiply_through_blocks_of_the_dequantised_weight(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "DEQUANTIZED_BLOCK", 5 * 128)  # five output rows a block, 96 rows in all
    layer, w, b, s = layer_for(Int4Grouped(group_size=32), "fused", bias=True, input_scale=True)
    x = torch.randn(2, 40, 128)
    with torch.inference_mode():
        y = layer(x)
    assert relative_error(y, (x.double() * s.double()) @ w.T + b.double()) < TOLERANCE["fused", "int4"]


@pytest.mark.skipif(not KERNELS["fused"].supports(Int8PerChannel(), 1, 1), reason="fused kernel not built or no AVX2")
def test_the_avx512_tiles_are_used_where_the_cpu_has_them() -> None:
    fused = kernels._fused_module()
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):  # torch's AVX512 needs AVX-512F and more
        assert fused.avx512()
    with pytest.raises(TypeError, match=r"avx512\(enable=None\)"):
        fused.avx512(True, False)


def test_fused_kernel_leaves_int4_groups_it_cannot_tile_to_another() -> None:
    assert not KERNELS["fused"].supports(Int4Grouped(group_size=16), 96, 128)
    assert choose_kernel(Int4Grouped(group_size=16), 96, 128, "fused").name != "fused"


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name + ("-symmetric" if getattr(s, "symmetric", False) else ""))
def test_weight_is_the_effective_dequantised_weight(scheme) -> None:
    layer, w, _, s = layer_for(scheme, None, input_scale=True)
    torch.testing.assert_close(layer.weight.double(), w * s.double(), rtol=1e-6, atol=0)


def test_autograd_takes_the_reference_path_and_reaches_the_input() -> None:
    layer, w, _, _ = layer_for(Int4Grouped(group_size=32), None)
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad.double(), w.sum(0).expand(3, -1), rtol=1e-5, atol=1e-6)


def test_loading_new_values_rebuilds_the_kernel_layout() -> None:
    layer, _, _, _ = layer_for(Int8PerChannel(), "fp16", seed=0)
    other, w_other, _, _ = layer_for(Int8PerChannel(), "fp16", seed=1)
    x = torch.randn(2, 128)
    with torch.inference_mode():
        layer(x)  # builds and caches a layout of the first weights
    layer.load_state_dict(other.state_dict())
    with torch.inference_mode():
        assert relative_error(layer(x), x.double() @ w_other.T) < 1e-6


def test_state_dict_holds_only_the_packed_tensors_and_deepcopy_works() -> None:
    layer, _, _, _ = layer_for(Int4Grouped(group_size=32), "fp16", bias=True)
    x = torch.randn(2, 128)
    with torch.inference_mode():
        y = layer(x)
        assert set(layer.state_dict()) == {"qweight", "scale", "zero", "bias"}
        assert torch.equal(copy.deepcopy(layer)(x), y)


def test_choose_kernel_falls_back_when_a_layer_does_not_fit() -> None:
    odd = Int4Grouped(group_size=16)  # aten's int4 kernel takes groups of 32..256 only
    fallback = next(k for k in default_kernels() if k != "aten" and KERNELS[k].supports(odd, 96, 128))
    assert choose_kernel(odd, 96, 128, "aten").name == fallback
    assert choose_kernel(Int8PerChannel(), 96, 128, "dynamic").name in ("dynamic", *default_kernels())
    with pytest.raises(ValueError, match="kernel: unknown 'fast'"):
        choose_kernel(odd, 96, 128, "fast")


def test_set_kernel_reaches_every_quantised_linear() -> None:
    layers = torch.nn.Sequential(layer_for(Int8PerChannel(), None)[0], layer_for(Int8PerChannel(), None, seed=2)[0])
    assert set_kernel(layers, "dequant") == 2
    assert all(layer.kernel == "dequant" for layer in layers)
    with pytest.raises(ValueError, match="kernel"):
        set_kernel(layers, "nope")


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name + ("-symmetric" if getattr(s, "symmetric", False) else ""))
def test_embedding_lookup_dequantises_the_rows_it_gathers(scheme) -> None:
    torch.manual_seed(3)
    table = torch.randn(50, 64)
    codes, params = quantize_rtn(table, scheme)
    embedding = QuantEmbedding.from_codes(codes, params, scheme)
    ids = torch.tensor([[0, 7, 49], [7, 7, 3]])
    dequantised = scheme.dequantize(codes, params)
    assert torch.equal(embedding(ids), dequantised[ids])
    assert torch.equal(embedding.weight, dequantised)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name + ("-symmetric" if getattr(s, "symmetric", False) else ""))
def test_embedding_lookup_of_no_ids_is_empty_as_nn_embedding_s(scheme) -> None:
    """int4's unpack reshaped its nibbles to (N, -1), which no tensor of 0 rows can take."""
    codes, params = quantize_rtn(torch.randn(50, 64, generator=torch.Generator().manual_seed(4)), scheme)
    embedding = QuantEmbedding.from_codes(codes, params, scheme)
    for ids in [torch.zeros(0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)]:
        assert embedding(ids).shape == torch.nn.Embedding(50, 64)(ids).shape == (*ids.shape, 64)
