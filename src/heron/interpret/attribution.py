"""Which input tokens an output depends on: integrated gradients and gradient x input.

The output is a scalar of the logits, by default the logit of `target` at
`position` (for a scalar head, a reward model, target 0 is its score);
attributions are over the token embeddings x (T, d) (learned positions, when
the model has them, are added inside the model and stay put), summed over d
to one score per token.

- Gradient x input (Shrikumar et al. 2016): x_t · ∂F/∂x_t. One backward pass;
  exact only for models linear in x.
- Integrated gradients (Sundararajan, Taly & Yan 2017, eq. 1):
  (x_t - x'_t) · ∫₀¹ ∂F(x' + α(x - x'))/∂x_t dα, from a baseline x': by
  default every position holds the mean token embedding ("mean"); or zero
  embeddings ("zero"), or every token replaced by one token id. Why not zero
  by default: a pre-norm model normalises its input first, and RMSNorm(αx)
  jumps from 0 to RMSNorm(x) within α ~ sqrt(eps) / rms(x) of the start, so
  almost all of F's change sits in a sliver of the path that no quadrature
  resolves (the check below catches it). By completeness
  the scores sum to F(x) - F(x'); how far the computed sum is from that
  difference measures how well the integral was approximated, so it is
  checked: `completeness_error` is |Σ scores - (F(x) - F(x'))| / |F(x) - F(x')|
  and above `tolerance` the call fails, asking for more steps. On a
  Mixture-of-Experts model more steps do not help: top-k routing switches
  experts along the path, F jumps where it does, and the integral of the
  gradient misses the jumps; the error says so (use gradient x input). The
  integral uses Gauss-Legendre nodes on [0, 1], exact for polynomials of degree
  2·steps - 1, which converges in far fewer steps than the Riemann sums of
  the paper for the smooth paths a transformer gives.

    result = integrated_gradients(model, ids, target=token_id)
    result.scores          # (T,) one score per input token
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from heron.core.modes import evaluating
from heron.core.transformer import Transformer
from heron.interpret.cache import check_position, check_target, check_tokens
from heron.interpret.routing import moe_blocks

# (logits (B, T, V)) -> (B,) the output to explain, per batch row
Output = Callable[[torch.Tensor], torch.Tensor]


# Gauss-Legendre quadrature converges in tens of nodes; computing n of them takes O(n²) memory and O(n³) time
# (4096: seconds), so a mistyped n would end in a MemoryError.
MAX_STEPS = 4096


class ConvergenceError(RuntimeError):
    """Integrated gradients' scores do not add up to the output difference."""


@dataclass(frozen=True)
class Attribution:
    """Scores of the input tokens for one output."""

    ids: list[int]
    scores: torch.Tensor  # (T,) float32
    output: float  # F(x)
    baseline_output: float | None = None  # F(x'); integrated gradients only
    steps: int | None = None
    completeness_error: float | None = None  # relative; integrated gradients only


def logit_of(target: int, position: int = -1) -> Output:
    """F = the logit of token `target` at `position`."""
    return lambda logits: logits[:, position, target]


def gradient_x_input(model: Transformer, ids: list[int] | torch.Tensor, *, target: int | None = None,
                     position: int = -1, output: Output | None = None) -> Attribution:
    """x_t · ∂F/∂x_t summed over the embedding dimension, one score per token (in eval mode)."""
    ids, F = _prepare(model, ids, target, position, output)
    x = _embeddings(model, ids)  # (T, d)
    with evaluating(model):
        values, grads = _values_and_grads(model, F, x[None])
    return Attribution(ids.tolist(), (x * grads[0]).sum(-1).float(), float(values[0]))


def integrated_gradients(
    model: Transformer,
    ids: list[int] | torch.Tensor,
    *,
    target: int | None = None,
    position: int = -1,
    output: Output | None = None,
    baseline: str | int = "mean",  # "mean" or "zero" embeddings, or a token id at every position
    steps: int = 32,
    batch_size: int = 16,
    tolerance: float = 0.01,
) -> Attribution:
    """Integrated gradients along the straight path from the baseline, in eval
    mode; fails with ConvergenceError when the scores miss F(x) - F(x') by more
    than `tolerance` of it (raise `steps`; on an MoE model more cannot help, see above)."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps, batch_size: expected positive integers, got {steps}, {batch_size}")
    if steps > MAX_STEPS:
        raise ValueError(f"steps: at most {MAX_STEPS} (the quadrature converges in tens), got {steps}")
    if tolerance <= 0:
        raise ValueError(f"tolerance: expected a positive fraction, got {tolerance}")
    ids, F = _prepare(model, ids, target, position, output)
    x = _embeddings(model, ids)  # (T, d)
    baseline = _baseline(model, ids, x, baseline)  # (T, d)
    with evaluating(model):
        scores = ((x - baseline) * _path_integral(model, F, x, baseline, steps, batch_size)).sum(-1).float()  # (T,)
        with torch.no_grad():
            ends = F(model(input_embeds=_as_model_dtype(model, torch.stack([x, baseline]))).logits.float())  # (2,)
    difference = float(ends[0] - ends[1])
    error = abs(float(scores.sum()) - difference) / max(abs(difference), 1e-12)
    if error > tolerance:
        raise ConvergenceError(f"steps: the scores sum to {float(scores.sum()):.6g} but F(x) - F(x') = "
                               f"{difference:.6g} (relative error {error:.3g} > tolerance {tolerance}); "
                               + _not_converged(model, steps))
    return Attribution(ids.tolist(), scores, float(ends[0]), float(ends[1]), steps, error)


def _path_integral(model: Transformer, F: Output, x: torch.Tensor, baseline: torch.Tensor, steps: int,
                   batch_size: int) -> torch.Tensor:
    """(T, d) ∫₀¹ ∂F(x' + α(x - x'))/∂x dα by `steps`-point Gauss-Legendre quadrature."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
    alphas = torch.tensor((nodes + 1) / 2, dtype=x.dtype)  # (steps,) on [0, 1]
    weights = torch.tensor(weights / 2, dtype=x.dtype)  # (steps,) summing to 1
    mean_grad = torch.zeros_like(x)  # (T, d)
    for start in range(0, steps, batch_size):
        a = alphas[start:start + batch_size, None, None]  # (b, 1, 1)
        _, grads = _values_and_grads(model, F, baseline + a * (x - baseline))  # (b, T, d)
        mean_grad += (weights[start:start + batch_size, None, None] * grads).sum(0)
    return mean_grad


def _not_converged(model: Transformer, steps: int) -> str:
    """What to do about a missed completeness check. An MoE layer's top-k routing
    switches experts at points along the path, where F jumps; the gradient never
    sees a jump, so no number of steps makes the scores add up."""
    moe = moe_blocks(model)
    if moe:
        return (f"the model's Mixture-of-Experts layers (blocks {', '.join(map(str, moe))}) route by top-k, which "
                "switches experts along the path from the baseline, so F jumps there and completeness cannot "
                "hold at any number of steps; use gradient_x_input")
    return f"use more than {steps} steps"


def _prepare(model: Transformer, ids: list[int] | torch.Tensor, target: int | None, position: int,
             output: Output | None) -> tuple[torch.Tensor, Output]:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1):  # flattening rows would attribute one joined prompt
        raise ValueError(f"ids: expected one prompt, (T,) or (1, T), got {tuple(ids.shape)}; attribute each "
                         "row on its own")
    ids = ids.flatten()  # (T,)
    if ids.numel() == 0:
        raise ValueError("ids: empty input")
    check_tokens("ids", ids, model.config.vocab_size)  # not an IndexError from inside the embedding
    if (target is None) == (output is None):
        raise ValueError("target: give exactly one of target (a token id) or output (a function of the logits)")
    if target is not None:
        check_target("target", target, model)
        check_position("position", position, ids.numel())
        output = logit_of(target, position)
    return ids, output


def _baseline(model: Transformer, ids: torch.Tensor, x: torch.Tensor, kind: str | int) -> torch.Tensor:
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        with torch.no_grad():  # (V, d) -> (d,); a quantised table dequantises
            return model.embed.weight.float().mean(0).expand_as(x).clone()
    if isinstance(kind, int) and not isinstance(kind, bool) and 0 <= kind < model.config.vocab_size:
        return _embeddings(model, torch.full_like(ids, kind))
    raise ValueError(f"baseline: expected 'mean', 'zero' or a token id below {model.config.vocab_size}, got {kind!r}")


def _embeddings(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """(T, d) the token embeddings, detached (what input_embeds takes)."""
    with torch.no_grad():
        return model.embed(ids.to(next(model.parameters()).device)).float()


def _as_model_dtype(model: Transformer, embeds: torch.Tensor) -> torch.Tensor:
    """fp32 embeddings (interpolated there) as the model takes them: a bf16 model, bf16."""
    return embeds.to(next(p.dtype for p in model.parameters() if p.is_floating_point()))


def _values_and_grads(model: Transformer, F: Output, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F per row (b,), ∂F/∂embeds (b, T, d)) in fp32; the parameters' .grad stays untouched. The
    embeddings (fp32, interpolated there) go in in the model's own dtype (a bf16 model takes bf16)."""
    with torch.enable_grad():
        embeds = _as_model_dtype(model, embeds.detach()).requires_grad_(True)
        values = F(model(input_embeds=embeds).logits.float())  # (b,)
        (grads,) = torch.autograd.grad(values.sum(), embeds)  # rows are independent: one backward for all
    return values.detach(), grads.float()


__all__ = ["MAX_STEPS", "Attribution", "ConvergenceError", "gradient_x_input", "integrated_gradients", "logit_of"]
