import math

import pytest
import torch

from heron.generate.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    presence_mask,
    sample_next,
)

NEG_INF = float("-inf")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"seed": -3}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 2**64}, "seed"),  # past torch.Generator's unsigned 64 bits
    ],
)
def test_bad_params_name_the_field(change, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**change)


def test_from_dict_names_an_unknown_key():
    assert SamplingParams.from_dict({"temperature": 0, "stop": ["x"]}) == SamplingParams(temperature=0, stop=("x",))
    with pytest.raises(ValueError, match="^max_tokens: unknown SamplingParams field"):
        SamplingParams.from_dict({"max_tokens": 5})


def test_lists_are_frozen_into_tuples():
    params = SamplingParams(stop=["a", "bc"], stop_token_ids=[1, 2])
    assert params.stop == ("a", "bc") and params.stop_token_ids == (1, 2)
    assert SamplingParams(stop="\n").stop == ("\n",)
    hash(params)  # frozen and hashable


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    expected = torch.tensor([[1.0, -2.0, 0.5, -3.0, 0.0]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), expected)
    # Previous ids (with a repeat) give the same mask.
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([[1, 0, 4, 0]]), 2.0), expected)
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_presence_mask_ignores_padding():
    ids = torch.tensor([[0, 0, 3], [2, 1, 3]])
    valid = torch.tensor([[False, False, True], [True, True, True]])
    expected = torch.tensor([[False, False, False, True], [False, True, True, True]])
    assert torch.equal(presence_mask(ids, 4, valid), expected)


def test_top_k_keeps_the_k_highest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    assert torch.equal(apply_top_k(logits, 2), torch.tensor([[NEG_INF, 5.0, NEG_INF, 4.0]]))
    assert apply_top_k(logits, None) is logits and apply_top_k(logits, 4) is logits


@pytest.mark.parametrize(
    "p, kept",
    [
        (0.3, {1}),  # the top token alone already has mass 0.5 >= 0.3
        (0.7, {1, 3}),  # 0.5 + 0.25 = 0.75 >= 0.7
        (0.8, {1, 3, 2}),  # 0.75 < 0.8, so 0.15 more is needed
        (0.95, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    probs = torch.tensor([[0.10, 0.50, 0.15, 0.25]])
    out = apply_top_p(probs.log(), p)
    assert {i for i in range(4) if out[0, i] > NEG_INF} == kept
    assert torch.equal(out[0, list(kept)], probs.log()[0, list(kept)])


def test_top_p_stops_at_the_token_whose_mass_reaches_p_exactly():
    """Probabilities 1/2, 1/4, 1/4 are exact in float: the top token and one quarter reach p = 0.75
    exactly, so the smallest set reaching p has two tokens (of the tied quarters, the one
    transformers keeps: the later in an ascending sort)."""
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    probs = logits.softmax(-1)
    assert probs.sort().values.cumsum(-1).tolist() == [[0.25, 0.5, 1.0]]  # exact, so the boundary is tested
    out = apply_top_p(logits, 0.75)
    kept = out.isfinite()[0]
    assert kept.sum() == 2 and kept[0] and kept[logits.sort().indices[0, 1]]
    assert torch.equal(out[kept[None]], logits[kept[None]])


@pytest.mark.parametrize("p", [1e-9, 0.1, 0.4, 0.5, 0.75, 0.9, 0.999])
def test_top_p_keeps_what_transformers_keeps_ties_included(p):
    """Logits drawn from a few values tie often, and at the cut: the kept set (which of
    the tied tokens too) is transformers' TopPLogitsWarper's, row for row."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randint(-3, 3, (64, 12), generator=torch.Generator().manual_seed(0)).float()
    logits[0] = torch.tensor([2.0, 2.0, 0.0, 0.0] * 3)
    expected = TopPLogitsWarper(p)(None, logits.clone())
    assert torch.equal(apply_top_p(logits, p), expected)


def test_top_p_keeps_the_top_token_even_for_tiny_p():
    logits = torch.tensor([[0.0, 0.0, 10.0], [3.0, 1.0, 2.0]])
    out = apply_top_p(logits, 1e-6)
    assert torch.equal(out.isfinite(), torch.tensor([[False, False, True], [True, False, False]]))


def test_a_top_p_below_float32s_range_keeps_the_top_token():
    """1e-300 is 0 in float32, where no mass is below it: the top token stays, so sampling is its argmax."""
    logits = torch.tensor([[0.0, 3.0, 2.0], [1.0, -1.0, 0.5]])
    assert apply_top_p(logits, 1e-300).isfinite().tolist() == [[False, True, False], [True, False, False]]
    drawn = sample_next(logits, SamplingParams(top_p=1e-300), torch.Generator().manual_seed(0))
    assert drawn.tolist() == [1, 0]


def test_the_largest_seed_torch_takes_is_accepted():
    params = SamplingParams(seed=2**64 - 1)
    torch.Generator().manual_seed(params.seed)


def test_greedy_is_argmax_and_top_k_1_equals_greedy():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    greedy = sample_next(logits, SamplingParams(temperature=0))
    assert torch.equal(greedy, logits.argmax(-1))
    top1 = sample_next(logits, SamplingParams(temperature=1.5, top_k=1), torch.Generator().manual_seed(1))
    assert torch.equal(top1, greedy)


def test_sampling_follows_the_distribution_and_repeats_with_the_seed():
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = probs.log().expand(20000, 3)
    params = SamplingParams(temperature=1.0)
    draws = sample_next(logits, params, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.015)
    again = sample_next(logits, params, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_temperature_sharpens_before_top_p():
    # At temperature 0.5 the probabilities become 0.1**2 : 0.6**2 : 0.3**2 (normalised),
    # so the top token alone carries 0.36 / 0.46 > 0.75 and top_p=0.75 keeps only it.
    logits = torch.tensor([0.1, 0.6, 0.3]).log().expand(200, 3)
    params = SamplingParams(temperature=0.5, top_p=0.75)
    draws = sample_next(logits, params, torch.Generator().manual_seed(0))
    assert draws.eq(1).all()
    assert 0.36 / 0.46 > 0.75 and math.isclose(0.36 + 0.09 + 0.01, 0.46)


def test_penalty_needs_the_seen_mask():
    with pytest.raises(ValueError, match="repetition_penalty"):
        sample_next(torch.zeros(1, 3), SamplingParams(repetition_penalty=1.2))


@pytest.mark.parametrize("temperature", [1e-37, 1e-45, 1e-300])
@pytest.mark.parametrize("filters", [{}, {"top_k": 2}, {"top_p": 0.9}])
def test_a_tiny_temperature_samples_the_likeliest_token(temperature, filters):
    # 100 / 1e-37 overflows float32 (3.4e38): divided as they come, the logits' softmax would be nan.
    # 1e-45 and 1e-300 are below float32's smallest normal number, where 1e-300 itself rounds to 0.
    logits = torch.tensor([[100.0, 50.0, -100.0], [-3.0, 7.0, 2.0]])
    params = SamplingParams(temperature=temperature, **filters)
    assert params.greedy == (temperature < 1e-38)
    assert torch.equal(sample_next(logits, params, torch.Generator().manual_seed(0)), torch.tensor([0, 1]))
