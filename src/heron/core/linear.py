"""nn.Linear with faster paths for the few-row products of decoding, and
its GEMMs through the faster library here (core/gemm.py)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from heron.core.gemm import ROW_QUANTUM, linear

SPLIT = 4  # weight blocks, one bmm batch entry (and thread task) each
MAX_ROWS = 16  # inputs with more rows than this are GEMM-shaped, where they do not stream (`few_rows`)
K_SPLIT_ROWS = 2  # decoding this many rows or fewer lays wide weights out input-major for the blocks
# Rows the streaming kernel takes, and decoding lays every weight out for (`streams`): fewer than
# the GEMM gives oneDNN (ROW_QUANTUM, core/gemm.py); MKL, which takes fewer, is slower than it. A
# `small` checkpoint decoded 24, 48 and 60 rows 1.85x, 1.43x and 1.57x as fast as through the GEMM,
# a `base`-shaped model 32, 48 and 56 rows 1.82x, 1.51x and 1.62x; at 64 rows, oneDNN's, 1.07x and
# 0.97x (Zen 4, 2026-12-03, one process, 6 alternating rounds, the same greedy tokens). A 24- and a
# 48-token prompt's prefill streamed ran 1.42x and 1.36x as fast.
STREAM_ROWS = ROW_QUANTUM - 1


class Linear(nn.Linear):
    """An `nn.Linear` (same parameters, same names) whose products with at
    most MAX_ROWS input rows, outside autograd, run as one bmm over SPLIT
    blocks of the weight (up to STREAM_ROWS through the streaming kernel
    where it takes them: `few_rows`); larger ones, and all under autograd,
    through the GEMM `core.gemm.linear` chose for this CPU.

    Why: for x (1..16, K) @ W.T MKL picks sgemv / small-M sgemm, which on
    CPU stream W at about half the memory bandwidth; decoding reads every
    weight once per step, so this is the decode speed. The blocks depend on
    how the weight lies in memory (both are views, no copy):

    - row-major, as built ((N, K), rows contiguous): SPLIT blocks of output
      rows, each output the same length-K dot product as F.linear's.
    - input-major ((K, N) in memory; `set_decode_layout` lays wide weights
      out so to decode one or two rows): SPLIT blocks of the K inputs, whose
      partial products are summed. Each block streams whole rows of N
      outputs, which reads a wide weight (N > K: q/k/v, gate/up, the output
      head) faster still at one or two rows. Measured on 2 AVX2 cores at
      512 x 8192: 19 GB/s against 12 for row blocks, 8 for F.linear; the
      `small` preset decoded a token in 15.4 ms against 19.5. Summing in
      blocks rounds differently from F.linear (~1e-6 in logits).

    Where Heron's own streaming kernel runs (`streams`: csrc/stream.c, built at
    install, on a CPU with AVX-512F or AVX2), up to STREAM_ROWS rows times an
    input-major weight go through it instead: each thread reads one contiguous
    block of the weight's rows, which streamed the `base` preset's weights at
    44-47 GB/s against the blocked bmm's 34-37 on the Zen 5 host (one row;
    1.4-1.6x the blocks at 8 rows), and decoding lays every weight out
    input-major to use it (decoding steps 1.14-1.20x as fast at batch 1).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.numel() // self.in_features > few_rows(self.weight, x.dtype):
            return linear(x, self.weight, self.bias)  # training keeps the GEMM's numbers
        return few_row_product(self.weight, self.bias)(x)


def few_rows(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> int:
    """Up to how many rows of `dtype` a product with `weight` is faster through `few_row_product`
    than through the GEMM: STREAM_ROWS where the streaming kernel takes them (`takes_stream`),
    else MAX_ROWS."""
    return STREAM_ROWS if dtype == torch.float32 and takes_stream(weight) else MAX_ROWS


def few_row_product(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """F.linear(., weight, bias) for inputs (..., K) of at most MAX_ROWS rows:
    up to STREAM_ROWS fp32 rows through the streaming kernel where it takes the weight
    (`streamed_product`), else one bmm over SPLIT blocks of the weight where its
    layout allows (why: `Linear`), else F.linear. The blocks are views of the
    weight made here, once, so a caller that multiplies by one weight many
    times (a decoding step, core/token_step.py) need not remake them each call."""
    N, K = weight.shape
    if is_input_major(weight) and K % SPLIT == 0:
        blocks = weight.t().view(SPLIT, K // SPLIT, N)  # (S, K/S, N)
        product = lambda x: summed_block_product(x, blocks)  # noqa: E731
    elif weight.is_contiguous() and N % SPLIT == 0:  # row-major
        blocks = weight.view(SPLIT, N // SPLIT, K).transpose(1, 2)  # (S, K, N/S)
        product = lambda x: output_block_product(x, blocks)  # noqa: E731
    else:
        product = lambda x: F.linear(x, weight)  # noqa: E731
    streamed = streamed_product(weight)
    if streamed is not None:  # up to STREAM_ROWS fp32 rows: the streaming kernel; more: the blocks
        blocked = product
        product = lambda x: (streamed(x) if x.numel() <= STREAM_ROWS * K and x.dtype == torch.float32  # noqa: E731
                             else blocked(x))
    return product if bias is None else lambda x: product(x) + bias


@functools.cache
def _stream_kernel() -> ModuleType | None:
    """Heron's streaming kernel (csrc/stream.c) where it was built and runs on this CPU, else None."""
    try:
        from heron.core import _stream
    except ImportError:
        return None
    return _stream if _stream.supported() else None


def streams() -> bool:
    """Whether up to STREAM_ROWS rows times an input-major fp32 CPU weight go through Heron's
    streaming kernel here (`Linear`), so that decoding lays every weight out input-major."""
    return _stream_kernel() is not None


def takes_stream(weight: torch.Tensor) -> bool:
    """Whether the streaming kernel runs here and takes `weight`: fp32 on the CPU, input-major."""
    return (_stream_kernel() is not None and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and is_input_major(weight))


def streamed_product(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x (..., K) of up to STREAM_ROWS rows, fp32, times the input-major (N, K) `weight`, through
    the streaming kernel (`Linear`): (..., N). None where the kernel does not take the
    weight (another layout, dtype or device, or no kernel here)."""
    if not takes_stream(weight):
        return None
    kernel = _stream_kernel()
    N, K = weight.shape
    wt = weight.t()  # (K, N), rows contiguous

    def product(x: torch.Tensor) -> torch.Tensor:
        rows = x.contiguous()
        y = torch.empty(*x.shape[:-1], N)
        kernel.mm(rows.data_ptr(), rows.numel() // K, y.data_ptr(), torch.get_num_threads(), wt.data_ptr(), N, K)
        return y
    return product


def decoding_product(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A layer as the product that decoding calls once a step (core/token_step.py):
    a plain `Linear` as its arithmetic, its few-row blocks made here, once;
    another layer through the product it offers for repeated calls outside
    autograd (`decode_product`, e.g. a quantised linear: compress/qlinear.py),
    else through its forward."""
    if type(module) is not Linear:
        own = getattr(module, "decode_product", None)
        return own() if own is not None else module.forward
    weight, bias = module.weight, module.bias
    product, most = few_row_product(weight, bias), few_rows(weight)
    return lambda x: product(x) if x.numel() // x.shape[-1] <= most else linear(x, weight, bias)


def is_input_major(w: torch.Tensor) -> bool:
    """Whether the (N, K) weight lies input-major, i.e. `w.t().is_contiguous()`,
    read from its strides without making the view (an op a call, 33 a step)."""
    (N, K), (row_stride, column_stride) = w.shape, w.stride()
    return (N == 1 or row_stride == 1) and (K == 1 or column_stride == N)


def summed_block_product(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x (..., K) times the (K, N) matrix whose SPLIT blocks of K/S rows are
    `blocks` (S, K/S, N): the blocks' partial products in one bmm, summed. (..., N)"""
    S, k, N = blocks.shape
    rows = x.numel() // (S * k)
    xs = x.reshape(S, 1, k) if rows == 1 else x.reshape(rows, S, k).transpose(0, 1)  # (S, rows, K/S)
    return torch.bmm(xs, blocks).sum(0).view(*x.shape[:-1], N)


def output_block_product(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x (..., K) times W.T for the row-major (N, K) weight W whose SPLIT
    blocks of N/S output rows are `blocks` (S, K, N/S), in one bmm. (..., N)"""
    S, K, n = blocks.shape
    rows = x.numel() // K
    y = torch.bmm(x.reshape(1, rows, K).expand(S, rows, K), blocks)  # (S, rows, N/S)
    return y.transpose(0, 1).reshape(*x.shape[:-1], S * n)


def set_decode_layout(model: nn.Module, rows: int) -> int:
    """Lay out the weight of every wide `Linear` on the CPU (more outputs than
    inputs), and of every one where Heron's streaming kernel runs (`streams`),
    for products with `rows` input rows: input-major up to K_SPLIT_ROWS rows
    (STREAM_ROWS with the kernel), row-major (as built) above, where blocks of
    outputs over row-major weights are faster than blocks of inputs (at 8
    rows, 512 x 8192: 2.3 ms against 3.1 input-major). Returns how many
    weights moved.

    Values, shapes and parameters stay the same (a tied embedding moves with
    its output head; a lookup reads strided rows, as cheap for a few tokens);
    only the memory order changes, so training and saving work as before
    (checkpoints are written contiguous; `Transformer.train()` lays the
    weights back out row-major, where training's products are faster). A weight already laid out is left
    alone, so decoding calls this on every model it is given.
    """
    every_weight = streams()
    input_major = rows <= (STREAM_ROWS if every_weight else K_SPLIT_ROWS)
    moved = 0
    with torch.inference_mode(False), torch.no_grad():  # plain tensors: the model may train afterwards
        for module in model.modules():
            if not isinstance(module, Linear) or (module.out_features <= module.in_features and not every_weight):
                continue
            w = module.weight
            if w.device.type != "cpu" or is_input_major(w) == input_major:
                continue
            w.data = w.data.t().contiguous().t() if input_major else w.data.contiguous()
            moved += 1
    return moved
