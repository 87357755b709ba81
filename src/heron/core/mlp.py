"""Position-wise feed-forward networks."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from heron.core.config import ModelConfig
from heron.core.gemm import linear
from heron.core.hooks import HookPoint
from heron.core.linear import MAX_ROWS, Linear, decoding_product, few_rows
from heron.core.swiglu import swiglu, swiglu_halves


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020) or GELU feed-forward.

    SwiGLU's gate and up projections are one `gate_up` linear: one matmul per
    step instead of two, which matters for small-batch decoding on CPU.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, ff = config.d_model, config.resolved_d_ff
        self.kind = config.mlp
        width = 2 * ff if self.kind == "swiglu" else ff
        self.up = Linear(d, width, bias=config.mlp_bias)
        self.down = Linear(ff, d, bias=config.mlp_bias)
        self.hook_post = HookPoint()  # (B, T, d_ff): the hidden activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.kind == "swiglu" and isinstance(self.up, nn.Linear) and rows > few_rows(self.up.weight, x.dtype):
            # Many rows: two products on the weight's halves (views, no copy). With MKL at
            # 64 rows, d 768, one 4096-wide product took 8.1 ms against 6.9 for two of 2048;
            # equal at 2048 rows and in training. Few rows (decoding): one fused product.
            # A layer swapped in for `up` (quantised, adapted) is always called as a module.
            gate, up = self.up.weight.chunk(2, dim=0)  # (d_ff, d) each
            gate_bias, up_bias = self.up.bias.chunk(2) if self.up.bias is not None else (None, None)
            h = swiglu(linear(x, gate, gate_bias), linear(x, up, up_bias))  # (B, T, d_ff)
        else:
            h = activate(self.up(x), self.kind)  # (B, T, d_ff)
        return self.down(self.hook_post(h))  # (B, T, d)

    def decode_step(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """`forward` for decoding's few rows (..., d), without the hook point, its
        products looked up once (core/token_step.py calls it every token, and a
        MoE's shared expert with it); more rows go to `forward`."""
        up, down, kind = decoding_product(self.up), decoding_product(self.down), self.kind
        # Past `few_rows` forward splits SwiGLU's product in two (above): let it.
        most = few_rows(self.up.weight) if isinstance(self.up, nn.Linear) else MAX_ROWS
        return lambda x: down(activate(up(x), kind)) if x.numel() // x.shape[-1] <= most else self.forward(x)


def activate(h: torch.Tensor, kind: str) -> torch.Tensor:
    """The hidden activation of an `up` projection's output (..., width) -> (..., d_ff);
    for SwiGLU the width holds gate and up halves: silu(gate) * up."""
    if kind == "swiglu":
        return swiglu_halves(h)
    if kind == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    return F.gelu(h)
