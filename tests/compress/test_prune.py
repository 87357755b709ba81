"""Pruning masks of one matrix: exact counts, N:M groups, and known answers
(Wanda with equal input norms is magnitude per row; SparseGPT with H = I is
magnitude per block and moves nothing; with a diagonal H it is Wanda), and
SparseGPT's weight update beating both on correlated inputs."""
from __future__ import annotations

import pytest
import torch

from heron.compress.prune import magnitude_mask, mask_from_scores, sparsegpt, wanda_mask

torch.set_num_threads(1)
NM = [(2, 4), (1, 4), (4, 8)]


def weights(N: int = 24, K: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


def correlated_inputs(n: int = 1024, K: int = 64, seed: int = 1) -> torch.Tensor:
    """Inputs with strongly correlated features of unequal scale, like a
    transformer's hidden states: a few latent factors mixed, plus noise."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 8, generator=g) @ torch.randn(8, K, generator=g)  # (n, K) rank 8
    scale = torch.rand(K, generator=g) * 3 + 0.1
    return (latent + 0.3 * torch.randn(n, K, generator=g)) * scale


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x @ w.T - x @ w_hat.T).norm())


def test_magnitude_per_layer_prunes_exactly_the_smallest():
    w = weights()
    keep = magnitude_mask(w, sparsity=0.5)
    assert int((~keep).sum()) == w.numel() // 2
    assert w[keep].abs().min() > w[~keep].abs().max()
    assert len(set((~keep).sum(dim=1).tolist())) > 1  # per layer: rows differ


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_per_row_masks_have_the_exact_sparsity_in_every_row(sparsity):
    w, norms = weights(), torch.rand(64) + 0.5
    for keep in (magnitude_mask(w, sparsity=sparsity, per_row=True), wanda_mask(w, norms, sparsity=sparsity)):
        assert ((~keep).sum(dim=1) == round(sparsity * 64)).all()


@pytest.mark.parametrize("nm", NM)
def test_every_group_of_m_keeps_exactly_n(nm):
    n, m = nm
    w, x = weights(), correlated_inputs()
    masks = [magnitude_mask(w, nm=nm), wanda_mask(w, x.norm(dim=0), nm=nm), sparsegpt(w, x.T @ x, nm=nm)[1]]
    for keep in masks:
        assert (keep.reshape(24, -1, m).sum(dim=2) == n).all()
    # magnitude's N:M keeps each group's n largest
    groups, kept = w.abs().reshape(24, -1, m), masks[0].reshape(24, -1, m)
    assert (groups.masked_fill(~kept, float("inf")).amin(2) >= groups.masked_fill(kept, -1).amax(2)).all()


def test_wanda_with_equal_input_norms_is_magnitude_per_row():
    w = weights()
    for target in ({"sparsity": 0.5}, {"nm": (2, 4)}):
        assert torch.equal(wanda_mask(w, torch.full((64,), 3.0), **target), magnitude_mask(w, per_row=True, **target))


def test_wanda_keeps_small_weights_that_meet_large_inputs():
    w, norms = weights(), torch.ones(64)
    w[:, 5] = 1e-3  # the smallest weights of every row ...
    norms[5] = 1e6  # ... on an input a million times larger than the rest
    assert wanda_mask(w, norms, sparsity=0.5)[:, 5].all()
    assert not magnitude_mask(w, sparsity=0.5, per_row=True)[:, 5].any()


def test_sparsegpt_with_identity_hessian_is_magnitude_per_block_and_moves_nothing():
    w = weights(K=256)
    pruned, keep = sparsegpt(w, torch.eye(256), sparsity=0.5, block_size=128)
    for block in (slice(0, 128), slice(128, 256)):  # the reference picks over a block's columns, all rows
        assert torch.equal(keep[:, block], magnitude_mask(w[:, block], sparsity=0.5))
    assert torch.equal(pruned, w * keep)
    pruned, keep = sparsegpt(w, torch.eye(256), nm=(2, 4))
    assert torch.equal(keep, magnitude_mask(w, nm=(2, 4))) and torch.equal(pruned, w * keep)


def test_sparsegpt_with_diagonal_hessian_is_wanda():
    w, h = weights(), torch.rand(64) + 0.1  # H = diag(‖X_j‖²)
    pruned, keep = sparsegpt(w, torch.diag(h), nm=(2, 4), percdamp=0.0)
    assert torch.equal(keep, wanda_mask(w, h.sqrt(), nm=(2, 4))) and torch.equal(pruned, w * keep)
    pruned, keep = sparsegpt(w, torch.diag(h), sparsity=0.5, percdamp=0.0)
    scores = w.abs() * h.sqrt()
    assert torch.equal(keep, mask_from_scores(scores, sparsity=0.5, per_row=False))


@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"nm": (2, 4)}, {"sparsity": 0.7}])
def test_sparsegpt_output_error_is_lower_than_wanda_and_magnitude(target):
    w, x = weights(), correlated_inputs()
    pruned, keep = sparsegpt(w, x.T @ x, **target)
    assert torch.equal(pruned == 0, ~keep)  # zeros exactly where pruned; the survivors moved
    assert not torch.equal(pruned[keep], w[keep])
    ours = output_error(x, w, pruned)
    wanda = output_error(x, w, w * wanda_mask(w, x.norm(dim=0), **target))
    magnitude = output_error(x, w, w * magnitude_mask(w, **target))
    assert ours < 0.8 * wanda and ours < 0.8 * magnitude


def test_sparsegpt_blocks_have_the_exact_sparsity_and_dead_inputs_are_zeroed():
    w, x = weights(K=192), correlated_inputs(K=192)
    x[:, 7] = 0  # an input never active in calibration
    pruned, keep = sparsegpt(w, x.T @ x, sparsity=0.5, block_size=64)
    for start in range(0, 192, 64):
        assert int((~keep[:, start:start + 64]).sum()) == 24 * 64 // 2
    assert (pruned[:, 7] == 0).all()


@pytest.mark.parametrize("nm", NM)
def test_sparsegpt_lazy_block_updates_equal_one_block(nm):
    """The lazy batch update is an exact reformulation (SparseGPT, sec. 3.2): blocks of 8 columns
    pass on their errors to the later columns in one product and must prune as one block of 64."""
    w, x = weights(), correlated_inputs()
    pruned, keep = sparsegpt(w, x.T @ x, nm=nm, block_size=8)
    whole, whole_keep = sparsegpt(w, x.T @ x, nm=nm, block_size=128)
    assert torch.equal(keep, whole_keep)
    torch.testing.assert_close(pruned, whole, rtol=0, atol=1e-5)


def test_bad_targets_name_the_field():
    w = weights(K=30)
    with pytest.raises(ValueError, match="exactly one"):
        magnitude_mask(w)
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_mask(w, sparsity=1.0)
    with pytest.raises(ValueError, match="nm: groups of 4 do not divide 30"):
        magnitude_mask(w, nm=(2, 4))
    with pytest.raises(ValueError, match="input_norms"):
        wanda_mask(w, torch.ones(29), sparsity=0.5)
