"""Normalisation layers chosen by name."""
from __future__ import annotations

from torch import nn

from heron.core.config import ModelConfig


def make_norm(config: ModelConfig) -> nn.Module:
    """RMSNorm (Zhang & Sennrich 2019) or LayerNorm, each one fused torch op."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)
