"""Structured pruning returns a smaller Transformer that computes what the
original computes without the removed parts: 0% changes nothing; channels,
heads and experts planted to contribute nothing are the ones removed, with
the same logits; removed heads equal the original with those heads' outputs
zeroed; the result saves and loads as a plain checkpoint."""
from __future__ import annotations

import pytest
import torch

import heron
from heron.compress.prune_structured import (
    expert_counts,
    prune_experts,
    prune_heads,
    prune_mlp_channels,
    remove_experts,
    remove_head_groups,
    remove_mlp_channels,
)
from heron.core import MoEConfig, Transformer
from heron.train.checkpoint import save_model_folder

from compress_helpers import V, tiny

torch.set_num_threads(1)


def tiny_moe(seed: int = 0, top_k: int = 2, **overrides) -> Transformer:
    return tiny(seed, feed_forward=("dense", "moe"), moe=MoEConfig(n_experts=6, top_k=top_k), **overrides)


def ids(B: int = 4, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


CALIB = [ids(seed=s) for s in range(3)]


def logits(model: Transformer, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids(seed=9) if x is None else x).logits


def size(model: Transformer) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("prune", [
    lambda m: prune_mlp_channels(m, 0.0, CALIB), lambda m: prune_mlp_channels(m, 0.0),
    lambda m: prune_heads(m, 0.0, CALIB), lambda m: prune_experts(m, 6, CALIB),
])
def test_pruning_nothing_changes_nothing(prune):
    model = tiny_moe(n_kv_heads=2)
    small = prune(model)
    assert small is not model and small.config == model.config
    assert torch.equal(logits(small), logits(model))


@pytest.mark.parametrize("prune", [
    lambda m: prune_mlp_channels(m, 0.25, CALIB), lambda m: prune_heads(m, 0.5), lambda m: prune_experts(m, 4, CALIB),
])
def test_a_pruned_bf16_model_runs_in_bf16_as_its_parts_cast(prune):
    """The rebuilt model's RoPE tables follow its bf16 weights (fp32 ones failed its first
    forward), and it computes what the same kept parts computed in fp32, cast."""
    small = prune(tiny_moe(n_kv_heads=2).to(torch.bfloat16))
    assert small.rope_cos.dtype == small.rope_sin.dtype == torch.bfloat16
    cast = Transformer(small.config).eval()
    cast.load_state_dict({name: w.float() for name, w in small.state_dict().items()})
    out = logits(small)
    assert out.dtype == torch.bfloat16 and torch.equal(out, logits(cast.to(torch.bfloat16)))


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("calibrated", [True, False])
def test_planted_dead_channels_are_removed_with_identical_logits(mlp, calibrated):
    model = tiny(mlp=mlp, d_ff=128)
    dead = {0: torch.tensor([3, 17, 40, 41, 64, 90, 100, 127]), 1: torch.tensor([0, 5, 9, 33, 50, 77, 101, 120])}
    with torch.no_grad():
        for i, channels in dead.items():
            model.blocks[i].mlp.down.weight[:, channels] = 0  # they write nothing to the residual stream
    small = prune_mlp_channels(model, 0.25 / 4, CALIB if calibrated else None)  # 8 of 128
    assert small.config.d_ff == 120 and small.blocks[0].mlp.down.in_features == 120
    assert size(small) < size(model)
    torch.testing.assert_close(logits(small), logits(model), rtol=0, atol=1e-5)
    for i, channels in dead.items():  # the kept hidden activations are the original's other channels
        kept = [j for j in range(128) if j not in channels.tolist()]
        torch.testing.assert_close(small.blocks[i].mlp.down.weight, model.blocks[i].mlp.down.weight[:, kept])


def test_mlp_channels_in_a_moe_model_leave_the_experts_alone():
    model = tiny_moe()
    small = prune_mlp_channels(model, 0.25, CALIB)
    assert small.config.resolved_d_ff == 3 * model.config.resolved_d_ff // 4
    assert small.config.resolved_expert_d_ff == model.config.resolved_expert_d_ff  # pinned in moe.d_ff
    assert torch.equal(small.blocks[1].mlp.up, model.blocks[1].mlp.up)


def test_mlp_channels_skip_attention_only_layers():
    model = tiny(feed_forward=("none", "dense"), d_ff=128)
    small = prune_mlp_channels(model, 0.25, CALIB)
    assert small.blocks[0].mlp is None and small.blocks[1].mlp.down.in_features == 96


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_removed_heads_equal_the_original_with_those_heads_zeroed(n_kv_heads):
    model = tiny(n_heads=8, n_kv_heads=n_kv_heads)
    n_kv, hd = model.config.resolved_kv_heads, 8
    G = 8 // n_kv  # query heads per group
    keep = [torch.tensor(k) for k in {8: ([0, 2, 3, 6, 7], [1, 2, 4, 5, 7]), 2: ([0], [1]), 1: ([0], [0])}[n_kv]]
    small = remove_head_groups(model, keep)
    assert small.config.n_heads == len(keep[0]) * G and small.config.resolved_head_dim == hd
    with torch.no_grad():  # known answer: zero the removed query heads' columns of `out`
        for i, groups in enumerate(keep):
            for g in set(range(n_kv)) - set(groups.tolist()):
                model.blocks[i].attn.out.weight[:, g * G * hd:(g + 1) * G * hd] = 0
    torch.testing.assert_close(logits(small), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("calibrated", [True, False])
def test_prune_heads_removes_groups_that_contribute_nothing(calibrated):
    model = tiny(n_heads=8, n_kv_heads=4)
    with torch.no_grad():  # group 1 in layer 0, group 3 in layer 1: query heads 2-3 and 6-7
        model.blocks[0].attn.out.weight[:, 16:32] = 0
        model.blocks[1].attn.out.weight[:, 48:64] = 0
    small = prune_heads(model, 0.25, CALIB if calibrated else None)
    assert (small.config.n_heads, small.config.n_kv_heads) == (6, 3)
    assert small.blocks[0].attn.qkv.out_features == 3 * 64 // 4 + 2 * 3 * 8
    torch.testing.assert_close(logits(small), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_experts_never_routed_to_are_removed_with_identical_logits(top_k):
    model = tiny_moe(top_k=top_k)
    never = {1: [1, 4]}  # layer 1's experts 1 and 4 get a router bias of -inf: never chosen

    def bias(logits_: torch.Tensor, _name: str) -> torch.Tensor:
        return logits_.index_fill(-1, torch.tensor(never[1]), float("-inf"))

    routed = {"blocks.1.mlp.hook_router_logits": bias}
    with model.hooks(routed):
        assert expert_counts(model, CALIB)[1][never[1]].sum() == 0
        small = prune_experts(model, 4, CALIB)
        want = logits(model)
    assert small.config.moe.n_experts == 4 and small.blocks[1].mlp.up.shape[0] == 4
    assert torch.equal(small.blocks[1].mlp.router.weight, model.blocks[1].mlp.router.weight[[0, 2, 3, 5]])
    torch.testing.assert_close(logits(small), want, rtol=0, atol=1e-5)


def test_a_pruned_model_saves_and_loads_as_a_plain_checkpoint(tmp_path):
    model = tiny_moe(n_kv_heads=2)
    small = prune_experts(prune_heads(prune_mlp_channels(model, 0.25, CALIB), 0.5, CALIB), 3, CALIB)
    save_model_folder(tmp_path / "small", small)
    loaded, _ = heron.load(tmp_path / "small")
    assert loaded.config == small.config and loaded.config.n_kv_heads == 1 and loaded.config.moe.n_experts == 3
    assert torch.equal(logits(loaded), logits(small))


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match=r"mlp_channels: expected a value in \[0, 1\), got 1.0"):
        prune_mlp_channels(tiny(), 1.0)
    with pytest.raises(ValueError, match=r"^experts: the model has no MoE layers; keeping 2 experts"):
        prune_experts(tiny(), 2, CALIB)
    with pytest.raises(ValueError, match=r"^experts: expected 3\.\.6 experts kept .* got 2$"):
        prune_experts(tiny_moe(top_k=3), 2, CALIB)  # 3 is the smallest that still serves top_k
    with pytest.raises(ValueError, match=r"^mlp_channels: the model has no dense MLP layers to prune"):
        prune_mlp_channels(tiny(feed_forward=("moe",), moe=MoEConfig(n_experts=4)), 0.25)
    with pytest.raises(ValueError, match="calibration"):
        prune_experts(tiny_moe(), 4, None)


@pytest.mark.parametrize("prune, message", [
    # one key/value head (MQA): 0.6 of 1 rounded to all; keeping it anyway returned the model unchanged
    (lambda: prune_heads(tiny(n_kv_heads=1), 0.6), r"^heads: each layer has only one, which must stay"),
    # 0.9 of 2 groups rounds to both; keeping one anyway removed half of what was asked
    (lambda: prune_heads(tiny(n_heads=4, n_kv_heads=2), 0.9), r"^heads: 0\.9 of 2 rounds to all 2 removed"),
    (lambda: prune_mlp_channels(tiny(d_ff=128), 0.999, CALIB),
     r"^mlp_channels: 0\.999 of 128 rounds to all 128 removed; at least one must stay \(give at most 0\.992\)$"),
])
def test_a_fraction_that_removes_every_part_is_refused_not_clamped(prune, message):
    with pytest.raises(ValueError, match=message):
        prune()


@pytest.mark.parametrize("remove, message", [
    (lambda: remove_mlp_channels(tiny(d_ff=32), {0: torch.tensor([0, 0, 5]), 1: torch.tensor([1, 2, 3])}),
     r"^keep: layer 0 keeps channels \[0, 0, 5\]; expected 1 to 32 distinct indices in 0\.\.31$"),
    (lambda: remove_mlp_channels(tiny(d_ff=32), {0: torch.tensor([0, 40]), 1: torch.tensor([1, 2])}),
     r"^keep: layer 0 keeps channels \[0, 40\]"),  # was an IndexError about index 72 of the fused up
    (lambda: remove_head_groups(tiny(n_heads=4), [torch.tensor([1, 2]), torch.tensor([3, 3])]),
     r"^keep: layer 1 keeps key/value groups \[3, 3\]; expected 1 to 4 distinct"),
    (lambda: remove_head_groups(tiny(n_heads=4), [torch.tensor([], dtype=torch.long)] * 2),
     r"^keep: layer 0 keeps key/value groups \[\]"),
    (lambda: remove_experts(tiny_moe(), {1: torch.tensor([0, 0, 1])}), r"^keep: layer 1 keeps experts \[0, 0, 1\]"),
])
def test_kept_indices_must_be_distinct_and_in_range(remove, message):
    """A repeated index silently copied a channel, head group or expert (its output counted twice)."""
    with pytest.raises(ValueError, match=message):
        remove()
