"""Normalisation layers chosen by name."""
from __future__ import annotations

import torch
from torch import nn

from heron.core.config import ModelConfig


class RMSNorm(nn.RMSNorm):
    """RMSNorm (Zhang & Sennrich 2019): `nn.RMSNorm`, whose fp32 forward
    outside autograd is written out as six plain ops with the same numbers, bit
    for bit (Hugging Face's LLaMA writes it the same way).

    Why: on the CPU torch's `rms_norm` converts dtypes and wraps scalars
    around the same arithmetic, ~37 µs a call on one decoding row against
    ~15 µs written out, and a decoding step makes 2 * n_layers + 1 calls.
    Training keeps torch's op, whose backward rounds differently from the
    written-out ops' autograd; other dtypes keep it for its fp32 accumulation.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32 or self.weight is None:
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps, x.shape[-1])


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float | torch.Tensor, width: int | torch.Tensor
) -> torch.Tensor:
    """x (..., width) / sqrt(mean(x^2) + eps) * weight (width,): `RMSNorm`'s
    written-out fp32 inference arithmetic, the same numbers as torch's `rms_norm`.

    The mean is the sum divided by `width` (what `mean` does inside, less its
    dtype handling). eps and width may be 0-dim tensors made once: on one
    decoding row, wrapping Python numbers into tensors on every call was
    about a third of the norm's time."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True).div_(width).add_(eps)) * weight


def make_norm(config: ModelConfig) -> nn.Module:
    """Heron's RMSNorm or torch's LayerNorm, as the config names."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)
