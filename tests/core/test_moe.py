"""Mixture of Experts: the sorted, grouped dispatch against a token-by-token
reference; the routing losses against values worked out by hand; routing
statistics; and a Transformer with MoE layers (cached decoding and left padding
are checked with the other variants in test_transformer.py)."""
from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from heron.core import ModelConfig, Transformer, attach_hooks, hook_points
from heron.core.config import MoEConfig
from heron.core.mlp import MLP
from heron.core.moe import MoE, expert_capacity, grouped_matmul, load_balancing_loss, router_z_loss, share_batch_statistics

E = 4  # experts in the layer-level tests


def make_moe(seed: int = 0, mlp: str = "swiglu", **moe) -> MoE:
    """A MoE layer (d=16, 4 experts of width 8) with weights large enough that
    routing is decisive and outputs are of order one."""
    torch.manual_seed(seed)
    settings = MoEConfig(**{"n_experts": E, "top_k": 2, "d_ff": 8, **moe})
    config = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, mlp=mlp,
                         feed_forward=("moe",), moe=settings)
    layer = MoE(config)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def expert(layer: MoE, e: int, v: torch.Tensor) -> torch.Tensor:
    """Expert e as a plain dense MLP on one token v (d,)."""
    h = v @ layer.up[e]  # (width,)
    if layer.kind == "swiglu":
        gate, up = h.chunk(2)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h)
    return h @ layer.down[e]  # (d,)


def reference_moe(layer: MoE, x: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
    """The slow, obvious MoE: token by token, softmax over the router's logits,
    top-k, renormalise (k > 1), times the routed scale, each chosen expert as
    a dense MLP. An expert that already took `capacity` assignments (counted
    in token order) adds nothing. With router centring the router scores the
    token minus the mean input. With `counted` (B, T) bool, capacity and mean
    are the counted tokens', and those take their slots before the rest."""
    s = layer.settings
    B, T, d = x.shape
    tokens = x.reshape(B * T, d)
    keep = torch.ones(B * T, dtype=torch.bool) if counted is None else counted.reshape(B * T)
    capacity = math.inf
    if s.capacity_factor is not None and layer.training:
        # Exact: in floats 1.1 * 100 / 11 is 10.000000000000002, and ceil would give 11.
        capacity = math.ceil(Fraction(str(s.capacity_factor)) * int(keep.sum()) * s.top_k / s.n_experts)
    center = torch.zeros(d)  # router centring: the batch's mean in training, the running mean in eval
    if s.router_centering:
        center = tokens.detach()[keep].mean(dim=0) if layer.training else layer.router_center
    taken = [0] * s.n_experts
    rows = [torch.zeros(d)] * (B * T)
    for t in sorted(range(B * T), key=lambda t: not keep[t]):  # counted first, then the rest; each in token order
        probs = torch.softmax((tokens[t] - center) @ layer.router.weight.T, dim=-1)  # (E,)
        top = torch.topk(probs, s.top_k)
        gates = (top.values / top.values.sum() if s.top_k > 1 else top.values) * s.routed_scale
        row = torch.zeros(d)
        for gate, e in zip(gates, top.indices.tolist()):
            if taken[e] < capacity:
                row = row + gate * expert(layer, e, tokens[t])
            taken[e] += 1
        if layer.shared is not None:
            row = row + layer.shared(tokens[t])
        rows[t] = row
    return torch.stack(rows).view(B, T, d)


CASES = {
    "top1": dict(top_k=1),
    "top2": dict(top_k=2),
    "top2_shared": dict(top_k=2, shared_expert=True),
    "top1_capacity": dict(top_k=1, capacity_factor=0.5),
    "top2_capacity_shared": dict(top_k=2, capacity_factor=0.5, shared_expert=True),
    "top3_gelu": dict(top_k=3, mlp="gelu"),
    "top2_centred": dict(top_k=2, router_centering=True),
    "top2_scaled": dict(top_k=2, routed_scale=2.0),
    "top1_scaled_capacity": dict(top_k=1, routed_scale=2.5, capacity_factor=0.5),
}


def assert_rounding_close(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    """Equal to fp32 rounding: within 1e-6 of the largest magnitude (at least 1e-6). The fast
    path sums in another order (gates scale the hidden rows, not the outputs), and the
    gradients here run to ~75, where a few ulps exceed an absolute 1e-5."""
    tolerance = 1e-6 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= tolerance, name


@pytest.mark.parametrize("case", CASES)
def test_fast_path_matches_the_reference_forward_and_backward(case):
    settings = dict(CASES[case])
    mlp = settings.pop("mlp", "swiglu")
    fast, slow = make_moe(mlp=mlp, **settings).train(), make_moe(mlp=mlp, **settings).train()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    x_fast, x_slow = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_slow = fast(x_fast), reference_moe(slow, x_slow)
    assert_rounding_close(y_fast, y_slow)
    (y_fast * grad_out).sum().backward()
    (y_slow * grad_out).sum().backward()
    assert_rounding_close(x_fast.grad, x_slow.grad)
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        assert_rounding_close(p.grad, q.grad, name)
    if "capacity_factor" in settings:  # the case really drops something
        assert fast.last_stats["dropped_fraction"] > 0


@pytest.mark.parametrize("case", ["top1", "top2", "top2_shared", "top3_gelu", "top2_centred", "top2_scaled"])
def test_decoding_a_few_tokens_goes_straight_through_the_experts_and_matches_the_reference(case):
    settings = dict(CASES[case])
    mlp = settings.pop("mlp", "swiglu")
    layer = make_moe(mlp=mlp, **settings).eval()
    x = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert layer.decodes(x.reshape(3, 16))
        direct = layer(x)
        stats = layer.last_stats
        stepped = layer.decode_step()(x)  # a decoding step's path: the same sums, weights looked up once
        assert torch.equal(stepped, direct)
        assert all(torch.equal(layer.last_stats[key], value) for key, value in stats.items())
        with attach_hooks(layer, {"hook_expert_in": lambda rows, name: None}):  # an expert hook: sorted dispatch
            assert not layer.decodes(x.reshape(3, 16))
            dispatched = layer(x)
            assert torch.equal(layer.last_stats["load"], stats["load"])
    assert torch.allclose(direct, reference_moe(layer, x), atol=1e-5)
    assert torch.allclose(direct, dispatched, atol=1e-6)
    assert stats["load"].sum().item() == pytest.approx(1.0) and stats["dropped_fraction"].item() == 0


def test_grouped_matmul_fused_equals_the_loop_over_experts():
    x = torch.randn(10, 8)
    w = torch.randn(4, 8, 12)  # rows of 32 and 48 bytes: aligned as grouped_mm needs
    counts = torch.tensor([3, 0, 6, 1])  # an expert with no rows
    looped = grouped_matmul(x, w, counts, fused=False)
    expected = torch.cat([x[:3] @ w[0], x[3:9] @ w[2], x[9:] @ w[3]])
    assert torch.allclose(looped, expected, atol=1e-6)
    assert torch.allclose(grouped_matmul(x, w, counts, fused=True), looped, atol=1e-6)
    # Unaligned rows (5 floats) fall back to the loop on their own.
    x5, w5 = x[:, :5].contiguous(), w[:, :5, :5].contiguous()
    assert torch.allclose(grouped_matmul(x5, w5, counts), grouped_matmul(x5, w5, counts, fused=False))
    # A few rows outside autograd (decoding with an expert hook attached) take the same paths.
    with torch.inference_mode():
        assert torch.allclose(grouped_matmul(x, w, counts), expected, atol=1e-6)
        one = torch.tensor([0, 0, 1, 0])  # a single decoded token's row, one expert
        assert torch.allclose(grouped_matmul(x[:1], w, one), x[:1] @ w[2], atol=1e-6)


# ----- router centring ------------------------------------------------------------


def test_centred_routing_ignores_a_vector_every_token_shares():
    """A large common vector decides an uncentred router's ranking for every token
    alike (one expert takes them all); a centred router routes x + c as it routes x."""
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(3))
    c = 20 * torch.randn(16, generator=torch.Generator().manual_seed(4))
    plain = make_moe(top_k=1).train()
    plain(x + c)
    assert plain.last_stats["max_load_over_fair"].item() == E  # collapsed: every token on one expert
    centred = make_moe(top_k=1, router_centering=True).train()
    logits = {}
    with attach_hooks(centred, {"hook_router_logits": lambda t, name: logits.setdefault(len(logits), t)}):
        centred(x)
        centred(x + c)
    assert torch.allclose(logits[0], logits[1], atol=1e-4)
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
    assert centred.last_stats["max_load_over_fair"].item() < E


def test_a_part_sharing_batch_statistics_trains_as_the_whole_batch():
    """Two processes holding the same half of a batch: a sum over processes doubles every
    statistic. Each half then centres, routes and balances as the whole batch does."""
    whole = make_moe(router_centering=True).train()
    part, alone = copy.deepcopy(whole), copy.deepcopy(whole)
    assert share_batch_statistics(part, lambda t: 2 * t) == 1
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(8)) + 3  # a common vector to centre away
    y_whole, y_part = whole(torch.cat([x, x])), part(x)
    aux_whole = whole.pop_aux_loss()
    torch.testing.assert_close(y_part, y_whole[:2])
    torch.testing.assert_close(part.pop_aux_loss(), aux_whole)
    torch.testing.assert_close(part.router_center, whole.router_center)
    y_alone = alone(x[:1])  # without sharing, a smaller part centres and balances on its own
    assert not torch.allclose(y_alone, y_whole[:1], atol=1e-3)
    assert not torch.allclose(alone.pop_aux_loss(), aux_whole)


def test_training_folds_batch_means_into_the_running_mean_that_eval_routes_on():
    layer = make_moe(router_centering=True)
    assert torch.equal(layer.router_center, torch.zeros(16))
    batches = [torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    layer.train()
    with torch.no_grad():
        for batch in batches:
            layer(batch)
    m0, m1 = (b.reshape(-1, 16).mean(0) for b in batches)
    assert torch.allclose(layer.router_center, 0.9 * (0.1 * m0) + 0.1 * m1, atol=1e-6)
    layer.eval()  # routing on the running mean: a token's output no longer depends on its batch
    x = batches[0]
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(x[:, t : t + 1]) for t in range(x.shape[1])], dim=1)
    assert torch.allclose(together, alone, atol=1e-6)
    assert torch.allclose(together, reference_moe(layer, x), atol=1e-5)
    # Evaluation changes nothing; the buffer is model state and travels with it.
    assert torch.allclose(layer.router_center, 0.9 * (0.1 * m0) + 0.1 * m1, atol=1e-6)
    assert "router_center" in layer.state_dict()
    assert "router_center" not in make_moe().state_dict()  # off: no buffer at all


def test_uncounted_tokens_are_routed_but_weigh_nothing_in_statistics_and_losses():
    """Known answer: with padding marked uncounted, the centring mean, the aux loss and the
    statistics are those of a forward over the counted tokens alone, and so are their outputs."""
    layer = make_moe(router_centering=True).train()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(11)) + 2
    counted = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])  # row 1 right-padded
    alone = copy.deepcopy(layer)
    y, y_alone = layer(x, counted), alone(x[counted].unsqueeze(0))  # (2, 6, 16), (1, 9, 16)
    aux = alone.pop_aux_loss()
    torch.testing.assert_close(y[counted], y_alone[0])
    torch.testing.assert_close(layer.pop_aux_loss(), aux)
    for name, value in alone.last_stats.items():
        torch.testing.assert_close(layer.last_stats[name], value, msg=name)
    torch.testing.assert_close(layer.router_center, alone.router_center)
    everything = make_moe(router_centering=True).train()
    everything(x)  # the padding counted too: another loss
    assert not torch.allclose(everything.pop_aux_loss(), aux)


@pytest.mark.parametrize("shared", [False, True])
def test_a_batch_of_padding_alone_keeps_the_running_mean_and_scores_zero(shared):
    """No counted token: nothing to measure, so the running mean stays as it was (0 / 0
    made it NaN, and every evaluation after), the losses are 0 and the statistics zeros,
    not NaN; the same when the count is a sum over processes (a tensor, not an int)."""
    layer = make_moe(router_centering=True, capacity_factor=1.0).train()
    if shared:
        share_batch_statistics(layer, lambda t: 2 * t)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(15)) + 2
    layer(x)  # a real batch first, so the running mean is not zero
    layer.pop_aux_loss()
    center = layer.router_center.clone()
    y = layer(x, torch.zeros(2, 6, dtype=torch.bool))
    assert torch.equal(layer.router_center, center) and y.isfinite().all()
    aux = layer.pop_aux_loss()
    assert aux.item() == 0 and aux.requires_grad  # still in the graph: backward on it alone works
    for name, value in layer.last_stats.items():
        assert torch.equal(value, torch.zeros_like(value)), name
    with torch.no_grad():
        assert layer.eval()(x).isfinite().all()


@pytest.mark.parametrize("mask", ["token_mask", "attention_mask"])
@pytest.mark.parametrize("centred", [False, True])
def test_a_model_trained_on_a_batch_of_padding_alone_still_evaluates(mask, centred):
    model = make_model(router_centering=centred).train()
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(16))
    out = model(ids, **{mask: torch.zeros(2, 6, dtype=torch.bool)})
    assert out.aux_loss.item() == 0 and out.logits.isfinite().all()
    assert all(value.isfinite().all() for value in model.blocks[1].mlp.last_stats.values())
    with torch.no_grad():
        assert model.eval()(ids).logits.isfinite().all()


def test_a_model_s_aux_loss_ignores_what_its_masked_padding_holds():
    """Right padding changes no real token (causal attention), and with token_mask it
    changes no balancing loss either; without it, the padding's routing counts."""
    model = make_model(router_centering=True).train()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(12))
    real = torch.arange(12) < torch.tensor([[12], [7]])  # (2, 12)
    other = torch.where(real, ids, torch.randint(0, 97, ids.shape, generator=torch.Generator().manual_seed(13)))
    masked = [model(t, token_mask=real).aux_loss for t in (ids, other)]
    torch.testing.assert_close(masked[0], masked[1])
    assert not torch.allclose(model(ids).aux_loss, model(other).aux_loss)


def test_training_on_two_threads_is_reproducible_bit_for_bit():
    """Each token's k rows are gathered by index_select, whose gradient sums them in a fixed
    order; gathered by advanced indexing, the input gradient changed from run to run here."""
    layer = make_moe(top_k=3).train()
    x = torch.randn(8, 256, 16, generator=torch.Generator().manual_seed(14))  # enough rows for two threads to split
    grad = torch.randn_like(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def input_gradient() -> torch.Tensor:
            leaf = x.clone().requires_grad_()
            torch.autograd.backward([layer(leaf), layer.pop_aux_loss()], [grad, torch.ones(())])
            return leaf.grad

        first = input_gradient()
        assert all(torch.equal(input_gradient(), first) for _ in range(10))
    finally:
        torch.set_num_threads(threads)


# ----- losses by hand -----------------------------------------------------------


def test_balance_loss_is_k_alpha_for_a_uniform_router_and_alpha_n_for_a_collapsed_one():
    alpha = 0.01
    uniform = torch.full((8, E), 1 / E)  # (N, E)
    # Top-2, balanced: f = (1/2, 1/2, 1/2, 1/2), P = 1/4: alpha * 4 * 4 * 1/8 = 2 alpha.
    assert load_balancing_loss(uniform, torch.tensor([4, 4, 4, 4]), alpha).item() == pytest.approx(2 * alpha)
    collapsed = F.one_hot(torch.zeros(8, dtype=torch.long), E).float()  # every token sure of expert 0
    assert load_balancing_loss(collapsed, torch.tensor([8, 0, 0, 0]), alpha).item() == pytest.approx(alpha * E)
    # Two experts, two tokens, both sent to expert 0: f = (1, 0), P = (0.625, 0.375),
    # so alpha * 2 * (1 * 0.625 + 0 * 0.375) = 1.25 alpha.
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    assert load_balancing_loss(probs, torch.tensor([2, 0]), alpha).item() == pytest.approx(1.25 * alpha)
    # Top-2 of 4 with every token on experts 0 and 1: f = (1, 1, 0, 0), P uniform: 2 alpha.
    assert load_balancing_loss(uniform, torch.tensor([8, 8, 0, 0]), alpha).item() == pytest.approx(2 * alpha)


def test_z_loss_by_hand():
    coef = 0.001
    # logsumexp(0, 0, 0, 0) = log 4 for every token.
    assert router_z_loss(torch.zeros(5, E), coef).item() == pytest.approx(coef * math.log(4) ** 2)
    # logsumexp(0, log 3) = log 4 and logsumexp(log 2, log 2) = log 4 too; mean of squares.
    logits = torch.tensor([[0.0, math.log(3)], [math.log(2), math.log(2)]])
    assert router_z_loss(logits, coef).item() == pytest.approx(coef * math.log(4) ** 2)


def test_z_loss_is_the_mean_of_squares_not_the_square_of_the_mean():
    """Tokens whose logsumexp is 0 and 2: (0^2 + 2^2) / 2 = 2, where (mean 1)^2 would be 1."""
    coef, half = 0.001, math.log(0.5)
    logits = torch.tensor([[half, half], [2 + half, 2 + half]])  # logsumexp 0 and 2
    assert torch.logsumexp(logits, dim=-1).tolist() == pytest.approx([0.0, 2.0], abs=1e-6)
    assert router_z_loss(logits, coef).item() == pytest.approx(coef * (0 + 4) / 2)


def run_hooked(layer: MoE, x: torch.Tensor, *names: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The layer's output and what the named hook points saw."""
    seen: dict[str, torch.Tensor] = {}
    record = lambda activation, name: seen.__setitem__(name, activation)  # noqa: E731
    with attach_hooks(layer, {name: record for name in names}):
        return layer(x), seen


def test_layer_aux_loss_is_the_weighted_sum_of_its_two_losses():
    layer = make_moe(aux_loss_coef=0.1, z_loss_coef=0.01)
    _, seen = run_hooked(layer, torch.randn(2, 5, 16), "hook_router_logits", "hook_router_probs", "hook_expert_load")
    logits = seen["hook_router_logits"].flatten(0, 1)  # (N, E)
    probs = seen["hook_router_probs"].flatten(0, 1)  # (N, E)
    balance = load_balancing_loss(probs, seen["hook_expert_load"], 0.1)
    z = router_z_loss(logits, 0.01)
    assert torch.allclose(layer.pop_aux_loss(), balance + z)
    assert layer.last_stats["balance_loss"] == balance and layer.last_stats["z_loss"] == z


# ----- routing statistics ---------------------------------------------------------


def collapsed_layer(**moe) -> MoE:
    """Every token's best expert is 0 and second best 1 (positive inputs, router rows 3 > 1 > 0)."""
    layer = make_moe(**moe)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 3.0
        layer.router.weight[1] = 1.0
    return layer


def test_loads_sum_to_tokens_times_k_and_drops_are_counted():
    layer = collapsed_layer(top_k=1, capacity_factor=1.0).train()  # capacity ceil(8 * 1 / 4) = 2
    x = torch.rand(1, 8, 16) + 0.1  # (B, T, d) positive
    y, seen = run_hooked(layer, x, "hook_expert_load", "hook_expert_dropped")
    assert seen["hook_expert_load"].tolist() == [8, 0, 0, 0]
    assert seen["hook_expert_dropped"].tolist() == [6, 0, 0, 0]
    # Earlier tokens keep their slot: tokens 0 and 1 are served, the rest pass through as zero.
    assert (y[0, :2].abs().sum(-1) > 0).all() and (y[0, 2:] == 0).all()
    stats = layer.last_stats
    assert stats["load"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert stats["max_load_over_fair"].item() == E
    assert stats["dropped_fraction"].item() == pytest.approx(0.75)
    # In eval mode nothing is dropped, so outputs never depend on the rest of the batch.
    _, seen = run_hooked(layer.eval(), x, "hook_expert_dropped")
    assert seen["hook_expert_dropped"].tolist() == [0, 0, 0, 0]


def test_dropped_fraction_counts_the_counted_tokens_only():
    """Padding's drops are not the model's, and padding buys no capacity: of 8 tokens all
    routed to expert 0, counting the first 4 sizes capacity at ceil(4 / 4) = 1, so 3 of their
    4 assignments drop (not 7 of 8); counting all 8, capacity 2 keeps 2 of 8."""
    layer = collapsed_layer(top_k=1, capacity_factor=1.0).train()
    x = torch.rand(1, 8, 16) + 0.1
    layer(x, torch.arange(8).unsqueeze(0) < 4)
    assert layer.last_stats["dropped_fraction"].item() == pytest.approx(0.75)
    layer(x, torch.arange(8).unsqueeze(0) < 1)
    assert layer.last_stats["dropped_fraction"].item() == 0
    layer(x)
    assert layer.last_stats["dropped_fraction"].item() == pytest.approx(0.75)


def test_padding_buys_no_capacity_and_never_takes_a_counted_token_s_slot():
    """4 padding tokens ahead of 4 real ones, all routed to expert 0, capacity factor 2: the
    4 real tokens size capacity at ceil(2 * 4 / 4) = 2, and the first two of them take it,
    though the padding came first. (Sized on all 8 tokens and served in token order, the
    padding took all 4 slots and every real token was dropped.)"""
    layer = collapsed_layer(top_k=1, capacity_factor=2.0).train()
    x = torch.rand(1, 8, 16) + 0.1
    seen = {}
    with attach_hooks(layer, {"hook_expert_dropped": lambda t, name: seen.__setitem__(name, t)}):
        y = layer(x, torch.tensor([[False] * 4 + [True] * 4]))
    assert seen["hook_expert_dropped"].tolist() == [6, 0, 0, 0]  # 2 slots for 8 assignments
    assert (y[0].abs().sum(-1) > 0).tolist() == [False] * 4 + [True, True, False, False]  # served
    assert layer.last_stats["dropped_fraction"].item() == pytest.approx(0.5)  # 2 of the 4 real ones


@pytest.mark.parametrize("case", ["top1_capacity", "top2_capacity_shared", "top1_scaled_capacity"])
def test_padded_dispatch_with_capacity_matches_the_reference(case):
    """Padding scattered through the batch: the reference loop, serving counted tokens first
    on a capacity of their own, gives every output, padding's included."""
    layer = make_moe(**CASES[case]).train()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(21))
    counted = torch.rand(2, 6, generator=torch.Generator().manual_seed(22)) < 0.6  # (2, 6)
    tolerance = 1e-5 * CASES[case].get("routed_scale", 1.0)
    with torch.no_grad():
        assert (layer(x, counted) - reference_moe(layer, x, counted)).abs().max().item() <= tolerance
        assert layer.last_stats["dropped_fraction"] > 0  # the case really drops something


@pytest.mark.parametrize("tokens, k, experts, factor, slots", [
    (100, 1, 11, 1.1, 10),  # 1.1 * 100 / 11: 10.000000000000002 in floats
    (25, 2, 5, 1.1, 11),  # 1.1 * 25 * 2 / 5: 11.000000000000002
    (25, 1, 4, 1.12, 7),  # 1.12 * 25 / 4: 7.000000000000001
    (20, 2, 3, 1.0, 14),  # 40 / 3 rounds up
    (8, 1, 4, 1.0, 2),
    (1, 1, 8, 0.5, 1),  # a sliver of a slot is a slot
])
def test_expert_capacity_is_the_exact_ceiling_of_the_decimal_factor(tokens, k, experts, factor, slots):
    assert expert_capacity(tokens, k, experts, factor) == slots


def test_capacity_1_12_keeps_exactly_7_of_25_tokens_on_a_collapsed_expert():
    """25 tokens all routed to expert 0, capacity factor 1.12 of 4 experts: 1.12 * 25 / 4 = 7
    slots exactly (8 with the float product's rounding), so 18 drop."""
    layer = collapsed_layer(top_k=1, capacity_factor=1.12).train()
    x = torch.rand(1, 25, 16, generator=torch.Generator().manual_seed(3)) + 0.1
    _, seen = run_hooked(layer, x, "hook_expert_dropped")
    assert seen["hook_expert_dropped"].tolist() == [18, 0, 0, 0]


@pytest.mark.parametrize("shape", [(2, 0, 16), (0, 3, 16)])
def test_an_empty_input_is_refused_by_name_as_the_transformer_refuses_it(shape):
    layer = make_moe()
    with pytest.raises(ValueError, match=r"x: needs at least one row of at least one token"):
        layer(torch.zeros(shape))


def test_top2_loads_count_both_slots():
    layer = collapsed_layer(top_k=2, capacity_factor=1.0).train()  # capacity ceil(6 * 2 / 4) = 3
    _, seen = run_hooked(layer, torch.rand(2, 3, 16) + 0.1, "hook_expert_load")
    assert seen["hook_expert_load"].tolist() == [6, 6, 0, 0] and int(seen["hook_expert_load"].sum()) == 6 * 2
    assert layer.last_stats["dropped_fraction"].item() == pytest.approx(0.5)
    assert layer.last_stats["max_load_over_fair"].item() == pytest.approx(2.0)


def test_expert_hooks_carry_each_experts_rows_grouped_after_their_sizes():
    """hook_expert_in: the tokens that chose each expert, in token order, expert by
    expert; hook_expert_post: those through the expert's up. Load and dropped fire
    first, so a reader knows the groups (compress/ calibrates each expert on its own)."""
    layer = make_moe()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    _, seen = run_hooked(layer, x, "hook_expert_in", "hook_expert_post", "hook_expert_load", "hook_expert_dropped")
    assert list(seen) == ["hook_expert_load", "hook_expert_dropped", "hook_expert_in", "hook_expert_post"]
    tokens = x.reshape(10, 16)
    chosen = torch.topk(torch.softmax(tokens @ layer.router.weight.T, dim=-1), 2).indices  # (10, 2)
    sizes = seen["hook_expert_load"].tolist()
    for e, (rows, hidden) in enumerate(zip(seen["hook_expert_in"].split(sizes), seen["hook_expert_post"].split(sizes))):
        assert torch.equal(rows, tokens[(chosen == e).any(dim=-1)])
        h = rows @ layer.up[e]  # (n_e, 2 * ff): gate and up halves
        assert torch.allclose(hidden, F.silu(h[:, :8]) * h[:, 8:], atol=1e-6)
    # Training over capacity: only the kept assignments, load - dropped of them.
    capped = collapsed_layer(top_k=1, capacity_factor=1.0).train()  # capacity 2: tokens 0 and 1 on expert 0
    x = torch.rand(1, 8, 16) + 0.1
    _, seen = run_hooked(capped, x, "hook_expert_in")
    assert torch.equal(seen["hook_expert_in"], x[0, :2])


@pytest.mark.parametrize("name", ["hook_expert_in", "hook_expert_post"])
def test_an_expert_hook_may_return_a_broadcast_tensor(name):
    """A mean ablation written a.mean(0).expand_as(a) (stride 0, as evaluate_sae writes it) runs
    as its contiguous copy does, bit for bit: F.grouped_mm refuses stride-0 rows."""
    layer = make_moe().eval()  # rows of 16 and 8 floats: the fused grouped_mm path
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    outputs = []
    for copy_first in (False, True):
        def mean(a: torch.Tensor, _name: str, copy_first: bool = copy_first) -> torch.Tensor:
            broadcast = a.mean(0).expand_as(a)  # (A, width), stride 0 along A
            return broadcast.contiguous() if copy_first else broadcast
        with torch.no_grad(), attach_hooks(layer, {name: mean}):
            outputs.append(layer(x))
    assert torch.equal(outputs[0], outputs[1])
    rows, w, counts = torch.randn(10, 8).mean(0).expand(10, 8), torch.randn(4, 8, 12), torch.tensor([3, 0, 6, 1])
    for fused in (True, None):  # grouped_mm, and whatever the CPU's default is (oneDNN on a Zen 5)
        assert torch.equal(grouped_matmul(rows, w, counts, fused=fused),
                           grouped_matmul(rows.contiguous(), w, counts, fused=fused))


def test_router_entropy_hook_is_per_token():
    layer = make_moe()
    _, seen = run_hooked(layer, torch.randn(2, 5, 16), "hook_router_entropy")
    entropy = seen["hook_router_entropy"]
    assert entropy.shape == (2, 5)
    assert (entropy >= 0).all() and (entropy <= math.log(E) + 1e-6).all()
    assert layer.last_stats["router_entropy"].item() == pytest.approx(entropy.mean().item(), rel=1e-6)


# ----- in a Transformer -------------------------------------------------------------


def make_model(seed: int = 0, **moe) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
                         feed_forward=("dense", "moe"), moe=MoEConfig(**{"n_experts": E, "top_k": 2, **moe}))
    return Transformer(config)


def test_a_float64_model_takes_the_loop_over_experts_and_equals_float32():
    """F.grouped_mm takes no float64: such rows loop over the experts, with float32's numbers."""
    x, w = torch.randn(10, 8, dtype=torch.float64), torch.randn(4, 8, 12, dtype=torch.float64)  # aligned rows
    counts = torch.tensor([3, 0, 6, 1])
    assert torch.equal(grouped_matmul(x, w, counts), grouped_matmul(x, w, counts, fused=False))
    model = make_model()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(17))  # 24 rows: the sorted dispatch
    wide = copy.deepcopy(model).double()(ids)
    assert wide.logits.dtype == torch.float64
    torch.testing.assert_close(wide.logits.float(), model(ids).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wide.aux_loss.float(), model(ids).aux_loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_dispatches_in_its_dtype(dtype):
    """The sorted dispatch (more than MAX_ROWS rows) keeps x's dtype, as `_decode` does: fp32
    gates made its output fp32, and the next layer's product failed on the mixed dtypes."""
    model = make_model().eval()
    ids = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(18))
    layer = make_moe(top_k=2).eval()
    x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(19))  # 64 rows
    with torch.no_grad():
        wide, exact = model(ids).logits, layer(x)
        logits, dispatched = model.to(dtype)(ids).logits, layer.to(dtype)(x.to(dtype))
        decoded = torch.cat([layer(x[:, t : t + 8].to(dtype)) for t in range(0, 32, 8)], dim=1)  # 16 rows each
        assert not layer.decodes(x.reshape(64, 16)) and layer.decodes(x[:, :8].reshape(16, 16))
        assert not layer.decodes(x[:, :16].reshape(32, 16).to(dtype))  # past MAX_ROWS only fp32 streams
    assert logits.dtype == dispatched.dtype == dtype
    eps = torch.finfo(dtype).eps  # seen: the paths within 6 eps of each other, 8 of fp32
    torch.testing.assert_close(logits.float(), wide, atol=16 * eps, rtol=16 * eps)
    torch.testing.assert_close(dispatched.float(), exact, atol=16 * eps, rtol=16 * eps)
    torch.testing.assert_close(dispatched, decoded, atol=8 * eps, rtol=8 * eps)  # the same sums, grouped apart


def test_moe_layers_follow_the_schedule_and_hook_names_are_regular():
    model = make_model()
    assert [type(b.mlp).__name__ for b in model.blocks] == ["MLP", "MoE"]
    names = set(hook_points(model))
    assert "blocks.0.mlp.hook_post" in names
    for hook in ("router_logits", "router_probs", "expert_load", "expert_dropped", "expert_in", "expert_post",
                 "router_entropy"):
        assert f"blocks.1.mlp.hook_{hook}" in names
    shapes = {}
    record = lambda x, name: shapes.__setitem__(name, tuple(x.shape))  # noqa: E731
    with model.hooks({f"blocks.1.mlp.hook_{h}": record for h in ("router_logits", "router_probs", "expert_load")}):
        model(torch.randint(0, 97, (2, 7)))
    assert shapes == {"blocks.1.mlp.hook_router_logits": (2, 7, E), "blocks.1.mlp.hook_router_probs": (2, 7, E),
                      "blocks.1.mlp.hook_expert_load": (E,)}


def test_reading_every_moe_hook_changes_nothing_bit_for_bit():
    model = make_model(capacity_factor=1.0, shared_expert=True).train()
    ids = torch.randint(0, 97, (2, 12))
    plain = model(ids)
    readers = {name: (lambda x, _: None) for name in hook_points(model) if ".mlp." in name}
    with model.hooks(readers):
        hooked = model(ids)
    assert torch.equal(plain.logits, hooked.logits) and torch.equal(plain.aux_loss, hooked.aux_loss)


@pytest.mark.parametrize("routed_scale, factor", [(2.0, 1.0), (1.0, 0.5)])
def test_k_experts_splitting_a_dense_mlp_equal_it_at_routed_scale_k(routed_scale, factor):
    """A SwiGLU MLP of width 2F is the sum of two experts of width F. With a
    uniform router both are weighed 1/2 after renormalising: routed_scale 2
    gives back the dense MLP, routed_scale 1 half of it (route's docstring)."""
    torch.manual_seed(0)
    d, ff = 16, 8
    config = ModelConfig(vocab_size=50, d_model=d, n_layers=2, n_heads=2, d_ff=2 * ff)
    dense = MLP(config)
    layer = MoE(config.replace(feed_forward=("moe",), moe=MoEConfig(n_experts=2, top_k=2, routed_scale=routed_scale)))
    gate, up = dense.up.weight.detach().chunk(2)  # (2F, d) each
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform probabilities
        for e, half in enumerate((slice(0, ff), slice(ff, 2 * ff))):
            layer.up[e] = torch.cat([gate[half], up[half]]).T  # (d, 2F_e): gate half, then up half
            layer.down[e] = dense.down.weight.detach()[:, half].T  # (F, d)
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        assert torch.allclose(layer(x), factor * dense(x), atol=1e-6)


def test_aux_loss_is_positive_differentiable_and_zero_for_dense_models():
    model = make_model()
    out = model(torch.randint(0, 97, (2, 9)))
    assert out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert model.blocks[1].mlp.router.weight.grad.abs().sum() > 0
    copy.deepcopy(model)  # the model kept no graph-attached tensor (deepcopy refuses those)
    dense = Transformer(model.config.replace(feed_forward=(), moe=None))
    assert dense(torch.randint(0, 97, (2, 9))).aux_loss.item() == 0


def test_inference_skips_the_training_losses_but_not_the_routing():
    model = make_model()
    ids = torch.randint(0, 97, (2, 9))
    trained = model(ids)
    with torch.no_grad():
        inferred = model(ids)
    assert inferred.aux_loss.item() == 0 and trained.aux_loss.item() > 0
    assert torch.equal(inferred.logits, trained.logits.detach())
    stats = model.blocks[1].mlp.last_stats
    assert "balance_loss" not in stats and stats["max_load_over_fair"] >= 1


@pytest.fixture
def one_thread():
    """Models this small run ~10x slower with two threads on a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_tiny_moe_model_learns_a_repeated_permutation(one_thread):
    """Each token determines the next (a fixed permutation of 32 tokens, repeated),
    so a model that routes and learns reaches near-zero loss."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, max_seq_len=32,
                         feed_forward=("moe",), moe=MoEConfig(n_experts=4, top_k=2))
    model = Transformer(config)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    stream = perm.repeat(40)  # (1280,)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    starts = torch.randint(0, len(stream) - 17, (60, 8), generator=torch.Generator().manual_seed(1))
    for rows in starts:
        window = torch.stack([stream[s : s + 17] for s in rows])  # (8, 17)
        out = model(window[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad()
        (loss + out.aux_loss).backward()
        optimizer.step()
    assert loss.item() < 0.05
    assert model.blocks[0].mlp.last_stats["max_load_over_fair"] < E  # not collapsed onto one expert


# ----- configuration -------------------------------------------------------------------


BASE = dict(vocab_size=50, d_model=16, n_layers=2, n_heads=2)


@pytest.mark.parametrize("change, field", [
    ({"feed_forward": ["moe"], "moe": {"n_experts": 2, "top_k": 3}}, "moe.top_k"),
    ({"feed_forward": ["moe"]}, "moe"),
    ({"feed_forward": ["dense", "sparse"], "moe": {}}, r"feed_forward\[1\]"),
    ({"feed_forward": ["moe", "dense", "moe"], "moe": {}}, "feed_forward"),
    ({"feed_forward": ["moe"], "moe": {"n_expert": 4}}, "moe.n_expert: unknown MoEConfig field"),
    ({"feed_forward": ["moe"], "moe": {"capacity_factor": 0}}, "moe.capacity_factor"),
    ({"feed_forward": ["moe"], "moe": {"aux_loss_coef": -1.0}}, "moe.aux_loss_coef"),
    ({"feed_forward": ["moe"], "moe": {"routed_scale": 0}}, "moe.routed_scale"),
    ({"feed_forward": ["moe"], "moe": {"top_k": "2"}}, "moe.top_k"),
])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        ModelConfig.from_dict({**BASE, **change})
