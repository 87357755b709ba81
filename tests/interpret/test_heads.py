"""Head scores on hand-built attention patterns, whose values are known exactly;
head finding on hand-made score tables; attention plots written as PNGs."""
import pytest
import torch

from heron.core import ModelConfig, Transformer
from heron.interpret.heads import (
    attention_patterns,
    find_heads,
    head_scores,
    induction_score,
    plot_attention,
    plot_attention_patterns,
    previous_token_score,
    repeated_tokens,
)

torch.set_num_threads(1)  # tiny models gain nothing from two threads, and the machine is shared

PERIOD = 5
T = 2 * PERIOD


def hand_built_pattern() -> torch.Tensor:
    """(1, 3, T, T): an ideal induction head (itself in the first half), an ideal
    previous-token head (position 0 on itself), and uniform causal attention."""
    induction, previous = torch.eye(T, dtype=torch.float64), torch.eye(T, dtype=torch.float64)
    for t in range(PERIOD, T):
        induction[t] = 0
        induction[t, t - PERIOD + 1] = 1
    for t in range(1, T):
        previous[t] = 0
        previous[t, t - 1] = 1
    causal = torch.ones(T, T, dtype=torch.float64).tril()
    return torch.stack([induction, previous, causal / causal.sum(-1, keepdim=True)])[None]


def test_scores_of_hand_built_patterns_are_exact():
    pattern = hand_built_pattern()
    uniform_induction = sum(1 / (t + 1) for t in range(PERIOD, T)) / PERIOD  # query t sees t + 1 keys
    uniform_previous = sum(1 / (t + 1) for t in range(1, T)) / (T - 1)
    torch.testing.assert_close(induction_score(pattern, PERIOD),
                               torch.tensor([1.0, 0.0, uniform_induction], dtype=torch.float64))
    torch.testing.assert_close(previous_token_score(pattern),
                               torch.tensor([0.0, 1.0, uniform_previous], dtype=torch.float64))
    # Rows of a batch are averaged: an ideal row and a uniform one give their mean.
    mixed = torch.cat([pattern, pattern[:, [2, 2, 2]]])  # (2, 3, T, T)
    assert induction_score(mixed, PERIOD)[0].item() == pytest.approx((1 + uniform_induction) / 2)


def test_scores_refuse_shapes_they_cannot_read():
    with pytest.raises(ValueError, match="period"):
        induction_score(hand_built_pattern(), T)
    with pytest.raises(ValueError, match="pattern: expected"):
        previous_token_score(torch.ones(3, T, T))
    with pytest.raises(ValueError, match="period"):
        repeated_tokens(2, 65, vocab_size=64)


def test_repeated_tokens_are_distinct_and_repeat_once():
    ids = repeated_tokens(4, 16, vocab_size=20, seed=3)
    assert ids.shape == (4, 32) and torch.equal(ids[:, :16], ids[:, 16:])
    assert all(len(set(row[:16].tolist())) == 16 for row in ids)
    assert torch.equal(ids, repeated_tokens(4, 16, vocab_size=20, seed=3))


def test_find_heads_reports_every_head_past_the_threshold_and_their_margin():
    scores = torch.tensor([[0.10, 0.90], [0.85, 0.20]])  # (layers, heads)
    found = find_heads(scores, threshold=0.4)
    assert found.heads == ((0, 1), (1, 0)) and found.best == (0, 1)
    assert found.margin == pytest.approx(0.85 - 0.20)  # weakest found over strongest other
    none = find_heads(torch.tensor([[0.10, 0.30], [0.20, 0.05]]), threshold=0.4)
    assert none.heads == () and none.best == (0, 1)
    assert none.margin == pytest.approx(0.30 - 0.20)  # with nothing found: best over runner-up


def make_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   max_seq_len=32)).eval()


def test_patterns_and_scores_come_from_the_pattern_hook():
    model = make_model()
    ids = repeated_tokens(3, 6, vocab_size=50)
    patterns = attention_patterns(model, ids)
    assert sorted(patterns) == [0, 1] and patterns[1].shape == (3, 4, 12, 12)
    torch.testing.assert_close(patterns[0].sum(-1), torch.ones(3, 4, 12))
    scores = head_scores(model, ids, period=6)
    assert set(scores) == {"induction", "previous_token"}
    torch.testing.assert_close(scores["induction"][1], induction_score(patterns[1], 6))
    assert attention_patterns(model, ids, layers=[1]).keys() == {1}


def test_plots_are_png_files_one_per_layer(tmp_path):
    model = make_model()
    ids = repeated_tokens(1, 5, vocab_size=50)
    tokens = [f"t{i} " for i in ids[0].tolist()]
    paths = plot_attention_patterns(attention_patterns(model, ids), tmp_path / "patterns", tokens=tokens)
    assert [p.name for p in paths] == ["layer_0.png", "layer_1.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in paths)
    with pytest.raises(ValueError, match="tokens: 3 labels for 10 key positions"):
        plot_attention(torch.rand(4, 10, 10), tmp_path / "bad.png", tokens=["a", "b", "c"])


def test_negative_layers_count_from_the_end_and_others_name_the_valid_range():
    model, ids = make_model(), repeated_tokens(2, PERIOD, 50)
    last = attention_patterns(model, ids, layers=[-1])
    assert list(last) == [1] and torch.equal(last[1], attention_patterns(model, ids, layers=[1])[1])
    with pytest.raises(ValueError, match=r"^layers: 2 is outside the model's 2 layers \(valid: -2..1\)"):
        attention_patterns(model, ids, layers=[0, 2])
    with pytest.raises(ValueError, match=r"^layers: empty selection.*\(valid: -2..1\), or None for every layer$"):
        attention_patterns(model, ids, layers=[])  # was {} without a word
    with pytest.raises(ValueError, match="^ids: empty input$"):
        attention_patterns(model, torch.zeros(1, 0, dtype=torch.long))
