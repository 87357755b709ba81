"""AWQ: activation-aware weight scaling before rounding (Lin et al. 2023,
"AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", section 3.2; reference code github.com/mit-han-lab/llm-awq,
`auto_scale.search_module_scale`).

Weights that meet large activations matter most. Scaling input channel j of
W up by s_j (and its input down by s_j) leaves the product unchanged but
shrinks that weight's relative rounding error. s = mean|x|^α, normalised so
that max(s) * min(s) = 1; α is chosen on a grid by the layer's output error
on calibration inputs.

Where 1/s goes: it is kept as a per-input-channel vector on the quantised
linear (`QuantLinear.input_scale`) and multiplies x before the product. The
reference folds it into the preceding norm or linear instead, which saves that
multiply but only exists for some layers (nothing precedes mlp.down but an
activation function); the vector works for every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heron.compress.schemes import QParams, Scheme, quantize_rtn


@dataclass(frozen=True)
class AWQResult:
    codes: torch.Tensor  # (N, K) codes of W * s
    params: QParams
    input_scale: torch.Tensor | None  # (K,) 1/s to multiply inputs by; None when α = 0 won (plain RTN)
    alpha: float
    error: float  # mean squared output error at the chosen α
    rtn_error: float  # the same at α = 0, i.e. round-to-nearest


def awq_quantize(
    w: torch.Tensor,  # (N, K)
    x: torch.Tensor,  # (n, K) calibration inputs to this layer
    scheme: Scheme,
    *,
    grid: int = 20,
    bias: torch.Tensor | None = None,
) -> AWQResult:
    """The grid point α in {0, 1/(grid-1), ..., 1} with the least output error
    ||x Wᵀ - (x / s) Q(W diag(s))ᵀ||² / numel. α = 0 is round-to-nearest, so
    the result is never worse than RTN on the calibration data."""
    if grid < 2:
        raise ValueError(f"grid: expected at least 2 points, got {grid}")
    w, x = w.detach().float(), x.detach().float().reshape(-1, w.shape[1])
    scheme.check(*w.shape)
    reference = F.linear(x, w, bias)  # (n, N)
    mean_abs = x.abs().mean(dim=0)  # (K,)
    best: AWQResult | None = None
    rtn_error = float("nan")
    for step in range(grid):
        alpha = step / (grid - 1)
        s = mean_abs.pow(alpha).clamp(min=1e-4)  # (K,)
        s = s / (s.max() * s.min()).sqrt()
        codes, params = quantize_rtn(w * s, scheme)
        inverse = 1 / s
        out = F.linear(x * inverse, scheme.dequantize(codes, params), bias)
        error = float((out - reference).pow(2).mean())
        if step == 0:
            rtn_error = error
        if best is None or error < best.error:
            best = AWQResult(codes, params, None if step == 0 else inverse, alpha, error, rtn_error)
    assert best is not None
    return AWQResult(best.codes, best.params, best.input_scale, best.alpha, best.error, rtn_error)


__all__ = ["AWQResult", "awq_quantize"]
