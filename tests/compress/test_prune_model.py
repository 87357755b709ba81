"""Pruning a whole Transformer: exact sparsity per linear, calibration that
runs block by block on already-pruned inputs (every mask equals the one the
linear's inputs in the final pruned model give), and a masked recovery
fine-tune that keeps zeros at zero while the loss falls. A MoE's experts:
test_prune_experts.py."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from heron.compress.prune import wanda_mask
from heron.compress.prune_model import prune_model, recover, sparsity_of
from heron.compress.calibration import block_linears

from compress_helpers import V, tiny

torch.set_num_threads(1)


def token_batches(n: int = 4, B: int = 4, T: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, T), generator=g) for _ in range(n)]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_block_linear_is_pruned_to_the_target(method):
    model = tiny(n_kv_heads=2)
    embed = model.embed.weight.detach().clone()
    masks = prune_model(model, method, sparsity=0.5, calibration=token_batches(), progress=False)
    linears = block_linears(model)
    assert sorted(masks) == sorted(f"{name}.weight" for name in linears)
    for name, layer in linears.items():
        keep = masks[f"{name}.weight"]
        assert int((~keep).sum()) == layer.weight.numel() // 2, name
        assert (layer.weight[~keep] == 0).all(), name
        assert not layer.weight[~keep].signbit().any(), name  # +0.0: a -0.0 costs a sparse checkpoint 4 bytes
        if method == "wanda":  # per output row
            assert ((~keep).sum(dim=1) == layer.in_features // 2).all(), name
    assert sparsity_of(model) == pytest.approx(0.5)
    assert torch.equal(model.embed.weight, embed)  # embeddings and head stay dense


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_sparsity_holds_in_every_group(method):
    model = tiny(mlp="gelu")
    prune_model(model, method, nm=(2, 4), calibration=token_batches(), progress=False)
    for name, layer in block_linears(model).items():
        groups = (layer.weight != 0).reshape(layer.out_features, -1, 4).sum(dim=2)
        assert (groups <= 2).all() and int(groups.sum()) >= 0.999 * layer.weight.numel() / 2, name


def test_calibration_is_sequential_on_pruned_inputs():
    """Known answer: each linear's Wanda mask is the one computed from the
    inputs that linear receives in the final, fully pruned model, because
    everything before it was pruned before it was calibrated."""
    model, batches = tiny(), token_batches()
    original = {name: layer.weight.detach().clone() for name, layer in block_linears(model).items()}
    masks = prune_model(model, "wanda", sparsity=0.5, calibration=batches, batch_size=4, progress=False)
    sums = {name: torch.zeros(layer.in_features) for name, layer in block_linears(model).items()}

    def add(name: str):
        def hook(_module, _args, out):
            sums[name].add_(out.reshape(-1, out.shape[-1]).square().sum(0))
        return hook

    # Each linear's input, read where it is made: the norms, the heads' outputs, the hidden activation.
    sources = {"attn.qkv": "attn_norm", "attn.out": "attn.hook_z", "mlp.up": "mlp_norm", "mlp.down": "mlp.hook_post"}
    handles = []
    for name in sums:
        i, suffix = name.split(".", 2)[1:]  # blocks.{i}.{suffix}
        handles.append(model.get_submodule(f"blocks.{i}.{sources[suffix]}").register_forward_hook(add(name)))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for handle in handles:
        handle.remove()
    for name, w in original.items():
        assert torch.equal(masks[f"{name}.weight"], wanda_mask(w, sums[name].sqrt(), sparsity=0.5)), name


def test_sparsegpt_changes_the_model_less_than_magnitude():
    batches = token_batches(n=6)
    reference = tiny(init_std=0.2)
    with torch.no_grad():
        want = torch.cat([reference(ids).logits for ids in batches])
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(reference)
        prune_model(model, method, sparsity=0.5, calibration=batches, progress=False)
        with torch.no_grad():
            errors[method] = float((torch.cat([model(ids).logits for ids in batches]) - want).norm())
    assert errors["sparsegpt"] < errors["magnitude"] and errors["wanda"] < errors["magnitude"]


def test_recovery_keeps_zeros_and_lowers_the_loss():
    """A tiny synthetic next-token task: each token is the previous one plus one."""
    model = tiny(seed=1)
    g = torch.Generator().manual_seed(3)
    starts = torch.randint(0, V, (8, 8, 1), generator=g)
    batches = [(s + torch.arange(17)) % V for s in starts]  # 8 batches of (8, 17)
    masks = prune_model(model, "magnitude", sparsity=0.5, progress=False)
    losses = recover(model, batches, steps=40, lr=3e-3, masks=masks, progress=False)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    for name, layer in block_linears(model).items():
        pruned = layer.weight[~masks[f"{name}.weight"]]
        assert (pruned == 0).all() and not pruned.signbit().any(), name
    assert not model.training


def test_recovery_without_masks_keeps_the_zeros_it_finds():
    model = tiny()
    prune_model(model, "magnitude", nm=(2, 4), progress=False)
    recover(model, token_batches(n=2, T=17), steps=3, lr=1e-2, progress=False)
    assert sparsity_of(model) >= 0.5


def test_errors_name_what_is_wrong():
    model = tiny()
    with pytest.raises(ValueError, match="calibration"):
        prune_model(model, "wanda", sparsity=0.5)
    with pytest.raises(ValueError, match="method"):
        prune_model(model, "random", sparsity=0.5)
    with pytest.raises(ValueError, match="groups of 3"):
        prune_model(model, "magnitude", nm=(1, 3))


def test_recovery_with_no_batches_is_refused_not_skipped():
    """Cycling an empty list ran no step and returned [], the model handed back unrecovered."""
    model = tiny()
    with pytest.raises(ValueError, match=r"^token_batches: empty; 3 recovery steps need at least one"):
        recover(model, [], steps=3, lr=1e-3, progress=False)
    assert not model.training


def test_calibration_and_recovery_batches_may_be_numpy_arrays():
    from heron.compress.calibration import calibration_batches

    ids = np.arange(48).reshape(4, 12) % V
    assert [b.tolist() for b in calibration_batches(ids, 2)] == [b.tolist() for b in torch.as_tensor(ids).split(2)]
    model = tiny()
    masks = prune_model(model, "wanda", sparsity=0.5, calibration=ids, progress=False)
    assert recover(model, [ids], steps=1, lr=1e-3, masks=masks, progress=False)[0] > 0


@pytest.mark.parametrize("lr, steps, caught", [
    (1e30, 3, r"step 2: the (training loss|gradient norm) is (nan|inf)"),  # the 2nd forward overflows
    (1e39, 3, r"step 2: the (training loss|gradient norm) is (nan|inf)"),  # the 1st update overflows fp32
    (1e39, 1, r"step 1: \d+ weight tensor\(s\) hold NaN or infinite values"),  # ... and no next step shows it
])
def test_a_diverging_recovery_raises_before_keeping_the_step(lr, steps, caught):
    """Known answer: step 1 at lr 1e30 moves weights to ~1e30, still finite, and its loss is
    finite; step 2's gradients are not, so that update is refused and every weight stays finite."""
    from heron.train.loop import DivergedError

    model = tiny()
    masks = prune_model(model, "magnitude", sparsity=0.5, progress=False)
    with pytest.raises(DivergedError, match=caught):
        recover(model, token_batches(n=2, T=17), steps=steps, lr=lr, masks=masks, progress=False)
    if lr == 1e30:
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not model.training  # handed back in the mode it was in, raised or not
