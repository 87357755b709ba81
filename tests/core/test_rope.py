import torch

from heron.core.rope import apply_rope, rope_tables


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
