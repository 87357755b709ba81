"""Rotary position embeddings (Su et al. 2021, "RoFormer").

Uses the rotate-half layout of Hugging Face's LLaMA, so weights imported from
those checkpoints need no permutation.
"""
from __future__ import annotations

import math

import torch

from heron.core.config import RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies, shape (head_dim // 2,), float64 for exact tables."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    return _llama3_scaling(inv_freq, scaling)


def _llama3_scaling(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Meta's Llama 3.1 `apply_scaling`: keep high frequencies, divide low ones
    by `factor`, and interpolate smoothly in between."""
    low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    between = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(between, interpolated, scaled)


def rope_tables(
    max_seq_len: int, head_dim: int, theta: float, scaling: RopeScaling | None, rotary_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables, each (max_seq_len, head_dim), in float32.

    The sin table's first half is negated: rotate-half's sign, folded into
    the table once so that `apply_rope` needs no negation per call.

    With `rotary_dim` < head_dim (partial rotary, GPT-NeoX), the frequencies
    of a `rotary_dim` rotation fill the first rotary_dim / 2 entries of each
    half and the rest hold cos 1, sin 0, so those dims pass through unchanged
    and `apply_rope` stays one expression. Importers place a checkpoint's
    rotated dims there (interop/tables.py, "neox_qkv").
    """
    rotated = head_dim if rotary_dim is None else rotary_dim
    inv_freq = rope_frequencies(rotated, theta, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (L, rd/2)
    angles = torch.nn.functional.pad(angles, (0, (head_dim - rotated) // 2))  # (L, hd/2): angle 0 passes through
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos().float(), torch.cat([-sin, sin], dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by the `rope_tables` rows broadcastable to it.

    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1): with the
    sign in the table that is roll(x, hd/2) * signed_sin, the same numbers in
    four ops instead of seven (a third less time for a decoding step's one
    row, which is all per-op overhead).
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def token_major(table: torch.Tensor) -> torch.Tensor:
    """A `rope_for` table, (T, hd) or (B, 1, T, hd), shaped to broadcast over
    (B, T, heads, hd) instead of (B, heads, T, hd)."""
    return table.unsqueeze(-2) if table.dim() == 2 else table.transpose(1, 2)
