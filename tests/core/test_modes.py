"""Inference runs a model in eval mode and hands it back as it was (core/modes.py
`evaluating`): every interpret lens, generation, perplexity and pruning's
calibration. A model in train mode stays in train mode, and its MoE routers'
running mean (`router_center`, updated by train-mode forwards) is untouched."""
import pytest
import torch

from heron.compress.prune_model import prune_model, recover
from heron.core import ModelConfig, MoE, MoEConfig, Transformer
from heron.core.modes import evaluating, inference_routing
from heron.generate import Generator, SamplingParams, perplexity
from heron.interpret import (
    attention_patterns,
    gradient_x_input,
    integrated_gradients,
    logit_diff,
    patch,
    patch_heads,
    patch_positions,
    routing,
    run_with_cache,
    token_losses,
)
from heron.interpret.sae import SAESettings, SparseAutoencoder, capture, evaluate_sae

V = 50
IDS = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(0))
OTHER = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(1))

CALLS = {
    "run_with_cache": lambda m: run_with_cache(m, IDS),
    "patch": lambda m: patch(m, IDS, {"blocks.0.hook_resid_pre": torch.ones(1, 8, 32)}),
    "patch_positions": lambda m: patch_positions(m, IDS, OTHER, logit_diff(1, 2), normalise=False),
    "patch_heads": lambda m: patch_heads(m, IDS, OTHER, logit_diff(1, 2), normalise=False),
    "attention_patterns": lambda m: attention_patterns(m, IDS),
    "routing": lambda m: routing(m, [IDS]),
    "gradient_x_input": lambda m: gradient_x_input(m, IDS[0], target=3),
    "integrated_gradients": lambda m: integrated_gradients(m, IDS[0], target=3, steps=4, tolerance=1e9),
    "token_losses": lambda m: token_losses(m, IDS),
    "capture": lambda m: capture(m, IDS, "blocks.1.hook_resid_pre"),
    "evaluate_sae": lambda m: evaluate_sae(m, SparseAutoencoder(32, SAESettings(k=2, expansion=2)), IDS.repeat(2, 1),
                                           "blocks.0.hook_mlp_out"),
    "generate": lambda m: Generator(m).generate_ids([[1, 2, 3], [4]], SamplingParams(max_new_tokens=4, seed=0)),
    "perplexity": lambda m: perplexity(m, torch.arange(40) % V, seq_len=8, batch_size=2),
    "prune_model": lambda m: prune_model(m, "wanda", sparsity=0.5, calibration=IDS, progress=False),
}


def moe_model_in_train_mode() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32,
                         feed_forward=("moe",), moe=MoEConfig(n_experts=4, top_k=2, router_centering=True))
    return Transformer(config).train()


def centres(model: Transformer) -> list[torch.Tensor]:
    return [block.mlp.router_center.clone() for block in model.blocks]


def test_a_train_mode_forward_does_move_the_router_centres():
    """The premise: without eval mode the call below would change the model."""
    model = moe_model_in_train_mode()
    before = centres(model)
    with torch.no_grad():
        model(IDS)
    assert not all(torch.equal(a, b) for a, b in zip(before, centres(model)))


@pytest.mark.parametrize("name", CALLS)
def test_the_call_leaves_the_mode_and_the_router_centres_as_they_were(name):
    model = moe_model_in_train_mode()
    before = centres(model)
    CALLS[name](model)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, centres(model)))


def test_the_call_runs_in_eval_mode_and_an_eval_model_stays_in_eval_mode():
    model = moe_model_in_train_mode()
    modes = []
    with model.hooks({"blocks.0.hook_resid_pre": lambda x, _: modes.append(model.training)}):
        run_with_cache(model, IDS)
    assert modes == [False]
    model.eval()
    run_with_cache(model, IDS)
    assert not model.training


def test_generation_and_perplexity_in_train_mode_equal_eval_modes():
    model = moe_model_in_train_mode()
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    sampled, ppl = Generator(model).generate_ids([[1, 2, 3]], params), perplexity(model, torch.arange(40) % V, 8, 2)
    model.eval()
    assert Generator(model).generate_ids([[1, 2, 3]], params) == sampled
    assert perplexity(model, torch.arange(40) % V, 8, 2) == ppl


def test_a_recovery_fine_tune_hands_the_model_back_in_its_mode():
    model = moe_model_in_train_mode().eval()
    recover(model, [torch.arange(10)[None] % V], steps=1, lr=1e-3, progress=False)
    assert not model.training
    recover(model.train(), [torch.arange(10)[None] % V], steps=1, lr=1e-3, progress=False)
    assert model.training


def modes(model: Transformer) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_evaluating_inside_inference_routing_leaves_the_routing_as_in_eval():
    """After an inner `evaluating`, the rest of the enclosing block still routes as in eval
    mode: its MoE layers stay in eval, and a forward there leaves the router centres put."""
    model = moe_model_in_train_mode()
    before = centres(model)
    with inference_routing(model):
        routing_modes = modes(model)
        with evaluating(model):
            assert not any(modes(model).values())
        assert modes(model) == routing_modes
        assert not any(m.training for m in model.modules() if isinstance(m, MoE))
        with torch.no_grad():
            model(IDS)
    assert all(modes(model).values())
    assert all(torch.equal(a, b) for a, b in zip(before, centres(model)))


def test_inference_routing_inside_evaluating_leaves_the_model_in_eval():
    model = moe_model_in_train_mode()
    with evaluating(model):
        with inference_routing(model):
            pass
        assert not any(modes(model).values())
    assert all(modes(model).values())


@pytest.mark.parametrize("kept", ["blocks.0", "blocks.1.mlp", "blocks.1.mlp.router"])
def test_a_submodule_the_owner_kept_in_eval_stays_in_eval(kept):
    """A whole block, a MoE layer, or one part of a MoE layer: `evaluating` and
    `inference_routing`, alone and nested either way round, hand every module back in the
    mode it was in."""
    model = moe_model_in_train_mode()
    model.get_submodule(kept).eval()
    before = modes(model)
    assert not before[kept] and before[""]
    for enter in ([evaluating], [inference_routing], [evaluating, inference_routing],
                  [inference_routing, evaluating]):
        with enter[0](model):
            if len(enter) > 1:
                with enter[1](model):
                    pass
        assert modes(model) == before, enter
