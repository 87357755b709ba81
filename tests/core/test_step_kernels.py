"""Heron's step kernels (csrc/step.c) against the torch ops they stand in for: attention
for one new token over the KV cache, RMSNorm, the embedding lookup, and a whole plain
layer in one call."""
import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from heron.core import ModelConfig, Transformer
from heron.core.config import AttentionPattern, MoEConfig
from heron.core.kv_cache import KVCache
from heron.core.linear import MAX_ROWS, STREAM_ROWS, Linear, set_decode_layout, streams
from heron.core.norms import RMSNorm
from heron.core.rope import apply_rope, rope_tables
from heron.core.transformer import causal_padding_mask
from heron.core.step_kernels import LayerStep, attend_new_token, embedding_step, rms_norm_step, step_kernels

built = pytest.mark.skipif(step_kernels() is None, reason="Heron's step kernels are not built here")


def test_the_step_kernels_are_built_where_they_can_be():
    """setup.py builds them as an optional extension, and their tests skip where it is missing:
    with a C compiler, a missing module means the build broke."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: the step kernels are not expected here")
    assert step_kernels() is not None


def _reference(qkv, heads, hd, rope, q_factor, keys, values, length, key_mask):
    """The layer's torch ops for one new token: RoPE, the cache write, SDPA with padding hidden."""
    B, (n_q, n_kv) = qkv.shape[0], heads
    q, k, v = qkv.view(B, -1, 1, hd).split((n_q, n_kv, n_kv), dim=1)  # (B, heads, 1, hd)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if q_factor is not None:
        q = q * q_factor
    keys[:, :, length], values[:, :, length] = k[:, :, 0], v[:, :, 0]
    mask = None if key_mask is None else key_mask[:, None, None, : length + 1]
    y = F.scaled_dot_product_attention(q, keys[:, :, : length + 1], values[:, :, : length + 1], attn_mask=mask,
                                       enable_gqa=n_q != n_kv)
    return y.reshape(B, 1, n_q * hd)


def _cache(B, n_kv, slots, hd, generator):
    keys, values = (torch.randn(B, n_kv, slots, hd, generator=generator) for _ in range(2))
    return KVCache([keys], [values], slots)


@built
@pytest.mark.parametrize(("B", "n_q", "n_kv", "hd"), [(1, 8, 8, 64), (3, 4, 2, 8), (2, 6, 1, 24), (1, 2, 2, 80)])
@pytest.mark.parametrize("length", [0, 1, 37])
@pytest.mark.parametrize("rope_rows", ["none", "shared", "per row"])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_for_one_new_token_equals_torch(B, n_q, n_kv, hd, length, rope_rows, padded):
    generator = torch.Generator().manual_seed(B * 1000 + n_q * 100 + hd + length)
    slots = length + 5  # slots past the new token's stay as they were
    cache = _cache(B, n_kv, slots, hd, generator)
    cache.length = length
    reference_keys, reference_values = cache.keys[0].clone(), cache.values[0].clone()
    qkv = torch.randn(B, 1, (n_q + 2 * n_kv) * hd, generator=generator)
    cos, sin = rope_tables(64, hd, 10_000.0, None)
    rope = None
    if rope_rows == "shared":  # every row at one position: (1, hd) rows, as the step takes them
        rope = cos[length : length + 1], sin[length : length + 1]
    elif rope_rows == "per row":  # left padding puts rows at other positions: (B, 1, 1, hd)
        at = torch.randint(0, 64, (B,), generator=generator)
        rope = cos[at][:, None, None], sin[at][:, None, None]
    if padded:
        cache.key_mask = torch.rand(B, slots, generator=generator) > 0.4
        cache.key_mask[:, length] = True  # the new token is real
    q_factor = 0.7 if n_kv == 1 else None

    got = attend_new_token(qkv, (n_q, n_kv), hd, rope, q_factor, cache, 0)
    expected = _reference(qkv, (n_q, n_kv), hd, rope, q_factor, reference_keys, reference_values, length,
                          cache.key_mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.keys[0], reference_keys, rtol=1e-6, atol=1e-6)  # rotated in the kernel
    assert torch.equal(cache.values[0], reference_values)  # copied
    assert cache.length == length  # the caller advances it


@built
def test_long_caches_share_the_heads_among_threads_with_the_same_numbers():
    generator = torch.Generator().manual_seed(7)
    B, n_q, n_kv, hd, length = 2, 8, 4, 64, 700  # past the work below which one thread does it all
    cache = _cache(B, n_kv, length + 1, hd, generator)
    cache.length = length
    qkv = torch.randn(B, 1, (n_q + 2 * n_kv) * hd, generator=generator)
    reference_keys, reference_values = cache.keys[0].clone(), cache.values[0].clone()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = attend_new_token(qkv, (n_q, n_kv), hd, None, None, cache, 0)
        torch.set_num_threads(1)
        one = attend_new_token(qkv, (n_q, n_kv), hd, None, None, cache, 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each head is one thread's work either way
    expected = _reference(qkv, (n_q, n_kv), hd, None, None, reference_keys, reference_values, length, None)
    torch.testing.assert_close(two, expected, rtol=1e-5, atol=1e-6)


@built
def test_attention_leaves_other_dtypes_and_wide_heads_to_torch():
    generator = torch.Generator().manual_seed(2)
    cache = _cache(1, 2, 4, 8, generator)
    qkv = torch.randn(1, 1, 6 * 8, generator=generator)
    assert attend_new_token(qkv.double(), (2, 2), 8, None, None, cache, 0) is None
    wide = _cache(1, 1, 4, 520, generator)
    assert attend_new_token(torch.randn(1, 1, 3 * 520), (1, 1), 520, None, None, wide, 0) is None


@built
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's, for the bf16 input
@pytest.mark.parametrize("shape", [(1, 1, 512), (3, 1, 40), (5, 7)])
def test_rms_norm_equals_the_module(shape):
    generator = torch.Generator().manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], eps=0.5)  # large enough to show in the numbers
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=generator)
    x = torch.randn(*shape, generator=generator) * 3
    with torch.inference_mode():
        got, expected = rms_norm_step(norm)(x), norm(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        half = x.bfloat16()  # another dtype: the module's own forward
        assert torch.equal(rms_norm_step(norm)(half), norm(half))


@built
@pytest.mark.parametrize("layout", ["row-major", "input-major"])
def test_embedding_lookup_equals_torch_bit_for_bit(layout):
    generator = torch.Generator().manual_seed(4)
    embed = nn.Embedding(50, 24)
    with torch.no_grad():
        embed.weight.normal_(generator=generator)
        if layout == "input-major":  # a table tied to an output head laid out for decoding (core/linear.py)
            embed.weight.data = embed.weight.data.t().contiguous().t()
    ids = torch.tensor([3, 49, 0, 3])
    lookup = embedding_step(embed)
    assert torch.equal(lookup(ids), embed(ids[:, None]))
    assert torch.equal(lookup(ids.int()), embed(ids.int()[:, None]))  # int32 ids: torch's lookup
    with pytest.raises(IndexError, match="token id 50 is out of range for a vocabulary of 50"):
        lookup(torch.tensor([1, 50]))
    with pytest.raises(IndexError, match="token id -1"):
        lookup(torch.tensor([-1]))


def _plain_block(config_changes: dict, rows: int = 1) -> tuple[Transformer, nn.Module]:
    model = Transformer(ModelConfig(**{**PLAIN, **config_changes})).eval()
    set_decode_layout(model, rows)
    return model, model.blocks[1]


PLAIN = dict(vocab_size=64, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=44, max_seq_len=32)


@built
@pytest.mark.parametrize(("changes", "plain"), [
    ({}, True), ({"qkv_bias": True, "mlp_bias": True, "parallel_residual": True, "positions": "learned"}, True),
    ({"qk_norm": True}, True), ({"mlp": "gelu"}, True), ({"norm": "layernorm"}, True),
    ({"norm": "layernorm", "mlp": "gelu_tanh", "positions": "learned", "parallel_residual": True}, True),
    ({"attention": (AttentionPattern("sliding", window=4),)}, True),
    ({"attention": (AttentionPattern("dilated", window=3, dilation=2),)}, True),
    ({"attention": (AttentionPattern("strided", stride=4),)}, True),
    ({"attention": (AttentionPattern("fixed", block=4, summary=1),)}, True),
    ({"attention": (AttentionPattern("bigbird", block=4),)}, True),
    ({"feed_forward": ("moe",), "moe": MoEConfig(n_experts=2)}, True),
    ({"feed_forward": ("moe",), "moe": MoEConfig(n_experts=2, shared_expert=True), "mlp_bias": True}, True),
    ({"feed_forward": ("moe",), "moe": MoEConfig(n_experts=2), "mlp": "gelu"}, True),
    ({"rotary_dim": 32}, True),  # partial rotary: RoPE's tables pass the other dims through
])
def test_layer_step_takes_plain_blocks_only(changes, plain):
    if not streams():
        pytest.skip("no streaming kernel: no layer is plain")
    _, block = _plain_block(changes)
    assert LayerStep.takes(block) == plain
    if plain:  # laid out for GEMMs, not for the streaming kernel: not plain either
        set_decode_layout(block, rows=STREAM_ROWS + 1)
        assert not LayerStep.takes(block)


@built
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("moe", [
    MoEConfig(n_experts=4, top_k=2),
    MoEConfig(n_experts=5, top_k=1, d_ff=24),
    MoEConfig(n_experts=4, top_k=3, shared_expert=True, router_centering=True, routed_scale=2.0),
], ids=["top-2", "top-1", "top-3 shared, centred, scaled"])
def test_a_moe_layer_in_one_call_equals_the_block(moe, rows):
    """The router, the chosen experts (each once, on the rows that chose it) and a shared expert,
    as the MoE's decoding path computes them, and the routing statistics it leaves."""
    if not streams():
        pytest.skip("no streaming kernel: no layer is plain")
    torch.manual_seed(rows)
    model, block = _plain_block({"feed_forward": ("moe",), "moe": moe, "mlp_bias": True}, rows)
    with torch.no_grad():
        block.mlp.router.weight.normal_(0, 0.5)  # routing away from near-ties
        if block.mlp.router_center is not None:
            block.mlp.router_center.normal_()
    assert LayerStep.takes(block)
    cache = KVCache.allocate(model.config, rows, 32)
    cache.length = 6
    for t in cache.keys + cache.values:
        t.normal_()
    reference_cache = copy.deepcopy(cache)
    x, rope = torch.randn(rows, 1, 128), (model.rope_cos[6:7], model.rope_sin[6:7])
    with torch.inference_mode():
        got = LayerStep(block)(x, rope, cache)
        stats = block.mlp.last_stats
        expected = block(x, rope, None, reference_cache)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.keys[1], reference_cache.keys[1], rtol=1e-6, atol=1e-6)
    for name, value in block.mlp.last_stats.items():
        torch.testing.assert_close(stats[name], value, rtol=1e-5, atol=1e-6)
    assert stats["load"].count_nonzero() > (1 if rows * moe.top_k > 1 else 0)  # more than one expert where it can


@built
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("pattern", [
    AttentionPattern("sliding", window=4), AttentionPattern("dilated", window=3, dilation=2),
    AttentionPattern("strided", stride=3), AttentionPattern("fixed", block=4, summary=2),
    AttentionPattern("bigbird", block=2, local_blocks=1, global_blocks=1, random_blocks=1),
], ids=lambda p: p.kind)
@pytest.mark.parametrize("padded", [False, True])
def test_a_sparse_layer_in_one_call_equals_the_block(pattern, rows, padded):
    """A sliding or dilated window over its ring cache, step after step past the ring's wrap, and
    the other patterns over the whole cache (the keys `KVCache.step_mask` picks), as the block's
    sparse attention computes them; in a left-padded batch a pattern is a rule on each row's real
    tokens, so a window's keys span more slots than the window (rows of 3, 1 and 0 pad tokens)."""
    if not streams():
        pytest.skip("no streaming kernel: no layer is plain")
    torch.manual_seed(rows)
    model, block = _plain_block({"attention": (pattern,)}, rows)
    cache = KVCache.allocate(model.config, rows, 32)
    if pattern.span is not None:
        assert cache.keys[1].shape[2] == pattern.span < cache.max_len  # a ring of the window's span
    else:
        assert cache.keys[1].shape[2] == cache.max_len
    pads = [3, 1, 0][:rows] if padded else None
    if pads is not None:
        cache.key_mask = torch.arange(32)[None] >= torch.tensor(pads)[:, None]  # (rows, 32): pads first
    reference_cache = copy.deepcopy(cache)
    step = LayerStep(block)
    with torch.inference_mode():
        for t in range(16):
            x, rope = torch.randn(rows, 1, 128), (model.rope_cos[t : t + 1], model.rope_sin[t : t + 1])
            mask = None
            if pads is not None:  # as the model's step masks a padded batch: causal over the real keys so far
                mask = causal_padding_mask(t, 1, cache.key_mask[:, : t + 1], "cpu")
            got = step(x, rope, cache)
            expected = block(x, rope, mask, reference_cache, cache.key_mask[:, : t + 1] if pads is not None else None)
            torch.testing.assert_close(got[torch.tensor([t >= p for p in pads]) if pads else slice(None)],
                                       expected[torch.tensor([t >= p for p in pads]) if pads else slice(None)],
                                       rtol=1e-5, atol=1e-5)
            cache.advance(1)
            reference_cache.advance(1)


@built
@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated", "ignore:torch.quantize_per_tensor")
def test_blocks_of_torch_quantised_linears_are_not_plain():
    """torch's dynamic int8 linears (`quantize_dynamic`; their `bias` is a method) offer the kernel
    no product: the block runs in parts."""
    if not streams():
        pytest.skip("no streaming kernel: no layer is plain")
    model, block = _plain_block({"qkv_bias": True})
    for module in block.modules():
        if type(module) is Linear:
            module.__class__ = nn.Linear  # quantize_dynamic converts exact nn.Linears only
    quantised = torch.ao.quantization.quantize_dynamic(block, {nn.Linear}, dtype=torch.qint8)
    assert callable(quantised.attn.qkv.bias)
    assert not LayerStep.takes(quantised)


@built
@pytest.mark.parametrize("rows", [1, 3, 12, 40])  # 12, 40: two and five groups of register tiles
@pytest.mark.parametrize("variant", [{}, {"qk_norm": True}, {"norm": "layernorm", "mlp": "gelu"},
                                     {"norm": "layernorm", "mlp": "gelu_tanh", "parallel_residual": True, "rotary_dim": 16}],
                         ids=["llama", "qk_norm", "layernorm-gelu", "neox (gelu_tanh, parallel, partial rotary)"])
def test_a_layer_in_one_call_equals_the_block(rows, variant):
    """Gate pre-activations from -60 to 60 (SwiGLU's exponential over its whole range; GELU's far
    tails) and a hidden width that is not a multiple of the kernel's eight lanes; norms' gains and
    biases away from 1 and 0."""
    torch.manual_seed(rows)
    model, block = _plain_block({"qkv_bias": True, "out_bias": True, "mlp_bias": True, **variant}, rows)
    assert LayerStep.takes(block)
    with torch.no_grad():
        for norm in (block.attn.q_norm, block.attn.k_norm):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
        for norm in (block.attn_norm, block.mlp_norm):
            if getattr(norm, "bias", None) is not None:
                norm.bias.uniform_(-1, 1)
        block.mlp.up.weight.mul_(150)
        for p in (block.attn.qkv.bias, block.attn.out.bias, block.mlp.up.bias, block.mlp.down.bias,
                  block.attn_norm.weight, block.mlp_norm.weight):
            p.uniform_(-1, 1)
    cache = KVCache.allocate(model.config, rows, 32)
    cache.length = 6
    for t in cache.keys + cache.values:
        t.normal_()
    reference_cache = copy.deepcopy(cache)
    x = torch.randn(rows, 1, 128)
    rope = model.rope_cos[6:7], model.rope_sin[6:7]
    with torch.inference_mode():
        got = LayerStep(block)(x, rope, cache)
        expected = block(x, rope, None, reference_cache)
        gates = block.mlp.up(block.mlp_norm(x + block.attn(block.attn_norm(x), rope, None, copy.deepcopy(cache))))
    assert gates[..., :44].abs().max() > 40  # the exponential's range was reached
    # Past MAX_ROWS the block's products are GEMMs, which sum in another order than the few-row
    # products: where the gates run to 60 the two fp32 roundings were 1.6e-5 apart at 40 rows.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 if rows <= MAX_ROWS else 3e-5)
    torch.testing.assert_close(cache.keys[1], reference_cache.keys[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache.values[1], reference_cache.values[1], rtol=1e-6, atol=1e-6)
    assert LayerStep(block)(torch.randn(STREAM_ROWS + 1, 1, 128), rope, cache) is None  # past the kernel's rows
