import numpy as np
import pytest
import torch

from heron.data import PackedBatches, ShardedTokens, eval_batches
from heron.data.batches import spread_evenly

# With tokens = 0, 1, 2, ... every window is known: a row starting at o is o, o+1, ..., o+T.
TOKENS = np.arange(1000, dtype=np.uint16)


def test_rows_are_contiguous_windows_and_y_is_x_shifted() -> None:
    x, y = PackedBatches(TOKENS, batch_size=8, seq_len=16, seed=0).batch(3)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)  # the next token of every position
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(8, 16))


def test_batch_depends_only_on_seed_and_step() -> None:
    a = PackedBatches(TOKENS, batch_size=4, seq_len=8, seed=7)
    b = PackedBatches(TOKENS.copy(), batch_size=4, seq_len=8, seed=7)
    late = b.batch(99)  # b computes step 99 first: no hidden state carries between steps
    assert all(torch.equal(u, v) for u, v in zip(a.batch(99), late))
    assert torch.equal(a.batch(5)[0], a.batch(5)[0])
    assert not torch.equal(a.batch(5)[0], a.batch(6)[0])
    assert not torch.equal(a.batch(5)[0], PackedBatches(TOKENS, 4, 8, seed=8).batch(5)[0])


def test_ranks_and_micro_batches_tile_the_global_batch() -> None:
    batches = PackedBatches(TOKENS, batch_size=8, seq_len=8, seed=1)
    x, y = batches.batch(2)
    for world in (2, 4, 8):
        parts = [batches.batch(2, rank=r, world_size=world) for r in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="not divisible"):
        batches.batch(0, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank must be in"):
        batches.batch(0, rank=2, world_size=2)


def test_offsets_reach_the_end_but_never_past_it() -> None:
    batches = PackedBatches(np.arange(12), batch_size=64, seq_len=8, seed=0)
    offsets = np.concatenate([batches.offsets(s) for s in range(20)])
    assert offsets.min() == 0 and offsets.max() == 12 - 8 - 1
    x, y = PackedBatches(np.arange(9), batch_size=2, seq_len=8, seed=0).batch(0)  # exactly T + 1 tokens
    assert torch.equal(x[1], torch.arange(8)) and torch.equal(y[1], torch.arange(1, 9))


def test_too_few_tokens_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"at least seq_len \+ 1 = 9 tokens.*got 8"):
        PackedBatches(np.arange(8), batch_size=2, seq_len=8, seed=0)
    with pytest.raises(ValueError, match="got 8"):
        next(eval_batches(np.arange(8), batch_size=2, seq_len=8))


def test_sharded_tokens_batch_like_one_array() -> None:
    sharded = ShardedTokens([TOKENS[:300], TOKENS[300:301], TOKENS[301:]])
    a = PackedBatches(sharded, batch_size=16, seq_len=32, seed=3).batch(11)
    b = PackedBatches(TOKENS, batch_size=16, seq_len=32, seed=3).batch(11)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_spread_evenly_takes_the_first_and_steps_over_the_rest() -> None:
    assert spread_evenly(range(0, 100, 10), 4) == [0, 20, 50, 70]
    assert spread_evenly([3, 5, 7], None) == [3, 5, 7] and spread_evenly([3, 5, 7], 9) == [3, 5, 7]
    assert spread_evenly(range(1000), 10) == list(range(0, 1000, 100))
    with pytest.raises(ValueError, match="count"):
        spread_evenly([1, 2], 0)


def test_eval_batches_score_each_whole_window_target_once() -> None:
    """103 tokens = 102 targets at T=10: the 100 of the 10 whole windows, the last 2 unscored."""
    tokens = np.arange(103)
    batches = list(eval_batches(tokens, batch_size=4, seq_len=10))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]  # (103 - 1) // 10 = 10 windows
    targets = torch.cat([y.flatten() for _, y in batches])
    assert torch.equal(targets, torch.arange(1, 101))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    spread = list(eval_batches(tokens, 4, 10, max_batches=1))  # 4 of the 10 windows, evenly spaced
    assert len(spread) == 1 and spread[0][0][:, 0].tolist() == [0, 20, 50, 70]
    shares = [torch.cat([y for _, y in eval_batches(tokens, 4, 10, rank=r, world_size=2)]) for r in (0, 1)]
    assert sorted(torch.cat(shares).flatten().tolist()) == list(range(1, 101))
