"""The green-list watermark (heron.govern.watermark) and its place in generation.

The green list is checked against a pure-Python implementation of the
module's recipe (hashlib and integer arithmetic, no torch), the z-test against
the paper's formula on sequences built to have a known number of green
tokens, and generation against a no-cache greedy reference.
"""
import hashlib
import math
from dataclasses import replace

import pytest
import torch

from heron.core import ModelConfig, Transformer
from heron.generate import (Generator, SamplingParams, apply_repetition_penalty, apply_temperature, apply_top_k,
                            apply_top_p, sample_next)
from heron.govern.watermark import (DEFAULT_Z_THRESHOLD, Watermark, binomial_tail, detect, green_hits, p_value,
                                    z_score)

torch.set_num_threads(1)

V = 100  # γ = 0.25 of 100 is a whole 25, so z uses γ itself
WM = Watermark(key=1234)


# ----- a reference for the green list: the module's recipe in plain Python ---------------


def ref_lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def ref_green_list(key: bytes, gamma: float, vocab_size: int, previous: int) -> set[int]:
    derived = hashlib.blake2b(key, digest_size=32, person=b"heron-wm-key").digest()
    digest = hashlib.blake2b(previous.to_bytes(8, "little"), digest_size=12, key=derived, person=b"heron-wm-h1").digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in (0, 4, 8)]

    def h(v: int) -> int:
        for s in words:
            v = ref_lowbias32(v ^ s)
        return v

    return set(sorted(range(vocab_size), key=h)[: round(gamma * vocab_size)])


def green_set(wm: Watermark, previous: int, vocab_size: int = V) -> set[int]:
    return set(wm.green_mask(torch.tensor([previous]), vocab_size)[0].nonzero().flatten().tolist())


@pytest.mark.parametrize("vocab_size", [97, 300])
def test_green_list_matches_the_plain_python_recipe(vocab_size):
    for previous in (0, 1, 57, vocab_size - 1):
        assert green_set(WM, previous, vocab_size) == ref_green_list(b"1234", 0.25, vocab_size, previous)


@pytest.mark.parametrize("vocab_size, gamma", [(97, 0.25), (100, 0.25), (4096, 0.25), (1000, 0.5), (50, 0.1), (7, 0.9)])
def test_green_list_holds_exactly_round_gamma_v_tokens(vocab_size, gamma):
    wm = Watermark(key=3, gamma=gamma)
    masks = wm.green_mask(torch.arange(min(vocab_size, 64)), vocab_size)  # (B, V)
    assert masks.sum(dim=1).tolist() == [round(gamma * vocab_size)] * len(masks)


def test_green_list_is_deterministic_per_key_and_previous_token():
    previous = torch.tensor([5, 9, 5, 5, 9])
    masks = WM.green_mask(previous, V)
    assert torch.equal(masks[0], masks[2]) and torch.equal(masks[1], masks[4])
    assert not torch.equal(masks[0], masks[1])  # another previous token, another list
    assert green_set(Watermark(key=1234, delta=7.0), 5) == green_set(WM, 5)  # δ plays no part
    # an int key is its decimal string, so `--key 1234` on the command line is the same key
    assert green_set(Watermark(key="1234"), 5) == green_set(Watermark(key=b"1234"), 5) == green_set(WM, 5)


def test_green_lists_differ_across_keys():
    previous = torch.arange(V)
    a, b = WM.green_mask(previous, V), Watermark(key=1235).green_mask(previous, V)  # (V, V) each
    overlap = (a & b).sum().item() / a.sum().item()
    assert abs(overlap - 0.25) < 0.03  # independent lists share a γ-fraction, not all


def test_each_token_is_green_after_a_gamma_fraction_of_previous_tokens():
    masks = Watermark(key=9).green_mask(torch.arange(1024), 1024).float()  # (V, V)
    share = masks.mean(dim=0)  # (V,): how often each token is green
    binomial_sd = math.sqrt(0.25 * 0.75 / 1024)
    assert share.mean().item() == pytest.approx(0.25)
    assert share.std().item() == pytest.approx(binomial_sd, rel=0.1)  # no token favoured beyond chance


def test_processor_adds_exactly_delta_to_green_logits():
    torch.manual_seed(0)
    logits, previous = torch.randn(6, V), torch.tensor([0, 3, 3, 42, 99, 7])
    wm = Watermark(key=1234, delta=2.5)
    out, green = wm(previous, logits), wm.green_mask(previous, V)
    assert torch.equal(out[green], logits[green] + 2.5)
    assert torch.equal(out[~green], logits[~green])  # bit for bit
    assert torch.equal(logits, logits.clone())  # the input is not modified in place


# ----- detection ------------------------------------------------------------------


def chain(wm: Watermark, length: int, want_green: bool, start: int = 0) -> list[int]:
    """A sequence whose every token is (or is not) on its predecessor's green list, with no bigram repeated."""
    seq, used = [start], set()
    for _ in range(length - 1):
        prev = seq[-1]
        pool = green_set(wm, prev) if want_green else set(range(V)) - green_set(wm, prev)
        token = min(t for t in pool if (prev, t) not in used)
        used.add((prev, token))
        seq.append(token)
    return seq


def test_all_green_text_scores_the_formula():
    ids = chain(WM, 201, want_green=True)
    result = detect(ids, WM, V)
    T, gamma = 200, 0.25
    assert (result.green, result.scored) == (T, T)
    assert result.z == pytest.approx(math.sqrt(T * (1 - gamma) / gamma), rel=1e-12)
    assert result.watermarked and result.p_value < 1e-30


def test_detection_uses_the_exact_green_fraction_k_over_v():
    """V = 10 at γ = 0.25: k = round(2.5) = 2 (half to even), so a green list is 2 / 10 = 0.2 of the
    vocabulary and an all-green text of T tokens scores (T - 0.2 T) / sqrt(T 0.2 0.8), p = 0.2^T."""
    assert WM.green_size(10) == 2
    seq = [0]
    for _ in range(20):
        seq.append(min(green_set(WM, seq[-1], 10)))
    result = detect(seq, WM, 10, ignore_repeated=False)
    T, gamma = 20, 0.2
    assert (result.green, result.scored) == (T, T)
    assert result.z == pytest.approx((T - gamma * T) / math.sqrt(T * gamma * (1 - gamma)), rel=1e-12)
    assert result.p_value == pytest.approx(gamma**T, rel=1e-9)


def test_no_green_text_scores_the_formula():
    result = detect(chain(WM, 101, want_green=False), WM, V)
    assert (result.green, result.scored) == (0, 100)
    assert result.z == pytest.approx(-math.sqrt(100 * 0.25 / 0.75), rel=1e-12)
    assert not result.watermarked and result.p_value > 0.99


def test_mixed_text_counts_its_green_tokens():
    green, red = chain(WM, 31, True), chain(WM, 71, False, start=1)
    ids = green + red  # 30 + 70 scored within the halves, plus the bigram that joins them
    hits = green_hits(ids, WM, V, ignore_repeated=False)
    joint = int(hits[30])
    result = detect(ids, WM, V, ignore_repeated=False)
    assert (result.green, result.scored) == (30 + joint, 101)
    assert result.z == pytest.approx((30 + joint - 0.25 * 101) / math.sqrt(101 * 0.25 * 0.75), rel=1e-12)
    assert result.p_value == pytest.approx(binomial_tail(30 + joint, 101, 0.25), rel=1e-12)
    assert result.p_value == pytest.approx(p_value(result.z), abs=0.05)  # the normal approximation, roughly


def test_repeated_bigrams_are_scored_once_unless_asked():
    ids = [3, 8] * 50  # bigrams (3, 8) and (8, 3), over and over
    assert detect(ids, WM, V).scored == 2
    assert detect(ids, WM, V, ignore_repeated=False).scored == 99
    assert detect([3], WM, V) == detect([], WM, V)  # nothing to score: z 0, p 1, not watermarked
    assert (detect([3], WM, V).z, detect([3], WM, V).p_value) == (0.0, 1.0)


def test_z_score_and_p_value_by_hand():
    assert z_score(50, 100, 0.25) == pytest.approx(25 / math.sqrt(18.75))
    assert p_value(0.0) == 0.5
    assert p_value(4.0) == pytest.approx(3.167e-5, rel=1e-3)  # the paper's false-positive rate at z = 4


def test_uniform_random_text_is_not_flagged():
    """Under the null (tokens independent of the key), z is about standard normal."""
    gen = torch.Generator().manual_seed(0)
    wm = Watermark(key=99)
    zs = torch.tensor([detect(torch.randint(0, 500, (200,), generator=gen), wm, 500).z for _ in range(1000)])
    assert abs(zs.mean().item()) < 0.1  # 3 standard errors of the mean of 1,000 N(0, 1)
    assert 0.9 < zs.std().item() < 1.1
    assert (zs > 4).sum().item() == 0  # expected 0.03 of 1,000


def test_detect_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="ids"):
        detect([1, 2, V], WM, V)


# ----- settings ---------------------------------------------------------------------


@pytest.mark.parametrize("changes, field", [
    (dict(gamma=0.0), "gamma"), (dict(gamma=1.0), "gamma"), (dict(gamma=float("nan")), "gamma"),
    (dict(delta=-1.0), "delta"), (dict(delta=1e300), "delta"), (dict(key=-1), "key"), (dict(key=b""), "key"), (dict(key=1.5), "key"),
    (dict(key=True), "key"),
])
def test_bad_settings_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        Watermark(**{"key": 1, **changes})


def test_too_small_a_vocabulary_for_gamma_is_an_error():
    with pytest.raises(ValueError, match="gamma"):
        Watermark(key=1, gamma=0.01).green_size(10)  # round(0.1) = 0 green tokens


def test_key_stays_out_of_the_repr():
    assert "s3cret" not in repr(Watermark(key="s3cret"))
    assert "s3cret" not in repr(SamplingParams(watermark=Watermark(key="s3cret")))


def test_sampling_params_take_a_watermark_or_its_fields():
    params = SamplingParams.from_dict({"max_new_tokens": 5, "watermark": {"key": 7, "delta": 3.0}})
    assert params.watermark == Watermark(key=7, delta=3.0)
    with pytest.raises(ValueError, match="watermark.detla"):
        SamplingParams(watermark={"key": 7, "detla": 3.0})
    with pytest.raises(ValueError, match="^watermark"):
        SamplingParams(watermark=7)


# ----- generation -------------------------------------------------------------------

PROMPTS = [[5, 17, 3, 40, 41], [33], [70, 71, 72]]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=160, init_std=0.1)
    return Transformer(config).eval()


@torch.no_grad()
def reference_greedy(model, prompt, n):
    """No cache, no batching, no watermark: recompute the whole sequence for every token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_without_watermark_is_unchanged(model):
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    assert Generator(model).generate_ids(PROMPTS, params) == [reference_greedy(model, p, 30) for p in PROMPTS]


def test_zero_delta_watermark_changes_nothing(model):
    for params in (SamplingParams(max_new_tokens=40, seed=3, ignore_eos=True),
                   SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)):
        plain = Generator(model).generate_ids(PROMPTS, params)
        assert Generator(model).generate_ids(PROMPTS, replace(params, watermark=Watermark(key=1, delta=0.0))) == plain


def test_decoder_biases_each_token_by_its_true_previous_token(model):
    """With an overwhelming δ every token lands on the green list of the token
    before it, the first one on the last prompt token's (prompts left-padded)."""
    wm = Watermark(key=5, delta=1e4)
    outs = Generator(model).generate_ids(PROMPTS, SamplingParams(max_new_tokens=20, seed=0, ignore_eos=True, watermark=wm))
    for prompt, out in zip(PROMPTS, outs):
        assert green_hits(prompt[-1:] + out, wm, V, ignore_repeated=False).all()


def test_watermarked_generation_is_detected_and_plain_generation_is_not(model):
    wm = Watermark(key=2024)  # γ 0.25, δ 2
    params = SamplingParams(max_new_tokens=120, seed=0, ignore_eos=True)
    marked = Generator(model).generate_ids(PROMPTS, replace(params, watermark=wm))
    plain = Generator(model).generate_ids(PROMPTS, params)
    assert all(detect(ids, wm, V).z > 6 for ids in marked)
    assert all(abs(detect(ids, wm, V).z) < 3 for ids in plain)
    assert all(abs(detect(ids, Watermark(key=2025), V).z) < 3 for ids in marked)  # the wrong key sees nothing


def test_watermark_sits_after_the_repetition_penalty_and_before_top_k():
    torch.manual_seed(1)
    logits, previous = torch.randn(4, V), torch.tensor([1, 2, 3, 4])
    seen = torch.rand(4, V) < 0.3
    wm = Watermark(key=8, delta=1.5)
    greedy = SamplingParams(temperature=0, repetition_penalty=1.3, watermark=wm)
    expected = wm(previous, apply_repetition_penalty(logits, seen, 1.3)).argmax(dim=-1)
    assert torch.equal(sample_next(logits, greedy, seen=seen, previous=previous), expected)
    # top-k 1 after the bias keeps the best biased token; before it, the best unbiased one would win
    hot = SamplingParams(temperature=0.5, top_k=1, watermark=wm)
    assert torch.equal(sample_next(logits, hot, torch.Generator().manual_seed(0), previous=previous),
                       wm(previous, logits).argmax(dim=-1))
    with pytest.raises(ValueError, match="watermark"):
        sample_next(logits, hot)


def test_sampling_without_watermark_is_the_plain_chain():
    torch.manual_seed(2)
    logits = torch.randn(5, V)
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9)
    expected = torch.multinomial(apply_top_p(apply_top_k(apply_temperature(logits, 0.7), 40), 0.9).softmax(-1), 1,
                                 generator=torch.Generator().manual_seed(4)).squeeze(-1)
    assert torch.equal(sample_next(logits, params, torch.Generator().manual_seed(4)), expected)


def test_the_binomial_tail_equals_brute_force_enumeration():
    """P(X >= g) for X ~ Binomial(T, γ), against summing every outcome of T coin flips."""
    import itertools

    for trials, gamma in ((6, 0.25), (9, 0.5), (10, 0.3)):
        weights = {}
        for flips in itertools.product((0, 1), repeat=trials):
            g = sum(flips)
            weights[g] = weights.get(g, 0.0) + gamma ** g * (1 - gamma) ** (trials - g)
        for green in range(trials + 2):
            want = sum(w for g, w in weights.items() if g >= green)
            assert binomial_tail(green, trials, gamma) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_the_binomial_tail_of_a_certain_outcome_is_exact():
    assert binomial_tail(3, 5, 0.0) == 0.0 and binomial_tail(3, 5, 1.0) == 1.0
    with pytest.raises(ValueError, match="p: a probability in"):
        binomial_tail(3, 5, 1.5)


def test_short_texts_are_held_to_the_false_positive_rate_of_the_z_threshold():
    """Six scored bigrams all green is z = 6.9 > 4, but it happens by chance 4^-6 = 2.4e-4 of the
    time, 7.7 times the 3.2e-5 that z > 4 stands for: the exact tail says not watermarked."""
    wm, vocab = Watermark(key=7), 64
    ids, prev = [0], 0
    while len(ids) < 7:  # a text whose every bigram is green, and distinct
        green = wm.green_mask(torch.tensor([prev]), vocab)[0].nonzero().flatten().tolist()
        prev = next(t for t in green if t not in ids)
        ids.append(prev)
    found = detect(ids, wm, vocab)
    assert found.green == found.scored == 6 and found.z > DEFAULT_Z_THRESHOLD
    assert found.p_value == pytest.approx(0.25 ** 6) and not found.watermarked
    assert p_value(DEFAULT_Z_THRESHOLD) == pytest.approx(3.17e-5, rel=1e-2)


def test_a_batch_of_texts_is_refused_rather_than_scored_across_its_rows():
    with pytest.raises(ValueError, match=r"ids: one text's token ids \(N,\), got shape \(2, 5\)"):
        detect(torch.zeros(2, 5, dtype=torch.long), Watermark(key=7), 64)


def test_detection_makes_one_green_list_per_distinct_previous_token_a_few_at_a_time(monkeypatch):
    """The same hits as a green list per position, with rows made in chunks (here of 3 rows):
    memory no longer grows with the text's length."""
    import heron.govern.watermark as watermark

    wm, vocab = Watermark(key=11), 64
    ids = torch.randint(0, vocab, (400,), generator=torch.Generator().manual_seed(5))
    per_position = wm.green_mask(ids[:-1], vocab).gather(1, ids[1:, None]).squeeze(1)
    monkeypatch.setattr(watermark, "DETECT_ROWS_BYTES", 3 * vocab)
    assert torch.equal(green_hits(ids, wm, vocab, ignore_repeated=False), per_position)
    pairs = torch.unique(ids[:-1] * vocab + ids[1:])
    distinct = wm.green_mask(pairs // vocab, vocab).gather(1, (pairs % vocab)[:, None]).squeeze(1)
    assert torch.equal(green_hits(ids, wm, vocab), distinct)
