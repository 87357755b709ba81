"""Attribution to input tokens (interpret/attribution.py) against known answers:
completeness, a slow Riemann-sum reference, causality (later tokens score
exactly zero), and gradient x input by hand."""
import pytest
import torch

from heron.core import ModelConfig, MoEConfig, Transformer
from heron.interpret.attribution import ConvergenceError, gradient_x_input, integrated_gradients, logit_of

V = 64


def model_for(positions: str = "rope", seed: int = 0) -> Transformer:
    """Weights well away from init, so the output is far from linear in the embeddings."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, positions=positions)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.15)
    return model


IDS = [5, 17, 3, 42, 8, 29, 11]


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_scores_add_up_to_the_output_difference(positions):
    model = model_for(positions)
    result = integrated_gradients(model, IDS, target=7, steps=32, tolerance=1e-3)
    with torch.no_grad():
        x = model.embed(torch.tensor(IDS))
        mean = model.embed.weight.mean(0).expand_as(x)
        ends = model(input_embeds=torch.stack([x, mean])).logits[:, -1, 7]
    assert result.output == pytest.approx(float(ends[0]), abs=1e-5)
    assert result.baseline_output == pytest.approx(float(ends[1]), abs=1e-5)
    assert float(result.scores.sum()) == pytest.approx(float(ends[0] - ends[1]), rel=1e-3)
    assert result.completeness_error <= 1e-3 and result.scores.shape == (len(IDS),)


def test_gauss_legendre_matches_a_fine_riemann_sum():
    """The slow, obvious reference: the gradient at 2048 midpoints of the path, averaged."""
    model = model_for()
    result = integrated_gradients(model, IDS, target=3, steps=32, baseline=0)
    x = model.embed(torch.tensor(IDS)).detach()
    x0 = model.embed(torch.zeros(len(IDS), dtype=torch.long)).detach()
    total = torch.zeros_like(x)
    n = 2048
    for chunk in torch.arange(n).split(256):
        alphas = ((chunk.float() + 0.5) / n)[:, None, None]
        path = (x0 + alphas * (x - x0)).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(input_embeds=path).logits[:, -1, 3].sum(), path)
        total += grad.sum(0)
    reference = ((x - x0) * total / n).sum(-1)
    torch.testing.assert_close(result.scores, reference, atol=2e-4, rtol=1e-3)


def test_tokens_after_the_explained_position_score_exactly_zero():
    model = model_for()
    for attribution in (integrated_gradients(model, IDS, target=9, position=3),
                        gradient_x_input(model, IDS, target=9, position=3)):
        assert torch.all(attribution.scores[4:] == 0)
        assert torch.all(attribution.scores[:4] != 0)


def test_gradient_x_input_by_hand():
    model = model_for()
    result = gradient_x_input(model, IDS, target=12)
    x = model.embed(torch.tensor(IDS)).detach().requires_grad_(True)
    logit = model(input_embeds=x[None]).logits[0, -1, 12]
    (grad,) = torch.autograd.grad(logit, x)
    torch.testing.assert_close(result.scores, (x * grad).sum(-1).detach())
    assert result.output == pytest.approx(float(logit.detach()), abs=1e-6)


def test_a_custom_output_and_untouched_parameter_gradients():
    model = model_for()
    log_prob = lambda logits: torch.log_softmax(logits[:, -1], dim=-1)[:, 4]  # noqa: E731
    result = integrated_gradients(model, IDS, output=log_prob, steps=48)
    assert result.completeness_error <= 0.01
    assert all(p.grad is None for p in model.parameters())
    assert logit_of(4, 2)(torch.arange(2 * 3 * V).reshape(2, 3, V).float()).tolist() == [2 * V + 4, 5 * V + 4]


def test_too_few_steps_fail_the_convergence_check_naming_them():
    model = model_for(seed=1)
    with pytest.raises(ConvergenceError, match="use more than 1 steps"):
        integrated_gradients(model, IDS, target=7, steps=1, tolerance=1e-3)


def test_a_zero_baseline_at_rmsnorms_singularity_is_caught():
    """F jumps within the first ~1e-3 of the path from zero embeddings: the check must say so."""
    with pytest.raises(ConvergenceError, match="relative error"):
        integrated_gradients(model_for(), IDS, target=7, baseline="zero", steps=64)


def test_bad_arguments_name_themselves():
    model = model_for()
    with pytest.raises(ValueError, match="^target: give exactly one"):
        integrated_gradients(model, IDS)
    with pytest.raises(ValueError, match="^target: token id 64 outside"):
        gradient_x_input(model, IDS, target=V)
    with pytest.raises(ValueError, match="^position: 7 outside"):
        gradient_x_input(model, IDS, target=1, position=7)
    with pytest.raises(ValueError, match="^steps, batch_size"):
        integrated_gradients(model, IDS, target=1, steps=0)
    with pytest.raises(ValueError, match="^steps: at most 4096"):  # not a MemoryError in the quadrature
        integrated_gradients(model, IDS, target=1, steps=10**11)
    with pytest.raises(ValueError, match="^baseline: expected"):
        integrated_gradients(model, IDS, target=1, baseline=V)
    with pytest.raises(ValueError, match="^ids: empty"):
        gradient_x_input(model, [], target=1)



def test_a_batch_of_prompts_and_tokens_outside_the_vocabulary_are_refused_naming_ids():
    """Two rows flattened would be attributed as one joined prompt of 2T tokens; one row (1, T)
    is the prompt (T,) itself. A token id past the vocabulary is named, not an IndexError."""
    model = model_for()
    one_row = gradient_x_input(model, torch.tensor([IDS]), target=1)
    assert torch.equal(one_row.scores, gradient_x_input(model, IDS, target=1).scores)
    for attribute in (gradient_x_input, integrated_gradients):
        with pytest.raises(ValueError, match=r"^ids: expected one prompt, \(T,\) or \(1, T\), got \(2, 7\)"):
            attribute(model, torch.tensor([IDS, IDS]), target=1)
        for bad in (V, -1):
            with pytest.raises(ValueError, match=rf"^ids: token id {bad} outside the vocabulary \(0..{V - 1}\)"):
                attribute(model, IDS[:3] + [bad], target=1)

def test_on_an_moe_model_the_error_says_top_k_routing_not_more_steps():
    """Top-1 routing switches experts along the path, so F jumps and no step count converges."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, init_std=0.2,
                         feed_forward=("moe",), moe=MoEConfig(n_experts=4, top_k=1))
    model = Transformer(config).eval()
    for steps in (32, 128):
        with pytest.raises(ConvergenceError, match=r"Mixture-of-Experts layers \(blocks 0, 1\) route by top-k.*"
                                                   r"completeness cannot hold.*use gradient_x_input$") as err:
            integrated_gradients(model, IDS, target=7, steps=steps)
        assert "use more than" not in str(err.value)
    assert gradient_x_input(model, IDS, target=7).scores.shape == (len(IDS),)


def test_a_bf16_model_is_attributed_in_fp32():
    """The embeddings are interpolated in fp32 and go into the model in its own dtype; the scores
    come back in fp32 and add up as they do in fp32 (to bf16's rounding of the outputs)."""
    model = model_for().to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (6,), generator=torch.Generator().manual_seed(3))
    plain = gradient_x_input(model, ids, target=3)
    assert plain.scores.dtype == torch.float32 and torch.isfinite(plain.scores).all()
    integrated = integrated_gradients(model, ids, target=3, steps=16, tolerance=10.0)  # bf16 outputs: loose
    assert integrated.scores.dtype == torch.float32 and torch.isfinite(integrated.scores).all()


def test_a_scalar_heads_score_is_attributed_as_target_0_and_token_targets_are_refused():
    """A reward model (head "scalar") has one output: target 0 attributes its score, which the
    scores add up to as for a logit; any token id is refused naming the head, not an IndexError."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32,
                                    head="scalar", tie_embeddings=False)).eval()
    with torch.no_grad():
        score = float(model(torch.tensor([IDS])).logits[0, -1, 0])
    assert gradient_x_input(model, IDS, target=0).output == pytest.approx(score, abs=1e-6)
    result = integrated_gradients(model, IDS, target=0, tolerance=1e-3)
    assert result.output == pytest.approx(score, abs=1e-6)
    assert float(result.scores.sum()) == pytest.approx(score - result.baseline_output, rel=1e-3)
    for attribute in (gradient_x_input, integrated_gradients):
        with pytest.raises(ValueError, match=r"^target: a model with head 'scalar' has one output.*target=0"):
            attribute(model, IDS, target=7)
