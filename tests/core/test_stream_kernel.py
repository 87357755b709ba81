"""Heron's streaming kernel (csrc/stream.c): decoding's few-row (up to 64) fp32 product
over input-major weights, against F.linear."""
import pytest
import torch
import torch.nn.functional as F

import heron.core.linear as linear_module
from heron.core.linear import (MAX_ROWS, STREAM_ROWS, Linear, few_row_product, set_decode_layout, streamed_product,
                               streams)

pytestmark = pytest.mark.skipif(not streams(), reason="Heron's streaming kernel is not built or does not run here")


def _input_major(N: int, K: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(K, N, generator=generator).t()  # (N, K), laid out (K, N) as decoding lays it


@pytest.fixture(params=["avx512", "avx2"])
def stream_body(request):
    """Each body the kernel is compiled to (stream_mm.h), where this CPU runs it."""
    from heron.core import _stream
    before = _stream.avx512()
    try:
        _stream.avx512(request.param == "avx512")
    except ValueError as err:  # this CPU lacks the instruction set
        pytest.skip(str(err))
    yield request.param
    _stream.avx512(before)


# K not a multiple of the four rows a pass takes nor of a tile's 64-row blocks, N not of the 16 or 32
# floats a vector or a tile holds, 1 x 1 included; rows narrower than 2,048 (a pass reads one row of
# each quarter of a thread's block) and wider (four adjacent); from 6 rows: the register tiles
# (AVX2's in groups of up to 4 rows, AVX-512's of up to 8; 9 rows: groups of 5 and 4 on AVX-512)
@pytest.mark.parametrize(("N", "K"), [(1, 1), (17, 3), (40, 7), (100, 64), (33, 130), (2304, 768), (2051, 45)])
@pytest.mark.parametrize("shape", [(1,), (2,), (1, 1), (1, 2), (2, 1), (3,), (6,), (7,), (2, 4), (8, 1), (9,), (3, 4),
                                   (16,), (41,), (64,)])
def test_up_to_sixty_four_rows_equal_f_linear(N, K, shape, stream_body):
    generator = torch.Generator().manual_seed(N * 1000 + K)
    w = _input_major(N, K, generator)
    x = torch.randn(*shape, K, generator=generator)
    got = streamed_product(w)(x)
    assert got.shape == (*shape, N)
    # to fp32 rounding of sums of K terms of about 1 (the exact sums, in fp64, as reference)
    torch.testing.assert_close(got, F.linear(x.double(), w.double()).float(), rtol=1e-5, atol=1e-5 * K**0.5)


def test_repeats_bit_for_bit_and_reads_a_strided_input():
    generator = torch.Generator().manual_seed(3)
    w = _input_major(300, 96, generator)
    x = torch.randn(2, 192, generator=generator)[:, ::2]  # (2, 96), not contiguous
    product = streamed_product(w)
    assert torch.equal(product(x), product(x))
    torch.testing.assert_close(product(x), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_takes_input_major_fp32_cpu_weights_only():
    generator = torch.Generator().manual_seed(5)
    w = _input_major(24, 16, generator)
    assert streamed_product(w) is not None
    assert streamed_product(w.contiguous()) is None  # row-major: the blocks
    assert streamed_product(w.double()) is None
    assert streamed_product(torch.randn(16, 48, generator=generator)[:, ::2].t()) is None  # gaps between rows


class _Counting:
    """The kernel module, its calls counted."""

    def __init__(self, kernel) -> None:
        self.kernel, self.rows = kernel, []

    def mm(self, x_ptr, M, *rest) -> None:
        self.rows.append(M)
        self.kernel.mm(x_ptr, M, *rest)


def test_few_row_product_streams_up_to_stream_rows_and_blocks_the_rest(monkeypatch):
    counting = _Counting(linear_module._stream_kernel())
    monkeypatch.setattr(linear_module, "_stream_kernel", lambda: counting)
    generator = torch.Generator().manual_seed(7)
    w, bias = _input_major(40, 32, generator), torch.randn(40, generator=generator)
    product = few_row_product(w, bias)
    for rows in (1, 2, 8, 9, 16, STREAM_ROWS, STREAM_ROWS + 1):
        x = torch.randn(rows, 32, generator=generator)
        torch.testing.assert_close(product(x), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    assert counting.rows == [1, 2, 8, 9, 16, STREAM_ROWS]  # more rows: the blocked bmm
    with pytest.raises(RuntimeError, match="Double"):  # torch's own error, not a kernel reading fp64 as fp32
        product(torch.randn(1, 32, dtype=torch.float64, generator=generator))
    assert counting.rows == [1, 2, 8, 9, 16, STREAM_ROWS]


def test_the_kernel_refuses_rows_it_does_not_take():
    kernel = linear_module._stream_kernel()
    x, wt, y = torch.zeros(65, 4), torch.zeros(4, 5), torch.empty(65, 5)
    with pytest.raises(ValueError, match="M must be 1 to 64"):
        kernel.mm(x.data_ptr(), 65, y.data_ptr(), 1, wt.data_ptr(), 5, 4)


def test_a_linear_streams_up_to_stream_rows_where_laid_out_for_it(monkeypatch):
    """Past MAX_ROWS (a short prompt's prefill), a Linear laid out input-major streams up to
    STREAM_ROWS rows; row-major, or under autograd, it keeps the GEMM."""
    counting = _Counting(linear_module._stream_kernel())
    monkeypatch.setattr(linear_module, "_stream_kernel", lambda: counting)
    torch.manual_seed(11)
    layer = Linear(32, 40)
    x = torch.randn(STREAM_ROWS + 1, 32)
    set_decode_layout(layer, rows=1)
    with torch.no_grad():
        for rows in (MAX_ROWS + 4, STREAM_ROWS, STREAM_ROWS + 1):
            expected = F.linear(x[:rows], layer.weight, layer.bias)
            torch.testing.assert_close(layer(x[:rows]), expected, rtol=1e-5, atol=1e-5)
        assert counting.rows == [MAX_ROWS + 4, STREAM_ROWS]  # past STREAM_ROWS: the GEMM
    layer(x[:MAX_ROWS + 4]).sum().backward()  # training: the GEMM's numbers
    set_decode_layout(layer, rows=STREAM_ROWS + 1)  # row-major
    with torch.no_grad():
        layer(x[:MAX_ROWS + 4])
    assert counting.rows == [MAX_ROWS + 4, STREAM_ROWS] and layer.weight.grad is not None
