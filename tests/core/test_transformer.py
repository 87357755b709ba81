"""Core invariants: cached decoding equals the full forward, padding changes
nothing, hooks with nothing attached change nothing."""
import pytest
import torch

from heron.core import KVCache, ModelConfig, RopeScaling, Transformer
from heron.core.config import AttentionPattern, MoEConfig

VARIANTS = {
    "mha": dict(),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "learned_layernorm_gelu": dict(positions="learned", norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True),
    "untied_gelu_tanh": dict(tie_embeddings=False, mlp="gelu_tanh"),
    "rope_linear": dict(rope_scaling=RopeScaling(kind="linear", factor=4.0)),
    "rope_llama3": dict(rope_scaling=RopeScaling(kind="llama3", factor=8.0, original_max_seq_len=16)),
    "no_positions": dict(positions="none"),
    "head_dim": dict(head_dim=8, n_kv_heads=2),
    "qk_norm": dict(qk_norm=True, head_dim=8, n_kv_heads=2),
    # Mixture of Experts: routing is per token, so the cache changes nothing (eval mode never drops).
    "moe_top2": dict(feed_forward=("dense", "moe"), moe=MoEConfig(n_experts=4, top_k=2)),
    "moe_top1_shared": dict(feed_forward=("moe",), moe=MoEConfig(n_experts=4, top_k=1, shared_expert=True)),
    "moe_capacity": dict(feed_forward=("dense", "moe"), moe=MoEConfig(n_experts=4, top_k=2, capacity_factor=0.5)),
    "attention_only": dict(feed_forward=("none",)),
}


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, **overrides)
    model = Transformer(config).eval()
    with torch.no_grad():  # non-zero biases so they are exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_forward(variant):
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits  # (3, 20, V)
        cache = KVCache.allocate(model.config, batch_size=3, max_len=24)
        pieces = [model(ids[:, :7], cache=cache).logits, model(ids[:, 7:11], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(11, 20)]
    stepwise = torch.cat(pieces, dim=1)
    assert (stepwise - full).abs().max().item() <= 1e-5
    assert cache.length == 20


@pytest.mark.parametrize("variant", ["mha", "gqa", "learned_layernorm_gelu", "moe_top2"])
def test_left_padding_changes_nothing(variant):
    model = make_model(**VARIANTS[variant])
    short = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 5])
    with torch.no_grad():
        alone = model(short).logits
        with_pad = model(padded, attention_mask=mask).logits[:, 3:]
        # And through the cache: prefill padded, then decode one token.
        cache = KVCache.allocate(model.config, 1, 16)
        model(padded, attention_mask=mask, cache=cache)
        nxt = torch.tensor([[11]])
        stepped = model(nxt, cache=cache).logits
        reference = model(torch.cat([short, nxt], dim=1)).logits[:, -1:]
    assert torch.isfinite(with_pad).all()
    assert (with_pad - alone).abs().max().item() <= 1e-5
    assert (stepped - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["mha", "rope_llama3", "moe_top2"])
def test_rope_tables_rebuilt_in_a_half_precision_model_are_the_cast_ones(variant, dtype):
    """reset_buffers on a bf16 model (as a bf16 import or pruning rebuilds one) gives the
    tables and logits `.to(dtype)` gives; fp32 tables rebuilt stay bit for bit as they were."""
    model = make_model(**VARIANTS[variant])
    before = model.rope_cos.clone(), model.rope_sin.clone()
    model.reset_buffers()
    assert torch.equal(model.rope_cos, before[0]) and torch.equal(model.rope_sin, before[1])
    cast = model.to(dtype)
    rebuilt = Transformer(model.config).to(dtype).eval()
    rebuilt.load_state_dict(cast.state_dict())
    rebuilt.reset_buffers()
    assert rebuilt.rope_cos.dtype == dtype
    assert torch.equal(rebuilt.rope_cos, cast.rope_cos) and torch.equal(rebuilt.rope_sin, cast.rope_sin)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))  # 40 rows: the MoE dispatch
    with torch.no_grad():
        logits = rebuilt(ids).logits
        assert logits.dtype == dtype and torch.equal(logits, cast(ids).logits)


def test_input_embeds_equal_token_ids():
    model = make_model()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_embeds=model.embed(ids)).logits, model(ids).logits)


def test_last_only_equals_last_position():
    model = make_model()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(ids, last_only=True).logits, model(ids).logits[:, -1:], atol=1e-6)


def test_tied_embeddings_share_storage():
    model = make_model()
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    untied = make_model(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()


def test_too_long_sequence_fails_clearly():
    model = make_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    cache = KVCache.allocate(model.config, 1, 8)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("variant", ["mha", "learned_layernorm_gelu"])
def test_explicit_positions_are_the_default_ones_or_a_value_error_naming_them(variant):
    """0..T-1 given as (T,), (1, T) (Hugging Face's position_ids) or (B, T), int64 or int32, are
    the default positions. A negative one (RoPE read it from the table's end: rope_cos[-3] is
    row 61), a float, or another shape is refused before any table is read."""
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        default = model(ids).logits
        for positions in (torch.arange(5), torch.arange(5, dtype=torch.int32), torch.arange(5)[None],
                          torch.arange(5).expand(2, 5)):
            assert torch.equal(model(ids, positions=positions).logits, default)
        for positions, message in [
            (torch.tensor([0, 1, -3, 3, 4]), "-3 is negative"),
            (torch.tensor([0, 1, 2, 3, 64]), "64 exceeds max_seq_len 64"),
            (torch.arange(5.0), "expected int64 or int32 indices, got torch.float32"),
            (torch.arange(5) < 3, "expected int64 or int32 indices, got torch.bool"),
            (torch.arange(4), r"expected \(5,\), \(1, 5\) or \(2, 5\) for the input, got \(4,\)"),
            (torch.arange(5).expand(3, 5), r"expected \(5,\), \(1, 5\) or \(2, 5\) for the input, got \(3, 5\)"),
        ]:
            with pytest.raises(ValueError, match=f"^positions: {message}"):
                model(ids, positions=positions)


def test_bad_inputs_fail_clearly():
    model = make_model()
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    for empty in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)):
        with pytest.raises(ValueError, match="input_ids: needs at least one row of at least one token"):
            model(empty)
    with pytest.raises(ValueError, match="input_embeds: needs at least one row"):
        model(input_embeds=torch.zeros(1, 0, 64))
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(2, 3\)"):
        model(ids, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask: expected bool .* got torch.float32"):
        model(ids, attention_mask=torch.zeros(2, 3))  # additive 0/-inf or 0/1 floats: ambiguous
    with pytest.raises(ValueError, match=r"token_mask: expected shape \(2, 3\)"):
        model(ids, token_mask=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("variant", ["mha", "sliding_moe", "moe_capacity"])
def test_a_hugging_face_integer_mask_is_the_bool_mask(variant):
    """Tokenizers hand out 0/1 long masks: the same logits, MoE statistics and balancing loss as the bool mask
    (a MoE once indexed its rows by the integers, counting the wrong tokens)."""
    sliding_moe = dict(attention=(AttentionPattern(kind="sliding", window=4),), feed_forward=("moe",),
                       moe=MoEConfig(n_experts=4, top_k=1, capacity_factor=1.0))
    model = make_model(**(sliding_moe if variant == "sliding_moe" else VARIANTS[variant])).train()
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, :4] = mask[2, :7] = False  # left padding
    outputs = []
    for given in (mask, mask.long(), mask.int()):
        torch.manual_seed(0)
        out = model(ids, attention_mask=given)
        stats = [b.mlp.last_stats for b in model.blocks if hasattr(b.mlp, "last_stats")]
        outputs.append((out.logits[mask], out.aux_loss, stats))
    for logits, aux, stats in outputs[1:]:
        assert torch.equal(logits, outputs[0][0]) and torch.equal(aux, outputs[0][1])
        for got, want in zip(stats, outputs[0][2]):
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_attention_only_block_equals_a_dense_block_with_its_mlp_zeroed():
    """A "none" layer has no MLP weights; with the other weights shared, it is a
    dense model whose MLP output is replaced by zeros, bit for bit."""
    dense = make_model()
    mixed = make_model(feed_forward=("dense", "none"))
    assert mixed.blocks[1].mlp is None and mixed.blocks[1].mlp_norm is None
    assert not [name for name in mixed.state_dict() if name.startswith(("blocks.1.mlp", "blocks.1.mlp_norm"))]
    mixed.load_state_dict({k: v for k, v in dense.state_dict().items()
                           if not k.startswith(("blocks.1.mlp.", "blocks.1.mlp_norm."))})
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    seen = {}
    record = lambda x, name: seen.__setitem__(name, x)  # noqa: E731
    with torch.no_grad():
        with dense.hooks({"blocks.1.hook_mlp_out": lambda x, _: torch.zeros_like(x)}):
            expected = dense(ids).logits
        with mixed.hooks({n: record for n in ("blocks.1.hook_mlp_out", "blocks.1.hook_resid_mid",
                                              "blocks.1.hook_resid_post")}):
            got = mixed(ids).logits
    assert torch.equal(got, expected)
    assert torch.equal(seen["blocks.1.hook_mlp_out"], torch.zeros(2, 9, 64))
    assert torch.equal(seen["blocks.1.hook_resid_post"], seen["blocks.1.hook_resid_mid"])
