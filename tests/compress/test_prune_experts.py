"""Pruning a MoE's routed experts: every expert matrix against a reference
worked out by hand from the tokens routed to it (each MoE's input routed by
its own router and gathered per expert, the down matrix fed the hidden
activations of the pruned up), exact sparsity and 2:4 per expert, masks that
recovery keeps, and the documented fallback for an expert no calibration
token reached."""
from __future__ import annotations

import pytest
import torch

from heron.compress.calibration import block_experts
from heron.compress.gptq import HessianAccumulator
from heron.compress.prune import magnitude_mask, sparsegpt
from heron.compress.prune_model import METHODS, prunable_weights, prune_model, recover, sparsity_of
from heron.core import MoEConfig, Transformer
from heron.core.mlp import activate

from compress_helpers import V, tiny

torch.set_num_threads(1)

E = 4  # experts per MoE layer


def moe_model(seed: int = 0) -> Transformer:
    """Two MoE blocks of 4 experts, top-2, with a shared expert: up (4, 64, 192), down (4, 96, 64)."""
    return tiny(seed, feed_forward=("moe",), moe=MoEConfig(n_experts=E, top_k=2, shared_expert=True))


def token_batches(n: int = 4, B: int = 4, T: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, T), generator=g) for _ in range(n)]


def routed_rows(model: Transformer, batches: list[torch.Tensor]) -> dict[str, list[list[torch.Tensor]]]:
    """{stacked expert weight: per expert, the rows it multiplies in each batch}, the slow
    obvious way: each MoE's input, its router's top-k of the softmax, the tokens that
    chose expert e in token order; for `down`, those rows through expert e's `up`."""
    rows: dict[str, list[list[torch.Tensor]]] = {name: [[] for _ in range(E)] for name in block_experts(model)}

    def capture(i: int):
        def hook(_module, _args, out):  # out (B, T, d): the MoE's input
            moe = model.blocks[i].mlp
            x = out.reshape(-1, out.shape[-1])  # (N, d)
            chosen = moe.router(x).float().softmax(dim=-1).topk(moe.settings.top_k).indices  # (N, k)
            for e in range(E):
                mine = x[(chosen == e).any(dim=-1)]  # (n_e, d)
                rows[f"blocks.{i}.mlp.up"][e].append(mine)
                rows[f"blocks.{i}.mlp.down"][e].append(activate(mine @ moe.up[e], moe.kind))  # (n_e, ff)
        return hook

    handles = [block.mlp_norm.register_forward_hook(capture(i)) for i, block in enumerate(model.blocks)]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for handle in handles:
        handle.remove()
    return rows


def originals(model: Transformer) -> dict[str, torch.Tensor]:
    return {name: w.detach().clone() for name, w in block_experts(model).items()}


def test_moe_weights_are_all_pruned_but_the_router():
    model = moe_model()
    router = model.blocks[0].mlp.router.weight.detach().clone()
    masks = prune_model(model, "sparsegpt", sparsity=0.5, calibration=token_batches(), progress=False)
    assert list(masks) == list(prunable_weights(model))
    assert list(masks)[:6] == ["blocks.0.attn.qkv.weight", "blocks.0.attn.out.weight", "blocks.0.mlp.shared.up.weight",
                               "blocks.0.mlp.shared.down.weight", "blocks.0.mlp.up", "blocks.0.mlp.down"]
    assert masks["blocks.0.mlp.up"].shape == (E, 64, 192) and masks["blocks.1.mlp.down"].shape == (E, 96, 64)
    assert (model.blocks[0].mlp.shared.up.weight == 0).float().mean() == 0.5
    assert torch.equal(model.blocks[0].mlp.router.weight, router)


def test_magnitude_keeps_the_larger_half_of_each_expert_matrix():
    model = moe_model()
    with torch.no_grad():
        model.blocks[0].mlp.up[0] *= 10  # one loud expert: a comparison over the whole stack would spare it
    original = originals(model)
    masks = prune_model(model, "magnitude", sparsity=0.5, progress=False)
    for name, stack in original.items():
        for e, w in enumerate(stack):
            smaller_half = w.abs().flatten().kthvalue(w.numel() // 2).values  # the largest magnitude pruned
            assert torch.equal(masks[name][e], w.abs() > smaller_half), (name, e)


@pytest.mark.parametrize("method", METHODS)
def test_every_expert_matrix_loses_exactly_half(method):
    model = moe_model()
    masks = prune_model(model, method, sparsity=0.5, calibration=token_batches(), progress=False)
    for name, stack in block_experts(model).items():
        for e in range(E):
            keep = masks[name][e]  # (K, N): one expert's matrix as stored
            assert int((~keep).sum()) == keep.numel() // 2, (name, e)
            assert (stack[e][~keep] == 0).all(), (name, e)
            if method == "wanda":  # per output row: a column of the stored (K, N) matrix
                assert ((~keep).sum(dim=0) == keep.shape[0] // 2).all(), (name, e)
    assert sparsity_of(model) == pytest.approx(0.5)


@pytest.mark.parametrize("method", METHODS)
def test_two_four_holds_on_every_expert(method):
    model = moe_model()
    masks = prune_model(model, method, nm=(2, 4), calibration=token_batches(), progress=False)
    for name, stack in block_experts(model).items():
        for e in range(E):
            keep, w = masks[name][e].T, stack[e].T  # (N out, K in): groups of 4 run along the inputs
            assert (keep.reshape(keep.shape[0], -1, 4).sum(dim=2) == 2).all(), (name, e)
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(dim=2) <= 2).all(), (name, e)


def test_wanda_masks_come_from_each_experts_own_routed_tokens():
    """Known answer, by hand: |W_ij| * ||X_j|| over the tokens routed to the expert
    (the down matrix: their hidden activations through the pruned up), the larger
    half of each output row kept; both blocks, so block 1 is calibrated on block 0 pruned."""
    model, batches = moe_model(), token_batches()
    original = originals(model)
    masks = prune_model(model, "wanda", sparsity=0.5, calibration=batches, batch_size=4, progress=False)
    for name, experts in routed_rows(model, batches).items():
        for e, rows in enumerate(experts):
            assert sum(len(r) for r in rows) > 0
            sums = torch.zeros(rows[0].shape[1])  # (K,)
            for r in rows:
                sums += r.square().sum(dim=0)
            scores = original[name][e].T.abs() * sums.sqrt()  # (N, K)
            pruned_largest = scores.sort(dim=1).values[:, scores.shape[1] // 2 - 1, None]  # (N, 1)
            assert torch.equal(masks[name][e].T, scores > pruned_largest), (name, e)


def test_sparsegpt_on_an_expert_is_sparsegpt_on_the_hessian_of_its_routed_tokens():
    model, batches = moe_model(), token_batches()
    original = originals(model)
    masks = prune_model(model, "sparsegpt", sparsity=0.5, calibration=batches, progress=False)
    pruned = block_experts(model)
    for name, experts in routed_rows(model, batches).items():
        for e, rows in enumerate(experts):
            hessian = HessianAccumulator(rows[0].shape[1])
            for r in rows:
                if len(r):
                    hessian.add(r)
            assert hessian.rows > 0
            w, keep = sparsegpt(original[name][e].T, hessian.H, sparsity=0.5)
            assert torch.equal(masks[name][e].T, keep), (name, e)
            # the model's expert products may split their rows between oneDNN and MKL (core/gemm.py),
            # the reference's `@` is MKL's alone: the down inputs, and so the weights, can differ in the last bit
            torch.testing.assert_close(pruned[name][e].T, w, rtol=1e-6, atol=1e-7, msg=f"{name} {e}")


def test_an_expert_routed_no_calibration_token_falls_back_to_magnitude_with_a_warning():
    """One calibration token, top-2 of 4: two experts of each layer see nothing."""
    model, one = moe_model(), torch.tensor([[7]])
    original = originals(model)
    with pytest.warns(UserWarning) as caught:
        masks = prune_model(model, "wanda", sparsity=0.5, calibration=one, progress=False)
    loads: dict[str, torch.Tensor] = {}
    with model.hooks({f"blocks.{i}.mlp.hook_expert_load": lambda c, name: loads.__setitem__(name, c) for i in (0, 1)}):
        model(one)  # the pruned model routes the token as calibration did: each block was pruned before the next
    idle = {i: [e for e in range(E) if loads[f"blocks.{i}.mlp.hook_expert_load"][e] == 0] for i in (0, 1)}
    assert all(len(experts) == 2 for experts in idle.values())
    assert sorted(str(w.message) for w in caught) == sorted(
        f"blocks.{i}.mlp.{p}: experts {idle[i]} were routed no calibration tokens; pruned by magnitude instead of wanda"
        for i in idle for p in ("up", "down"))
    for name, stack in original.items():
        i = int(name.split(".")[1])
        for e in range(E):
            by_magnitude = torch.equal(masks[name][e].T, magnitude_mask(stack[e].T, sparsity=0.5))
            assert by_magnitude == (e in idle[i]), (name, e)


def test_recovery_keeps_expert_zeros_at_zero():
    model = moe_model(seed=1)
    masks = prune_model(model, "magnitude", sparsity=0.5, progress=False)
    before = originals(model)
    recover(model, token_batches(n=2, T=17), steps=3, lr=1e-2, masks=masks, progress=False)
    for name, stack in block_experts(model).items():
        keep = masks[name]
        assert (stack[~keep] == 0).all(), name
        assert not torch.equal(stack[keep], before[name][keep]), name  # the survivors did train
    recover(model, token_batches(n=2, T=17), steps=2, lr=1e-2, progress=False)  # masks None: the zeros found
    for name, stack in block_experts(model).items():
        assert (stack[~masks[name]] == 0).all(), name
    with pytest.raises(ValueError, match=r"masks: blocks.0.mlp.up has shape \(64, 192\)"):
        recover(model, token_batches(n=1, T=17), steps=1, lr=1e-2, masks={"blocks.0.mlp.up": masks["blocks.0.mlp.up"][0]})


def test_sparsity_counts_the_experts():
    model = moe_model()
    with torch.no_grad():
        for w in block_experts(model).values():
            w.zero_()
    experts = sum(w.numel() for w in block_experts(model).values())
    assert sparsity_of(model) == experts / sum(w.numel() for w in prunable_weights(model).values())
