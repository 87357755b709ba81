"""Model presets as data: one row per named shape.

Each preset is LLaMA-shaped (RMSNorm, RoPE, SwiGLU, grouped-query attention,
tied embeddings); the sizes in the comments are parameter counts with the
preset's vocabulary.
"""
from __future__ import annotations

from typing import Any

import torch

from heron.core.config import ModelConfig
from heron.core.transformer import Transformer

PRESETS: dict[str, ModelConfig] = {
    # ~1.1M: unit tests and smoke runs.
    "test": ModelConfig(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
    # ~9.7M: the demo, trained for minutes on two CPU cores.
    "tiny": ModelConfig(vocab_size=8192, d_model=288, n_layers=8, n_heads=6, n_kv_heads=3, max_seq_len=512),
    # ~30M: benchmarks, a model that writes plausible code with more time.
    "small": ModelConfig(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, max_seq_len=1024),
    # ~110M: GPT-2-small/LLaMA-base scale with a 32k vocabulary.
    "base": ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, max_seq_len=2048),
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The named preset's config, with some fields changed."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def build_model(config_or_preset: ModelConfig | str, **overrides: Any) -> Transformer:
    """A freshly initialised model from a config or a preset name."""
    if isinstance(config_or_preset, str):
        config = preset_config(config_or_preset, **overrides)
    else:
        config = config_or_preset.replace(**overrides) if overrides else config_or_preset
    return Transformer(config)


def parameter_count(model: Transformer) -> int:
    """The weights its config describes (a tied embedding counts once), whatever they are stored
    as: a quantised model's packed codes, which are buffers, count as the weights they stand for.
    Counted on a twin built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(model.config).parameters())
