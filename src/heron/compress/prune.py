"""Unstructured and N:M pruning of one weight matrix: pure functions of tensors.

Every function takes W (N out, K in) and returns a keep-mask (N, K) bool,
True where a weight survives; `sparsegpt` also returns the updated weights.
A target is either `sparsity` (the fraction of weights set to zero) or
`nm=(n, m)`: in every group of m consecutive input weights of a row, keep n
(NVIDIA's 2:4 is nm=(2, 4); Mishra et al. 2021).

    keep = magnitude_mask(w, sparsity=0.5)                  # per layer (Han et al. 2015)
    keep = wanda_mask(w, input_norms, nm=(2, 4))            # Sun et al. 2023
    w_hat, keep = sparsegpt(w, H, sparsity=0.5)             # Frantar & Alistarh 2023

Where the comparison happens, and why:
- magnitude: per layer by default, the baseline as Han et al. 2015 and the
  Wanda reference (`prune_magnitude`) run it; `per_row=True` compares within
  each output row instead.
- Wanda: per output row, as the paper (section 3, "comparison group") found
  best for LLMs.
- SparseGPT: per block of `block_size` columns over all rows, as the
  reference `fasterprune` selects its mask; a row's sparsity may differ from
  the target, a block's never does.
Counts are exact: a row (layer, block) of K weights loses round(sparsity * K).
"""
from __future__ import annotations

import torch

# (H + damp I)⁻¹'s upper Cholesky factor and the dead-input rule, shared with GPTQ
from heron.compress.gptq import inverse_cholesky_upper, without_dead_inputs


def check_target(sparsity: float | None, nm: tuple[int, int] | None, in_features: int | None = None) -> None:
    """Exactly one of sparsity in [0, 1) or nm = (n, m) with 0 < n <= m dividing the inputs."""
    if (sparsity is None) == (nm is None):
        given_nm = "None" if nm is None else ":".join(map(str, nm))  # as typed: 2:4
        raise ValueError(f"sparsity: give exactly one of sparsity or nm, got sparsity={sparsity!r} and nm={given_nm}")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity: expected a fraction in [0, 1), got {sparsity!r}")
    if nm is not None:
        n, m = nm
        if not 0 < n <= m:
            raise ValueError(f"nm: expected 0 < n <= m, got {n}:{m}")
        if in_features is not None and in_features % m:
            raise ValueError(f"nm: groups of {m} do not divide {in_features} input features")


def mask_from_scores(
    scores: torch.Tensor,  # (N, K) higher = more important
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    per_row: bool = True,
) -> torch.Tensor:
    """(N, K) bool keep-mask dropping the lowest scores: round(sparsity * K)
    per row (per_row) or round(sparsity * N * K) over the whole matrix; or,
    with nm, the m - n lowest of every group of m consecutive columns."""
    N, K = scores.shape
    check_target(sparsity, nm, K)
    if nm is not None:
        n, m = nm
        groups = scores.reshape(N, K // m, m)  # (N, K/m, m)
        keep = torch.ones_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.argsort(dim=2, stable=True)[..., : m - n], False)
        return keep.reshape(N, K)
    if not per_row:
        return mask_from_scores(scores.reshape(1, N * K), sparsity=sparsity).reshape(N, K)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, scores.argsort(dim=1, stable=True)[:, : round(sparsity * K)], False)
    return keep


def magnitude_mask(
    w: torch.Tensor, *, sparsity: float | None = None, nm: tuple[int, int] | None = None, per_row: bool = False
) -> torch.Tensor:
    """Keep the largest |W_ij| (Han et al. 2015): per layer, or per row with per_row."""
    return mask_from_scores(w.detach().abs().float(), sparsity=sparsity, nm=nm, per_row=per_row)


def wanda_mask(
    w: torch.Tensor,  # (N, K)
    input_norms: torch.Tensor,  # (K,) ‖X_j‖₂ over the calibration tokens
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Wanda (Sun et al. 2023, eq. 1): score S_ij = |W_ij| · ‖X_j‖₂, the size
    of weight ij's contribution to the output, compared within each output
    row (or N:M group). No weight update: pruned weights are just zeroed."""
    if input_norms.shape != (w.shape[1],):
        raise ValueError(f"input_norms: expected ({w.shape[1]},), got {tuple(input_norms.shape)}")
    scores = w.detach().abs().float() * input_norms.float()[None, :]  # (N, K)
    return mask_from_scores(scores, sparsity=sparsity, nm=nm, per_row=True)


def sparsegpt(
    w: torch.Tensor,  # (N, K)
    H: torch.Tensor,  # (K, K) XᵀX of the calibration inputs, any positive scale
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1; reference
    github.com/IST-DASLab/sparsegpt `fasterprune`): (pruned W (N, K), keep-mask).

    Column by column, each pruned weight's error is compensated on the columns
    to its right through the inverse Hessian (the OBS update, eq. 3), read
    from U, the upper Cholesky factor of (H + damp I)⁻¹ as in GPTQ:
    err = (w - q) / U_ii, W[:, i:] -= err U[i, i:]. The mask is chosen
    adaptively, on the weights as updated so far: for each block of
    `block_size` columns the lowest w² / U_ii² over the block (the OBS
    saliency, eq. 6); with nm, every group of m columns when the loop reaches
    it. Dead inputs (H_jj = 0) get H_jj = 1 and zero weights, as in the
    reference; a kept weight there is zero too.

    With H = I the update moves nothing and the saliency is w²: the mask is
    magnitude's within each block. With a diagonal H and percdamp = 0 the
    saliency is (|W_ij| · sqrt(H_jj))², Wanda's score (Sun et al. 2023, sec. 3).
    """
    N, K = w.shape
    check_target(sparsity, nm, K)
    W, H = without_dead_inputs(w, H)  # (N, K), (K, K)
    U = inverse_cholesky_upper(H, percdamp)  # (K, K)
    m = nm[1] if nm is not None else 1
    block_size = max(block_size // m, 1) * m  # whole groups per block
    keep = torch.ones(N, K, dtype=torch.bool)
    for start in range(0, K, block_size):
        stop = min(start + block_size, K)
        W1, U1, keep1 = W[:, start:stop].clone(), U[start:stop, start:stop], keep[:, start:stop]  # (N, b), (b, b)
        d = torch.diag(U1)  # (b,)
        if nm is None:
            keep1.copy_(mask_from_scores((W1 / d).square(), sparsity=sparsity, per_row=False))
        errors = torch.zeros_like(W1)  # (N, b)
        for i in range(stop - start):
            if nm is not None and i % m == 0:
                keep1[:, i:i + m] = mask_from_scores((W1[:, i:i + m] / d[i:i + m]).square(), nm=nm)
            err = W1[:, i] * ~keep1[:, i] / U1[i, i]  # (N,) (w - q) / U_ii, q = w or 0
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            errors[:, i] = err
        W[:, start:stop] = torch.where(keep1, W1, 0.0)  # exact zeros where pruned
        W[:, stop:] -= errors @ U[start:stop, stop:]  # lazy batch update of the later columns
    return W.to(w.dtype), keep


__all__ = ["check_target", "magnitude_mask", "mask_from_scores", "sparsegpt", "wanda_mask"]
