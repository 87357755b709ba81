"""Heron's RMSNorm gives torch's numbers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from heron.core.norms import RMSNorm


@pytest.mark.parametrize("shape", [(1, 1, 512), (4, 33, 64), (2, 5, 768), (7, 100)])
def test_rms_norm_inference_equals_torch_bit_for_bit(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-5)
    nn.init.normal_(norm.weight)
    x = 3 * torch.randn(shape)
    reference = nn.functional.rms_norm(x, (shape[-1],), norm.weight, 1e-5)
    with torch.no_grad():
        assert torch.equal(norm(x), reference)
    with torch.inference_mode():
        assert torch.equal(norm(x), reference)


def test_rms_norm_training_and_other_dtypes_are_torchs() -> None:
    """Under autograd torch's op runs: its backward rounds differently from
    that of the written-out ops, and training keeps its numbers."""
    torch.manual_seed(0)
    norm = RMSNorm(512, eps=1e-5)
    nn.init.normal_(norm.weight)
    x = (3 * torch.randn(4, 9, 512)).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(4, 9, 512)
    norm(x).backward(grad)
    nn.functional.rms_norm(x_ref, (512,), norm.weight.detach(), 1e-5).backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    x64 = torch.randn(3, 512, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(norm.double()(x64), nn.functional.rms_norm(x64, (512,), norm.weight, 1e-5))
