"""Sparse attention equals dense attention under the pattern's explicit mask.

The reference is SDPA with `dense_mask(pattern, T)`, the masked dense
computation sparse patterns are usually implemented as. Property-based tests
draw patterns, shapes and lengths that are not multiples of the block size.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from heron.core import KVCache, ModelConfig, Transformer
from heron.core.config import AttentionPattern
from heron.core.sparse import BLOCK, allowed, dense_mask, flex_sparse_attention, sparse_attention

TOL = 1e-5


def patterns() -> st.SearchStrategy[AttentionPattern]:
    small = st.integers(1, 70)
    return st.one_of(
        st.builds(AttentionPattern, kind=st.just("sliding"), window=small),
        st.builds(AttentionPattern, kind=st.just("dilated"), window=st.integers(1, 20), dilation=st.integers(1, 5)),
        st.builds(AttentionPattern, kind=st.just("strided"), stride=small),
        st.builds(AttentionPattern, kind=st.just("fixed"), block=st.integers(8, 80), summary=st.integers(1, 8)),
        st.builds(
            AttentionPattern,
            kind=st.just("bigbird"),
            block=st.integers(2, 24),
            local_blocks=st.integers(0, 2),
            global_blocks=st.integers(0, 2),
            random_blocks=st.integers(0, 3),
            seed=st.integers(0, 5),
        ),
    )


def reference(q, k, v, pattern):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(pattern, q.shape[2]), enable_gqa=True)


@settings(max_examples=60, deadline=None)
@given(
    pattern=patterns(),
    length=st.integers(1, 3 * BLOCK + 5),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    groups=st.integers(1, 2),
    head_dim=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 2**16),
)
def test_sparse_equals_masked_dense_forward_and_backward(pattern, length, batch, kv_heads, groups, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, length, head_dim, generator=g, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=g, requires_grad=True)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=g, requires_grad=True)
    out, want = sparse_attention(q, k, v, pattern), reference(q, k, v, pattern)
    assert (out - want).abs().max() <= TOL
    grad = torch.randn(out.shape, generator=g)
    got_grads = torch.autograd.grad(out, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for got, expected in zip(got_grads, want_grads):
        assert (got - expected).abs().max() <= TOL


@settings(max_examples=25, deadline=None)
@given(pattern=patterns(), length=st.integers(2, 2 * BLOCK + 9), pads=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_padding_makes_the_pattern_follow_real_tokens(pattern, length, pads, seed):
    """A left-padded row equals the same row alone: the pattern applies to real-token indices."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, length, 8, generator=g) for _ in range(3))
    padded = [torch.cat([torch.randn(1, 2, pads, 8, generator=g), x], dim=2) for x in (q, k, v)]
    key_mask = torch.arange(pads + length)[None] >= pads
    out = sparse_attention(*padded, pattern, key_mask=key_mask)
    assert (out[:, :, pads:] - reference(q, k, v, pattern)).abs().max() <= TOL


def test_rules_match_their_definitions():
    """Spot checks of each rule against its paper's wording, i = 20."""
    j = torch.arange(21)
    visible = lambda pattern: j[allowed(pattern, torch.tensor(20), j)].tolist()  # noqa: E731
    assert visible(AttentionPattern("sliding", window=3)) == [18, 19, 20]
    assert visible(AttentionPattern("dilated", window=3, dilation=4)) == [12, 16, 20]
    assert visible(AttentionPattern("strided", stride=6)) == [2, 8, 14, 15, 16, 17, 18, 19, 20]
    assert visible(AttentionPattern("fixed", block=8, summary=2)) == [6, 7, 14, 15, 16, 17, 18, 19, 20]
    bigbird = visible(AttentionPattern("bigbird", block=4, local_blocks=1, global_blocks=1, random_blocks=1))
    random_block = bigbird[4:-5]  # global block 0, one random whole block among 1-3, own and previous block
    assert bigbird[:4] == [0, 1, 2, 3] and bigbird[-5:] == list(range(16, 21))
    assert len(random_block) == 4 and random_block[0] % 4 == 0 and 4 <= random_block[0] <= 12


SCHEDULES = {
    "sliding": (AttentionPattern("sliding", window=5),),
    "gpt_neo": (AttentionPattern(), AttentionPattern("sliding", window=7)),
    "dilated": (AttentionPattern("dilated", window=3, dilation=2),),
    "strided": (AttentionPattern("strided", stride=4),),
    "fixed": (AttentionPattern("fixed", block=8, summary=2),),
    "bigbird": (AttentionPattern("bigbird", block=4, random_blocks=1),),
}


def sparse_model(schedule) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, attention=schedule)
    return Transformer(config).eval()


@pytest.mark.parametrize("name", SCHEDULES)
def test_cached_decoding_equals_full_forward(name):
    model = sparse_model(SCHEDULES[name])
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.allocate(model.config, batch_size=2, max_len=40)
        pieces = [model(ids[:, :10], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(10, 25)]
        pieces.append(model(ids[:, 25:], cache=cache).logits)  # a chunk after cached tokens
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= TOL


@pytest.mark.parametrize("name", SCHEDULES)
def test_left_padded_batch_decodes_like_each_row_alone(name):
    model = sparse_model(SCHEDULES[name])
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        alone = model(ids[1:, 3:]).logits
        cache = KVCache.allocate(model.config, batch_size=2, max_len=40)
        pieces = [model(ids[:, :12], attention_mask=mask[:, :12], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(12, 40)]
    assert (torch.cat(pieces, dim=1)[1, 3:] - alone[0]).abs().max() <= TOL


@pytest.mark.parametrize("name", SCHEDULES)
def test_a_batch_whose_every_row_opens_with_padding_decodes_from_its_first_token(name):
    """Fed one token at a time from the start, the first steps see padding alone in every
    row (token index -1 throughout: bigbird once drew a table of 0 blocks there and failed);
    each row then equals itself alone."""
    model = sparse_model(SCHEDULES[name])
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    pads = (2, 5)
    mask = torch.arange(12)[None] >= torch.tensor(pads)[:, None]  # (2, 12)
    with torch.no_grad():
        cache = KVCache.allocate(model.config, batch_size=2, max_len=12)
        steps = [model(ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], cache=cache).logits for t in range(12)]
        got = torch.cat(steps, dim=1)
        for row, pad in enumerate(pads):
            assert (got[row, pad:] - model(ids[row : row + 1, pad:]).logits[0]).abs().max() <= TOL


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name", ["gpt_neo", "sliding", "bigbird"])  # dense, ring, full sparse caches
def test_an_input_of_another_batch_size_than_the_cache_is_refused_by_name(name, rows):
    """One row into a cache of two once broadcast into both rows (bigbird then ran on, silently)."""
    model = sparse_model(SCHEDULES[name])
    cache = KVCache.allocate(model.config, batch_size=2, max_len=8)
    with torch.no_grad(), pytest.raises(ValueError, match=rf"cache: allocated for a batch of 2 rows, got an input of {rows}"):
        model(torch.zeros(rows, 4, dtype=torch.long), cache=cache)


def test_sliding_window_cache_memory_is_bounded_by_the_window():
    schedule = (AttentionPattern("sliding", window=16),)
    config = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=4096, attention=schedule)
    short = KVCache.allocate(config, batch_size=1, max_len=256)
    long = KVCache.allocate(config, batch_size=1, max_len=4096)
    assert short.nbytes == long.nbytes == 2 * 2 * 16 * 32 * 4  # layers x (k, v) x window x width x fp32
    model = Transformer(config).eval()
    ids = torch.randint(0, 61, (1, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.allocate(config, batch_size=1, max_len=100)
        pieces = [model(ids[:, :30], cache=cache).logits]  # a prompt longer than the window
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(30, 100)]
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= TOL


def test_pattern_hook_sees_the_sparse_pattern():
    model = sparse_model(SCHEDULES["sliding"])
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(4))
    seen = {}
    with model.hooks({"blocks.0.attn.hook_pattern": lambda x, name: seen.setdefault(name, x)}):
        hooked = model(ids).logits
    pattern = seen["blocks.0.attn.hook_pattern"][0, 0]  # (T, S)
    assert torch.equal(pattern > 0, dense_mask(SCHEDULES["sliding"][0], 12))
    assert (hooked - model(ids).logits).abs().max() <= TOL


def test_pattern_hook_under_a_ring_cache_gives_the_window_s_keys_in_position_order():
    """Decoding past the window, the ring holds keys in slot order (token t in slot t % window);
    the hooked pattern's columns are the held keys oldest first, the full forward's row there."""
    model = sparse_model(SCHEDULES["sliding"])
    window = SCHEDULES["sliding"][0].window
    ids = torch.randint(0, 61, (1, 3 * window), generator=torch.Generator().manual_seed(6))
    full, steps = {}, []
    with torch.no_grad():
        with model.hooks({"blocks.0.attn.hook_pattern": lambda x, name: full.update(p=x[0])}):
            model(ids)
        cache = KVCache.allocate(model.config, batch_size=1, max_len=ids.shape[1])
        with model.hooks({"blocks.0.attn.hook_pattern": lambda x, name: steps.append(x[0, :, -1])}):
            model(ids[:, :window + 1], cache=cache)
            for t in range(window + 1, ids.shape[1]):
                model(ids[:, t:t + 1], cache=cache)
    for t, row in zip(range(window, ids.shape[1]), steps):  # (nh, held) each
        torch.testing.assert_close(row[:, -window:], full["p"][:, t, t - window + 1:t + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("name", SCHEDULES)
def test_a_half_precision_model_keeps_its_dtype_and_the_fp32_logits(name, dtype, tol):
    """At 40 tokens strided, fixed and bigbird merge parts by their fp32
    log-sum-exps; the merged output must come back in the model's dtype for
    its `out` projection, and the logits stay near the fp32 model's."""
    model = sparse_model(SCHEDULES[name])
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits
        got = model.to(dtype)(ids).logits
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() <= tol


@pytest.mark.parametrize("name", SCHEDULES)
def test_a_bf16_autocast_training_step_follows_the_fp32_one(name):
    """`train.precision: bf16` runs the step under CPU autocast, where RoPE's
    fp32 tables leave q and k fp32 beside a bf16 v; the sparse engines must
    run them as autocast runs SDPA, both ways, near the fp32 loss and grads."""
    model = sparse_model(SCHEDULES[name])
    ids = torch.randint(0, 61, (2, 41), generator=torch.Generator().manual_seed(6))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    params = list(model.parameters())
    want_loss = model(inputs, targets=targets).loss
    want_grads = torch.autograd.grad(want_loss, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(inputs, targets=targets).loss
    grads = torch.autograd.grad(loss, params)
    assert abs(loss.item() - want_loss.item()) <= 1e-3 * want_loss.item()
    for got, expected in zip(grads, want_grads):
        assert got.isfinite().all() and (got - expected).norm() <= 3e-2 * expected.norm()


def test_config_schedules_cycle_and_errors_name_the_field():
    config = ModelConfig.from_dict(
        dict(vocab_size=10, d_model=16, n_layers=4, n_heads=2, attention=[{"kind": "dense"}, {"kind": "sliding", "window": 8}])
    )
    assert [config.attention_pattern(i).kind for i in range(4)] == ["dense", "sliding", "dense", "sliding"]
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match=r"attention\[1\]\.window"):
        ModelConfig.from_dict(dict(vocab_size=10, d_model=16, n_layers=4, n_heads=2, attention=[{}, {"kind": "sliding", "window": 0}]))
    with pytest.raises(ValueError, match=r"attention\[0\]\.kind"):
        ModelConfig.from_dict(dict(vocab_size=10, d_model=16, n_layers=4, n_heads=2, attention=[{"kind": "diagonal"}]))
    with pytest.raises(ValueError, match="attention: 3 entries"):
        ModelConfig(vocab_size=10, d_model=16, n_layers=4, n_heads=2, attention=(AttentionPattern(),) * 3)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@settings(max_examples=15, deadline=None)
@given(pattern=patterns(), length=st.integers(1, 300), groups=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_flex_engine_equals_masked_dense(pattern, length, groups, seed):
    """The GPU engine's block mask and rule, run here through eager FlexAttention, which
    has no backward on CPU (tests/test_cuda.py runs the compiled kernel both ways on a
    GPU); lengths cross flex's 128-token blocks."""
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2 * groups, length, 16, generator=g)
    k, v = (torch.randn(1, 2, length, 16, generator=g) for _ in range(2))
    out = flex_sparse_attention(q, k, v, pattern, kernel=flex_attention)
    assert (out - reference(q, k, v, pattern)).abs().max() <= TOL
