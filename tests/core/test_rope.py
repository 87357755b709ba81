import pytest
import torch

from heron.core.config import RopeScaling
from heron.core.rope import apply_rope, rope_frequencies, rope_tables


def test_apply_rope_is_rotate_half_on_plain_cos_and_sin_bit_for_bit():
    """Known answer: Hugging Face LLaMA's x * cos + rotate_half(x) * sin with
    rotate_half(x) = (-x2, x1), on tables of the plain angles p * theta^(-2j/hd)."""
    length, head_dim = 7, 8
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq).repeat(1, 2)  # (T, hd)
    cos, sin = angles.cos().float(), angles.sin().float()
    x = torch.randn(2, 3, length, head_dim, generator=torch.Generator().manual_seed(0))  # (B, H, T, hd)
    rotate_half = torch.cat([-x[..., head_dim // 2 :], x[..., : head_dim // 2]], dim=-1)
    assert torch.equal(apply_rope(x, *rope_tables(length, head_dim, 10000.0, None)), x * cos + rotate_half * sin)


def test_partial_rotary_rotates_its_dims_as_a_narrower_head_and_passes_the_rest_through():
    """GPT-NeoX's rotary_pct: a head of 12 with rotary_dim 4 is a 4-wide rotation of dims
    0, 1 (first half) and 6, 7 (second half); the other 8 dims are untouched."""
    length, head_dim, rotary_dim = 5, 12, 4
    x = torch.randn(1, 2, length, head_dim, generator=torch.Generator().manual_seed(0))
    y = apply_rope(x, *rope_tables(length, head_dim, 10000.0, None, rotary_dim))
    rotated = [0, 1, 6, 7]
    passed = [d for d in range(head_dim) if d not in rotated]
    assert torch.equal(y[..., passed], x[..., passed])
    narrow = apply_rope(x[..., rotated], *rope_tables(length, rotary_dim, 10000.0, None))
    torch.testing.assert_close(y[..., rotated], narrow, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind, factor, low, high, original", [
    ("linear", 1.5, None, None, None), ("linear", 8.0, None, None, None),
    ("llama3", 2.0, 1.0, 4.0, 8192), ("llama3", 8.0, 1.0, 4.0, 8192),
    ("llama3", 4.0, 2.0, 3.0, 64), ("llama3", 32.0, 0.5, 8.0, 16),  # all three bands at head_dim 64
])
def test_scaled_inverse_frequencies_equal_transformers(kind, factor, low, high, original):
    """transformers' `ROPE_INIT_FUNCTIONS` (float32) as the reference, at several factors and bands."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, theta = 64, 500000.0
    params = {"rope_type": kind, "rope_theta": theta, "factor": factor}
    scaling = RopeScaling(kind=kind, factor=factor)
    if kind == "llama3":
        params.update(low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=original)
        scaling = RopeScaling(kind=kind, factor=factor, low_freq_factor=low, high_freq_factor=high,
                              original_max_seq_len=original)
    config = transformers.LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, rope_parameters=params,
                                      max_position_embeddings=int(factor * (original or 8192)))
    want, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    got = rope_frequencies(head_dim, theta, scaling)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-6, atol=0)
