"""MoE routing analysis (interpret/routing.py): counts equal what the layers
dispatch, and token-by-token choices equal a slow per-token top-k."""
import pytest
import torch

from heron.core import ModelConfig, MoEConfig, Transformer
from heron.core.hooks import attach_hooks
from heron.interpret.routing import plot_load, routing

V, E, K = 40, 4, 2


def moe_model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=V, d_model=32, n_layers=4, n_heads=4, d_ff=48, max_seq_len=32,
                         feed_forward=("dense", "moe"), moe=MoEConfig(n_experts=E, top_k=K))
    model = Transformer(config).eval()
    with torch.no_grad():
        for block in model.blocks:
            if hasattr(block.mlp, "router"):
                block.mlp.router.weight.normal_(0.0, 1.0)  # decisive routing
    return model


BATCHES = [torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(s)) for s in range(3)]


def test_counts_are_what_the_layers_dispatch():
    model = moe_model()
    report = routing(model, BATCHES)
    assert report.layers == [1, 3] and report.tokens == 90
    dispatched = torch.zeros(E, dtype=torch.long)

    def add(load, _name):
        dispatched.add_(load)

    with attach_hooks(model, {"blocks.1.mlp.hook_expert_load": add}), torch.no_grad():
        for ids in BATCHES:
            model(ids)
    assert torch.equal(report.counts[0], dispatched)
    assert report.counts.sum(dim=1).tolist() == [90 * K, 90 * K]
    torch.testing.assert_close(report.load.sum(dim=1), torch.ones(2))
    assert float(report.max_load[0]) == pytest.approx(float(dispatched.max()) / (90 * K) * E)


def test_each_tokens_experts_match_a_per_token_top_k():
    model = moe_model()
    report = routing(model, BATCHES)
    expected = torch.zeros(V, E, dtype=torch.long)
    probs = []
    with attach_hooks(model, {"blocks.1.mlp.hook_router_probs": lambda p, _n: probs.append(p)}), torch.no_grad():
        for ids in BATCHES:
            model(ids)
    for ids, p in zip(BATCHES, probs):
        for token, row in zip(ids.flatten().tolist(), p.flatten(0, 1)):
            for expert in sorted(range(E), key=lambda e: -float(row[e]))[:K]:
                expected[token, expert] += 1
    assert torch.equal(report.token_counts[0], expected)
    top = report.top_tokens(0, k=3)
    for e in range(E):
        assert [c for _, c in top[e]] == sorted(expected[:, e].tolist(), reverse=True)[: len(top[e])]
        assert all(expected[t, e] == c for t, c in top[e])


def test_plot_and_refusals(tmp_path):
    path = plot_load(routing(moe_model(), BATCHES), tmp_path / "load.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dense = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, d_ff=48, max_seq_len=32))
    with pytest.raises(ValueError, match="^model: has no Mixture-of-Experts"):
        routing(dense, BATCHES)
    with pytest.raises(ValueError, match="^batches: expected"):
        routing(moe_model(), [torch.zeros(5, dtype=torch.long)])
