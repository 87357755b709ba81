"""GPTQ: Hessian-guided rounding of one linear layer (Frantar et al. 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1; reference code github.com/IST-DASLab/gptq).

Columns are quantised one at a time; each column's rounding error is spread
over the columns not yet quantised, weighted by the inverse Hessian of the
layer's squared output error, H = 2 XᵀX / n for calibration inputs X (n, K).
"""
from __future__ import annotations

import torch

from heron.compress.schemes import QParams, Scheme


class HessianAccumulator:
    """H = 2/n Σ xᵀx over every input row seen (GPTQ eq. 2's Hessian), as a
    running mean so batches of any size can be added."""

    def __init__(self, in_features: int) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32)  # (K, K)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (n, K)
        n = x.shape[0]
        if n == 0:  # no rows (an expert routed no token of a batch) change no mean; first, they divided 0 by 0
            return
        self.H *= self.rows / (self.rows + n)
        self.rows += n
        x = x * (2 / self.rows) ** 0.5
        self.H += x.T @ x


def gptq_quantize(
    w: torch.Tensor,  # (N, K)
    H: torch.Tensor,  # (K, K)
    scheme: Scheme,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> tuple[torch.Tensor, QParams]:
    """(codes (N, K), params) in `scheme`'s format, original column order.

    - Dead inputs (H_jj = 0, never active in calibration) get H_jj = 1 and a
      zero weight column, as in the reference: their weights cannot matter.
    - Dampening: H + percdamp * mean(diag H) * I, for a stable inverse.
    - Hinv's upper Cholesky factor U gives, row by row, the updates of the
      sequential algorithm (Algorithm 1: err = (w - q) / U_jj, W -= err U_j).
    - Lazy batch updates: inside a block of columns updates are immediate;
      the rest of W gets the block's errors in one product (section 3, step 2).
    - Groups: parameters are fitted when the loop reaches a group's first
      column, on the columns as updated so far (the block is a whole number
      of groups, so these are fully updated; the reference reads the
      not-yet-updated W for groups starting inside a block).
    - act_order: columns in order of decreasing H_jj (the reference's
      --act-order). Groups then keep their contiguous original columns and
      their parameters are fitted up front on the unmodified weights (the
      reference's --static-groups), so the stored format needs no column
      permutation and every kernel reads it as is.
    - Per-channel schemes fit their parameters once, on the whole W.
    """
    N, K = w.shape
    scheme.check(N, K)
    W, H = without_dead_inputs(w, H)  # (N, K), (K, K)
    group = scheme.group_size_for(K)
    static = scheme.fit(W) if act_order or group == K else None  # (N, G)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    # Weights that are exactly zero (pruned, or dead inputs) stay zero: they take the code of 0, and
    # the error of setting them to it is compensated like any other (SparseGPT's joint quantisation),
    # so GPTQ after pruning keeps the sparsity the pruning made.
    pruned = W == 0 if bool((W == 0).any()) else None  # (N, K)
    U = inverse_cholesky_upper(H, percdamp)  # (K, K)
    block = max(block_size // group, 1) * group if group < K else block_size
    codes = torch.zeros(N, K, dtype=scheme.code_dtype)
    scales = torch.zeros(N, K // group)
    zeros = torch.zeros(N, K // group) if static is None or static.zero is not None else None
    for start in range(0, K, block):
        stop = min(start + block, K)
        W1, U1 = W[:, start:stop].clone(), U[start:stop, start:stop]  # (N, b), (b, b)
        errors = torch.zeros_like(W1)  # (N, b)
        params = None
        for i in range(stop - start):
            j = start + i  # position in (permuted) order
            g = int(perm[j]) // group  # the column's group in original order
            if static is not None:
                params = static.columns(g, g + 1)
            elif j % group == 0:  # dynamic groups: fit on the group's updated columns
                columns = W1[:, i:i + group]
                params = scheme.fit(columns if pruned is None else columns.masked_fill(pruned[:, j:j + group], 0))
                scales[:, g] = params.scale[:, 0]
                if zeros is not None:
                    zeros[:, g] = params.zero[:, 0].float()
            q = scheme.quantize(W1[:, i:i + 1], params)  # (N, 1)
            if pruned is not None:
                q = torch.where(pruned[:, j:j + 1], scheme.quantize(torch.zeros_like(q, dtype=W1.dtype), params), q)
            codes[:, j] = q[:, 0]
            err = (W1[:, i] - scheme.dequantize(q, params)[:, 0]) / U1[i, i]  # (N,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            errors[:, i] = err
        W[:, stop:] -= errors @ U[start:stop, stop:]
    codes = codes[:, torch.argsort(perm)]
    if static is not None:
        return codes, static
    return codes, QParams(scales, zeros.to(torch.uint8) if zeros is not None else None)


def without_dead_inputs(w: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float copies of W (N, K) and H (K, K) where each dead input (H_jj = 0, never
    active in calibration) has H_jj = 1 and a zero weight column, as in the GPTQ
    and SparseGPT reference code: its weights cannot matter, and H stays invertible."""
    W, H = w.detach().float().clone(), H.detach().float().clone()
    dead = torch.diag(H) == 0  # (K,)
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def inverse_cholesky_upper(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)⁻¹; the dampening grows tenfold
    (up to three times) when the damped H is still not positive definite, from
    1e-6 of the mean diagonal at least when percdamp is 0 (0 x 10 stays 0)."""
    K = H.shape[0]
    mean_diag = torch.mean(torch.diag(H))
    damp = percdamp * mean_diag
    for _ in range(4):
        L, info = torch.linalg.cholesky_ex(H + damp * torch.eye(K))
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        tried, damp = damp, torch.clamp(damp * 10, min=1e-6 * mean_diag)
    raise ValueError(
        f"percdamp: the calibration Hessian is not positive definite even with dampening {float(tried):.3g}"
    )


__all__ = ["HessianAccumulator", "gptq_quantize"]
