"""attention_with_lse: the fused CPU kernel's output and log-sum-exp, with
gradients through both, against autograd on an explicit reference."""
import pytest
import torch
import torch.nn.functional as F

from heron.core.flash import attention_with_lse


def reference(q, k, v, mask, is_causal):
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v, scores.logsumexp(-1)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", ["plain", "causal", "broadcast_mask", "full_mask"])
def test_output_lse_and_both_gradients_match_the_reference(dtype, tol, case):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    band = (torch.arange(9)[:, None] - torch.arange(9)[None, :]).abs() < 3  # every row keeps itself
    mask = {"broadcast_mask": band, "full_mask": (torch.rand(2, 1, 9, 9, generator=g) < 0.6) | torch.eye(9, dtype=torch.bool)}.get(case)
    is_causal = case == "causal"
    out, lse = attention_with_lse(q, k, v, mask, is_causal)
    want_out, want_lse = reference(q, k, v, mask, is_causal)
    assert (out - want_out).abs().max() <= tol and (lse - want_lse).abs().max() <= tol
    w_out, w_lse = torch.randn(out.shape, generator=g, dtype=dtype), torch.randn(lse.shape, generator=g, dtype=dtype)
    got = torch.autograd.grad((out * w_out).sum() + (lse * w_lse).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * w_out).sum() + (want_lse * w_lse).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= tol * 10


def test_gradient_of_the_output_alone_needs_no_lse_gradient():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 7, 4, generator=g, requires_grad=True) for _ in range(3))
    out, _ = attention_with_lse(q, k, v, is_causal=True)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(reference(q, k, v, None, True)[0].sum(), (q, k, v))
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["causal", "broadcast_mask"])
def test_under_autocast_the_kernel_runs_as_sdpa_does(dtype, case):
    """CPU autocast runs SDPA in its lower precision; the raw kernel has no
    autocast rule, so it is given SDPA's: q and k fp32 beside a v in the
    autocast dtype (as RoPE's fp32 tables leave them) give SDPA's output and
    gradients bit for bit. fp64 stays fp64, as autocast leaves it."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, requires_grad=True) for _ in range(3))
    band = (torch.arange(9)[:, None] - torch.arange(9)[None, :]).abs() < 3
    mask, is_causal = (None, True) if case == "causal" else (band, False)
    with torch.autocast("cpu", dtype=dtype):
        out, _ = attention_with_lse(q, k, v.to(dtype), mask, is_causal)
        want = F.scaled_dot_product_attention(q, k, v.to(dtype), attn_mask=mask, is_causal=is_causal)
        assert attention_with_lse(*(x.double() for x in (q, k, v)), mask, is_causal)[0].dtype == torch.float64
    assert out.dtype == dtype and torch.equal(out, want)
    w_out = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * w_out).sum(), (q, k, v))
    expected = torch.autograd.grad((want * w_out).sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
