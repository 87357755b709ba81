"""Position-wise feed-forward networks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from heron.core.config import ModelConfig
from heron.core.hooks import HookPoint
from heron.core.linear import Linear


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
        h = activate(self.up(x), self.kind)  # (B, T, d_ff)
        return self.down(self.hook_post(h))  # (B, T, d)


def activate(h: torch.Tensor, kind: str) -> torch.Tensor:
    """The hidden activation of an `up` projection's output (..., width) -> (..., d_ff);
    for SwiGLU the width holds gate and up halves: silu(gate) * up."""
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)  # (..., d_ff) each
        return F.silu(gate) * up
    if kind == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    return F.gelu(h)
