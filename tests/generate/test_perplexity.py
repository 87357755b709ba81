import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 97  # the `model` fixture's

from heron.core import ModelConfig, TransformerOutput
from heron.data.shards import ShardedTokens
from heron.generate.perplexity import evaluated_windows, perplexity, window_starts


class HalfRightBigram(nn.Module):
    """Puts probability 1/2 on token (x + 1) % V after x, the rest spread evenly."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, d_model=8, n_layers=1, n_heads=1)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> TransformerOutput:
        V = self.config.vocab_size
        probs = torch.full((*input_ids.shape, V), 0.5 / (V - 1))
        probs.scatter_(-1, ((input_ids + 1) % V)[..., None], 0.5)
        if targets is None:
            return TransformerOutput(logits=probs.log(), aux_loss=torch.zeros(()), cache=None)
        loss = F.nll_loss(probs.log().flatten(0, 1), targets.flatten(), reduction="sum")
        return TransformerOutput(logits=None, aux_loss=torch.zeros(()), cache=None, loss=loss)


def test_uniform_logits_give_the_vocabulary_size(model):
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to the embedding: every logit is 0
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=300)
    assert math.isclose(perplexity(model, tokens, seq_len=32, batch_size=4), VOCAB, rel_tol=1e-5)


def test_a_model_half_right_every_time_has_perplexity_two():
    tokens = torch.arange(203) % 11
    assert math.isclose(perplexity(HalfRightBigram(11), tokens, seq_len=16, batch_size=3), 2.0, rel_tol=1e-6)


@torch.no_grad()
def reference_perplexity(model, tokens, seq_len, starts):
    nll, count = 0.0, 0
    for s in starts:
        chunk = tokens[s : s + seq_len + 1]
        logp = model(chunk[None, :-1]).logits[0].log_softmax(-1)  # (L, V)
        nll -= logp.gather(-1, chunk[1:, None]).sum().item()
        count += len(chunk) - 1
    return math.exp(nll / count)


# 50 tokens in windows of 8 start at 0, 8, ..., 48 (the last predicts one token);
# max_batches of 3 windows take evenly spaced ones, not the first.
@pytest.mark.parametrize("max_batches, starts", [(None, [0, 8, 16, 24, 32, 40, 48]), (1, [0, 16, 32]),
                                                  (2, [0, 8, 16, 24, 32, 40]), (3, [0, 8, 16, 24, 32, 40, 48])])
def test_windows_and_the_short_tail_equal_a_one_window_at_a_time_loop(model, max_batches, starts):
    tokens = torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(0))
    assert list(window_starts(50, 8)) == [0, 8, 16, 24, 32, 40, 48]
    assert evaluated_windows(50, 8, 3, max_batches) == starts
    got = perplexity(model, tokens, seq_len=8, batch_size=3, max_batches=max_batches)
    assert math.isclose(got, reference_perplexity(model, tokens, 8, starts), rel_tol=1e-5)


def test_a_few_batches_spread_over_the_stream_not_its_head():
    starts = evaluated_windows(100_000, 128, 8, 4)  # 32 of 782 windows
    assert len(starts) == 32 and starts[0] == 0 and starts[-1] > 0.95 * 100_000
    assert len(set(b - a for a, b in zip(starts, starts[1:])) - {24 * 128, 25 * 128}) == 0  # every 24th or 25th


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(tokens=np.zeros((2, 5), dtype=np.int64)), "tokens"),
        (dict(tokens=np.array([3])), "tokens"),
        (dict(tokens=np.array([3, VOCAB])), "tokens"),
        (dict(seq_len=0), "seq_len"),
        (dict(seq_len=1000), "seq_len"),
        (dict(batch_size=0), "batch_size"),
        (dict(max_batches=0), "max_batches"),
    ],
)
def test_bad_arguments_name_the_field(model, kwargs, field):
    args = dict(tokens=np.arange(20), seq_len=4, batch_size=2) | kwargs
    with pytest.raises(ValueError, match=f"^{field}:"):
        perplexity(model, **args)


@pytest.mark.parametrize("field, value", [("seq_len", 4.0), ("batch_size", 2.0), ("max_batches", 1.5),
                                          ("seq_len", True)])
def test_sizes_that_are_not_ints_are_refused_by_name(model, field, value):
    args = dict(tokens=np.arange(20), seq_len=4, batch_size=2) | {field: value}
    with pytest.raises(ValueError, match=f"^{field}: expected an int, got {value}$"):  # not a TypeError from range()
        perplexity(model, **args)


def test_numpy_int_sizes_are_ints(model):
    tokens = np.arange(20)
    assert perplexity(model, tokens, np.int64(4), np.int32(2), np.int64(1)) == perplexity(model, tokens, 4, 2, 1)


def test_progress_bar_does_not_change_the_answer(model):
    tokens = np.arange(40) % VOCAB
    assert perplexity(model, tokens, 8, 2, progress=True) == perplexity(model, tokens, 8, 2)



@pytest.mark.parametrize("tokens", [torch.tensor([1.5, 2.7, 3.0]), np.array([1.0, 2.0, 3.0])])
def test_float_tokens_are_refused_not_truncated(model, tokens):
    with pytest.raises(ValueError, match="^tokens: token ids must be integers, got torch.float"):
        perplexity(model, tokens, seq_len=4, batch_size=1)


def memmapped_shards(folder, ids: np.ndarray, sizes: list[int]) -> ShardedTokens:
    """ids cut into read-only uint16 shard files of the given sizes, as `load_shards` maps them."""
    shards, start = [], 0
    for i, size in enumerate(sizes):
        file = folder / f"val_{i:06d}.bin"
        ids[start : start + size].astype("<u2").tofile(file)
        shards.append(np.memmap(file, dtype="<u2", mode="r"))
        start += size
    return ShardedTokens(shards)


class CountingTokens:
    """A token stream that counts the tokens read from it (it has no __array__: reads go through [])."""

    def __init__(self, tokens: ShardedTokens) -> None:
        self.tokens, self.read = tokens, 0

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        got = self.tokens[index]
        self.read += np.size(got)
        return got


# Shards of 37, 50 and 13 tokens: windows of 8 straddle both joins, and the last window is short.
@pytest.mark.parametrize("max_batches", [None, 1, 2])
def test_shards_give_the_numbers_of_the_same_ids_in_one_tensor(model, tmp_path, max_batches):
    ids = np.random.default_rng(0).integers(0, VOCAB, size=100)
    sharded = memmapped_shards(tmp_path, ids, [37, 50, 13])
    got = perplexity(model, sharded, seq_len=8, batch_size=3, max_batches=max_batches)
    assert got == perplexity(model, torch.from_numpy(ids), seq_len=8, batch_size=3, max_batches=max_batches)


def test_only_the_evaluated_windows_are_read(model, tmp_path):
    ids = np.random.default_rng(0).integers(0, VOCAB, size=5_000)
    tokens = CountingTokens(memmapped_shards(tmp_path, ids, [2_000, 2_000, 1_000]))
    perplexity(model, tokens, seq_len=16, batch_size=2, max_batches=3)
    starts = evaluated_windows(5_000, 16, 2, 3)
    assert len(starts) == 6 and tokens.read == 6 * 17  # each window's 16 inputs and its last target


def test_ids_out_of_range_are_refused_in_an_evaluated_window(model, tmp_path):
    ids = np.arange(40) % VOCAB
    ids[33] = VOCAB
    with pytest.raises(ValueError, match=rf"^tokens: ids must lie in \[0, {VOCAB}\)$"):
        perplexity(model, memmapped_shards(tmp_path, ids, [30, 10]), seq_len=8, batch_size=2)
