import pytest
import torch

from heron.core import KVCache, ModelConfig, Transformer, hook_points


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, **overrides)).eval()


def test_hooks_with_nothing_attached_change_nothing_bit_for_bit():
    model = make_model()
    ids = torch.randint(0, 50, (2, 12))
    plain = model(ids).logits
    with model.hooks({}):
        hooked = model(ids).logits
    assert torch.equal(plain, hooked)


def test_hook_names_and_shapes():
    model = make_model()
    names = set(hook_points(model))
    for expected in [
        "hook_embed",
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_resid_mid",
        "blocks.0.hook_mlp_out",
        "blocks.1.hook_resid_post",
        "blocks.1.attn.hook_q",
        "blocks.1.attn.hook_k",
        "blocks.1.attn.hook_v",
        "blocks.1.attn.hook_pattern",
        "blocks.1.attn.hook_z",
        "blocks.1.mlp.hook_post",
    ]:
        assert expected in names
    seen = {}
    record = lambda x, name: seen.__setitem__(name, x.shape)  # noqa: E731
    with model.hooks({n: record for n in ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_pattern"]}):
        model(torch.randint(0, 50, (2, 7)))
    assert seen == {
        "blocks.0.attn.hook_q": (2, 4, 7, 8),
        "blocks.0.attn.hook_k": (2, 2, 7, 8),
        "blocks.0.attn.hook_pattern": (2, 4, 7, 7),
    }


def test_q_and_k_hooks_see_them_before_rope_and_may_replace_them():
    """A q or k a hook replaced is rotated apart; otherwise RoPE makes one
    pass over both: the same numbers either way."""
    model = make_model()
    ids = torch.randint(0, 50, (2, 9))
    plain = model(ids).logits
    seen = {}
    with model.hooks({"blocks.0.attn.hook_q": lambda x, name: seen.__setitem__(name, x)}):
        hooked = model(ids).logits
    assert torch.equal(plain, hooked)
    with model.hooks({"blocks.0.attn.hook_k": lambda x, _: x.clone(), "blocks.1.attn.hook_q": lambda x, _: x.clone()}):
        replaced = model(ids).logits
    assert torch.equal(plain, replaced)
    block = model.blocks[0]
    with torch.no_grad():
        projected = block.attn.qkv(block.attn_norm(model.embed(ids)))[..., :32]  # (2, 9, nh * hd)
    assert torch.equal(seen["blocks.0.attn.hook_q"], projected.view(2, 9, 4, 8).transpose(1, 2))
    with model.hooks({"blocks.0.attn.hook_q": lambda x, _: 100 * x}):
        sharper = model(ids).logits
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[:32] *= 100  # the q rows: the same queries, made by the weights
    assert torch.allclose(sharper, model(ids).logits, atol=1e-5)
    assert not torch.allclose(sharper, plain, atol=1e-3)


def test_pattern_hook_sees_causal_probabilities_and_output_is_unchanged():
    model = make_model()
    ids = torch.randint(0, 50, (1, 6))
    plain = model(ids).logits
    patterns = []
    with model.hooks({"blocks.1.attn.hook_pattern": lambda x, _: patterns.append(x)}):
        hooked = model(ids).logits
    pattern = patterns[0][0]  # (nh, T, S)
    assert torch.allclose(pattern.sum(-1), torch.ones(4, 6))
    assert (pattern.triu(1) == 0).all()
    assert torch.allclose(plain, hooked, atol=1e-5)


def test_pattern_hook_under_a_cache_lets_each_new_query_see_the_cached_keys_and_itself():
    """Three queries after five cached tokens: query i sees keys 0 .. 5 + i, as the uncached forward does."""
    model = make_model()
    ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(3))
    whole = model(ids).logits
    cache = KVCache.allocate(model.config, 1, 8)
    model(ids[:, :5], cache=cache)
    patterns = []
    with model.hooks({"blocks.1.attn.hook_pattern": lambda x, _: patterns.append(x)}):
        stepped = model(ids[:, 5:], cache=cache).logits
    pattern = patterns[0][0]  # (nh, 3, 8)
    assert pattern.shape == (4, 3, 8)
    assert torch.equal(pattern > 0, torch.ones(3, 8, dtype=torch.bool).tril(5).expand(4, 3, 8))
    torch.testing.assert_close(stepped, whole[:, 5:], atol=1e-5, rtol=0)


def test_hook_can_replace_activation_and_is_removed_after_the_block():
    model = make_model()
    ids = torch.randint(0, 50, (1, 5))
    plain = model(ids).logits
    with model.hooks({"blocks.1.hook_resid_post": lambda x, _: torch.zeros_like(x)}):
        zeroed = model(ids).logits
    # With a zero residual, final RMSNorm gives zeros and the logits vanish.
    assert torch.allclose(zeroed, torch.zeros_like(zeroed))
    assert torch.equal(model(ids).logits, plain)
    assert not any(point.active for point in hook_points(model).values())


def test_unknown_hook_name_suggests_close_ones():
    model = make_model()
    with pytest.raises(KeyError, match="did you mean blocks.0.hook_resid_post"):
        with model.hooks({"blocks.0.hook_resid_pst": lambda x, _: None}):
            pass


def test_a_name_with_no_close_match_points_to_valid_names_and_the_listing():
    model = make_model()
    with pytest.raises(KeyError, match=r"such as hook_embed, .*heron\.core\.hook_points\(model\) lists them all"):
        with model.hooks({"nonsense": lambda x, _: None}):
            pass


@pytest.mark.parametrize("returned, described", [
    (lambda x: 3, "a value of type int"),
    (lambda x: x[:, -1:], r"a tensor of shape \(2, 1, 32\)"),
    (lambda x: x.flatten(), r"a tensor of shape \(384,\)"),
])
def test_a_replacement_of_another_shape_is_refused_naming_the_point_and_both_shapes(returned, described):
    model = make_model()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with model.hooks({"blocks.1.hook_resid_pre": lambda x, _: returned(x)}):
        with pytest.raises(ValueError, match=rf"hook function at 'blocks.1.hook_resid_pre' returned {described}; "
                                             r"expected None .* activation's shape \(2, 6, 32\)"):
            model(ids)


def test_observing_and_same_shape_replacements_still_work():
    model = make_model()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    plain = model(ids).logits
    with model.hooks({"blocks.1.hook_resid_pre": lambda x, _: None, "blocks.0.hook_mlp_out": lambda x, _: x.clone()}):
        assert torch.equal(model(ids).logits, plain)
