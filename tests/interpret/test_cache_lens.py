"""Activation cache, logit lens and direct logit attribution on tiny seeded models.

Known answers: the lens at the last depth is the model's logits; cached
values are the ones a plain hook reads; size estimates equal the real sizes;
attributions add up to the logit and one head's share is recomputed by hand
from the weights and by zeroing that head.
"""
import re

import pytest
import torch

import heron
from heron.core import ModelConfig, MoEConfig, Transformer
from heron.interpret import (
    ActivationCache,
    activation_bytes,
    direct_logit_attribution,
    dla_names,
    logit_lens,
    resid_names,
    run_with_cache,
    select_hooks,
    token_lens,
)

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, init_std=0.2)
CONFIGS = {
    "rmsnorm-gqa-tied": dict(n_kv_heads=2),
    "layernorm-learned-biases-untied": dict(norm="layernorm", positions="learned", mlp="gelu", qkv_bias=True,
                                            out_bias=True, mlp_bias=True, tie_embeddings=False),
    "rmsnorm-mqa-wide-heads-out-bias": dict(n_kv_heads=1, head_dim=12, out_bias=True, tie_embeddings=False),
    "rmsnorm-moe-shared-expert": dict(n_kv_heads=2, feed_forward=("dense", "moe"),
                                      moe=MoEConfig(n_experts=4, top_k=2, shared_expert=True)),
    "gpt-neox-parallel-partial-rotary": dict(norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True,
                                             mlp_bias=True, tie_embeddings=False, rotary_dim=4,
                                             parallel_residual=True),
}


def make_model(**overrides) -> Transformer:
    """Seeded, with biases and norm gains drawn too (they start at 0 and 1)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.3)
    return model


def make_ids(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))


def plain_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ----- the cache -------------------------------------------------------------------


def test_cache_holds_exactly_the_selected_names_in_forward_order_with_a_plain_hooks_values():
    model, ids = make_model(n_kv_heads=2), make_ids()
    names = ["blocks.1.hook_resid_mid", "blocks.0.attn.hook_q", "hook_embed", "blocks.1.mlp.hook_post"]
    output, cache = run_with_cache(model, ids, names, device="cpu")
    seen = {}
    with torch.no_grad(), model.hooks({n: lambda x, name: seen.__setitem__(name, x.clone()) for n in names}):
        model(ids)
    assert list(cache) == ["hook_embed", "blocks.0.attn.hook_q", "blocks.1.hook_resid_mid", "blocks.1.mlp.hook_post"]
    for name in names:
        assert torch.equal(cache[name], seen[name]) and not cache[name].requires_grad
    assert torch.equal(output.logits, plain_logits(model, ids))  # reading hooks changes nothing


def test_globs_and_regexes_select_hook_names_in_model_order():
    model = make_model(n_kv_heads=2)
    assert select_hooks(model, "blocks.*.attn.hook_z") == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert select_hooks(model, re.compile(r"blocks\.1\.hook_resid_.*")) == [
        "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    both = select_hooks(model, ["blocks.1.hook_resid_post", "blocks.?.hook_resid_post"])  # overlaps once
    assert both == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    _, cache = run_with_cache(model, make_ids(), "blocks.*.attn.hook_z")
    assert set(cache) == {"blocks.0.attn.hook_z", "blocks.1.attn.hook_z"}


def test_a_pattern_that_matches_nothing_is_named_with_close_matches():
    model = make_model()
    with pytest.raises(KeyError, match=r"'blocks.0.hook_resid_pst'.*did you mean blocks.0.hook_resid_post"):
        run_with_cache(model, make_ids(), ["hook_embed", "blocks.0.hook_resid_pst"])
    with pytest.raises(KeyError, match=r"no hook point matches 'blocks.\*.attn.hook_zed'"):
        select_hooks(model, "blocks.*.attn.hook_zed")


def test_selecting_the_attention_pattern_materialises_causal_probabilities():
    model, ids = make_model(n_kv_heads=2), make_ids()
    output, cache = run_with_cache(model, ids, "blocks.*.attn.hook_pattern")
    pattern = cache["blocks.1.attn.hook_pattern"]
    assert pattern.shape == (2, 4, 8, 8)
    assert torch.allclose(pattern.sum(-1), torch.ones(2, 4, 8))
    assert (pattern.triu(1) == 0).all()
    assert torch.allclose(output.logits, plain_logits(model, ids), atol=1e-5)  # explicit softmax: rounding only


def test_memory_guard_names_the_total_and_the_biggest_before_running():
    model, ids = make_model(n_kv_heads=2), make_ids(batch=2, seq=8)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    # fp32: each pattern is 2*4*8*8*4 = 2048 bytes, each residual 2*8*32*4 = 2048 bytes.
    names = ["blocks.*.attn.hook_pattern", "blocks.0.hook_resid_post"]
    with pytest.raises(ValueError, match=r"needs 6\.0 KiB \(6144 bytes\), over max_bytes 5\.0 KiB \(5120 bytes\)"
                                         r"; biggest: blocks\.0\.attn\.hook_pattern 2\.0 KiB"):
        run_with_cache(model, ids, names, max_bytes=5120)
    assert calls == []  # refused before any forward pass
    _, cache = run_with_cache(model, ids, names, max_bytes=6144)
    assert sum(a.nbytes for a in cache.values()) == 6144


@pytest.mark.parametrize("kind", ["rmsnorm-gqa-tied", "rmsnorm-mqa-wide-heads-out-bias", "rmsnorm-moe-shared-expert"])
def test_size_estimates_equal_the_real_size_of_every_hook_point(kind):
    model, ids = make_model(**CONFIGS[kind]), make_ids(batch=2, seq=5)
    _, cache = run_with_cache(model, ids)  # everything
    estimates = activation_bytes(model, 2, 5)
    assert set(cache) == set(estimates)
    assert {n: a.nbytes for n, a in cache.items()} == estimates


def test_cache_helpers_stack_the_residual_stream_and_split_heads():
    model, ids = make_model(n_kv_heads=2), make_ids()
    _, full = run_with_cache(model, ids)
    stack = ActivationCache(dict(full), model.config).stack_resid()
    assert stack.shape == (3, 2, 8, 32)
    assert torch.equal(stack[0], full["hook_embed"]) and torch.equal(stack[1], full["blocks.0.hook_resid_post"])
    assert torch.equal(stack[2], full["blocks.1.hook_resid_post"])
    # resid_post of block 0 stands in for resid_pre of block 1, and the other way round.
    only_posts = ActivationCache({n: full[n] for n in ["hook_embed", "blocks.0.hook_resid_post",
                                                       "blocks.1.hook_resid_post"]}, model.config)
    assert torch.equal(only_posts.stack_resid(), stack)
    with pytest.raises(KeyError, match="depth 1: select blocks.1.hook_resid_pre or blocks.0.hook_resid_post"):
        ActivationCache({"hook_embed": full["hook_embed"]}, model.config).stack_resid()
    heads = full.heads(1)  # (B, T, H, hd)
    assert heads.shape == (2, 8, 4, 8)
    assert torch.equal(heads[:, :, 2], full["blocks.1.attn.hook_z"][..., 16:24])
    # A layer the model lacks was a KeyError suggesting other hook names.
    for layer in (2, 5, -1):
        with pytest.raises(IndexError, match=rf"^layer {layer} is outside the model's 2 layers \(valid: 0..1\)$"):
            full.heads(layer)


# ----- the logit lens --------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logit_lens_at_the_last_depth_is_the_model_logits(kind):
    model, ids = make_model(**CONFIGS[kind]), make_ids()
    output, cache = run_with_cache(model, ids, resid_names(model))
    lens = logit_lens(model, cache)
    assert lens.shape == (3, 2, 8, 64)
    assert torch.equal(lens[-1], output.logits)
    assert torch.equal(lens[-1], plain_logits(model, ids))
    with torch.no_grad():  # depth 0 reads the embeddings alone
        assert torch.equal(lens[0], model.lm_head(model.norm(cache["blocks.0.hook_resid_pre"])))


def test_a_cache_missing_what_a_lens_reads_names_the_function_and_the_names_to_record():
    model, ids = make_model(n_kv_heads=2), make_ids()
    _, cache = run_with_cache(model, ids, ["blocks.*.hook_resid_post"])
    with pytest.raises(KeyError, match=r"logit_lens: .* depth 0.*run_with_cache\(model, ids, resid_names\(model\)\)"):
        logit_lens(model, cache)
    _, cache = run_with_cache(model, ids, resid_names(model))
    with pytest.raises(KeyError, match=r"direct_logit_attribution: 'blocks.0.attn.hook_z' .*dla_names\(model\)"):
        direct_logit_attribution(model, cache, 3)


def test_token_lens_reads_one_token_of_the_full_lens():
    model, ids = make_model(n_kv_heads=2), make_ids()
    output, cache = run_with_cache(model, ids, resid_names(model))
    following = torch.roll(ids, -1, dims=1)  # (B, T): any per-position targets
    lens, full = token_lens(model, cache, following), logit_lens(model, cache)
    index = following.expand(3, 2, 8).unsqueeze(-1)  # (depths, B, T, 1)
    assert torch.equal(lens.logits, full.gather(-1, index)[..., 0])
    assert torch.allclose(lens.probs, full.softmax(-1).gather(-1, index)[..., 0])
    assert torch.allclose(lens.probs[-1], output.logits.softmax(-1).gather(-1, following[..., None])[..., 0])
    single = token_lens(model, cache, 5)
    assert torch.allclose(single.probs[-1], output.logits.softmax(-1)[..., 5])



def test_token_lens_takes_one_target_per_row_as_a_column_and_refuses_a_vector():
    """A (B,) vector broadcast as one id per *position*: a confusing expand error when B != T,
    and when B == T each row silently read the other rows' targets."""
    model, ids = make_model(n_kv_heads=2), make_ids(batch=8, seq=8)  # B == T: broadcasting would not fail
    _, cache = run_with_cache(model, ids, resid_names(model))
    per_row = torch.arange(8)  # row b's token b
    full = logit_lens(model, cache)  # (depths, B, T, V)
    column = token_lens(model, cache, per_row[:, None])
    assert torch.equal(column.logits, full[:, range(8), :, range(8)].transpose(0, 1))  # [d, b, t] = full[d, b, t, b]
    with pytest.raises(ValueError, match=r"^target: expected a token id or \(8, 8\) ids, one per position, got "
                                         r"shape \(8,\); for one token per row pass target\[:, None\]"):
        token_lens(model, cache, per_row)
    with pytest.raises(ValueError, match=r"^target: .* got shape \(2, 8, 1\)"):
        token_lens(model, cache, torch.zeros(2, 8, 1, dtype=torch.long))

# ----- direct logit attribution ------------------------------------------------------


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_attributions_add_up_to_the_target_logit(kind):
    model, ids = make_model(**CONFIGS[kind]), make_ids()
    output, cache = run_with_cache(model, ids, dla_names(model))
    targets = torch.tensor([3, 41])
    for position in (-1, 4):
        dla = direct_logit_attribution(model, cache, targets, position)
        model_logit = output.logits[torch.arange(2), position, targets]
        assert torch.allclose(dla.logit, model_logit, atol=1e-5)
        assert torch.allclose(dla.values.sum(-1), model_logit, atol=1e-5)
    assert dla.heads().shape == (2, 2, 4)
    c = model.config
    expected_columns = 1 + c.n_layers * (c.n_heads + 1 + c.out_bias) + (c.norm == "layernorm")
    assert len(dla.labels) == expected_columns == dla.values.shape[1]
    assert ("norm.bias" in dla.labels) == (c.norm == "layernorm")


def test_one_heads_share_matches_a_hand_computation_and_zeroing_that_head():
    model, ids = make_model(n_kv_heads=1, head_dim=12, out_bias=True, tie_embeddings=False), make_ids()
    layer, head, target, hd = 1, 2, 7, 12
    _, cache = run_with_cache(model, ids, dla_names(model))
    dla = direct_logit_attribution(model, cache, target, position=-1)
    # By hand: the head's slice of z through its columns of `out`, then the final RMSNorm
    # with its scale frozen at the real final residual, then the target's unembedding row.
    x = cache["blocks.1.hook_resid_post"][:, -1]  # (B, d)
    z = cache["blocks.1.attn.hook_z"][:, -1, head * hd:(head + 1) * hd]  # (B, hd)
    write = z @ model.blocks[layer].attn.out.weight[:, head * hd:(head + 1) * hd].T  # (B, d)
    rms = (x.square().mean(-1, keepdim=True) + model.norm.eps).sqrt()  # (B, 1)
    by_hand = (write / rms * model.norm.weight) @ model.lm_head.weight[target]  # (B,)
    assert torch.allclose(dla[f"blocks.{layer}.attn.heads.{head}"], by_hand.detach(), atol=1e-6)
    assert torch.equal(dla.heads()[:, layer, head], dla[f"blocks.{layer}.attn.heads.{head}"])
    # Zeroing the head's z removes exactly its write from the residual stream right after
    # attention (later, the MLP reads the change too: an indirect effect DLA leaves out).
    def zero_head(z, _name):
        z = z.clone()
        z[..., head * hd:(head + 1) * hd] = 0
        return z
    with torch.no_grad(), model.hooks({"blocks.1.attn.hook_z": zero_head}):
        _, ablated = run_with_cache(model, ids, ["blocks.1.hook_resid_mid"])
    _, clean = run_with_cache(model, ids, ["blocks.1.hook_resid_mid"])
    removed = clean["blocks.1.hook_resid_mid"][:, -1] - ablated["blocks.1.hook_resid_mid"][:, -1]  # (B, d)
    assert torch.allclose(removed, write.detach(), atol=1e-6)
    frozen_change = (removed / rms * model.norm.weight) @ model.lm_head.weight[target]
    assert torch.allclose(dla[f"blocks.{layer}.attn.heads.{head}"], frozen_change.detach(), atol=1e-6)


def test_cache_lens_and_attribution_on_a_hugging_face_llama_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False, initializer_range=0.2)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    model, tokenizer = heron.load(tmp_path)
    assert tokenizer is None
    ids = make_ids()
    output, cache = run_with_cache(model, ids, resid_names(model) + dla_names(model))
    with torch.no_grad():
        expected = reference(ids).logits
    lens = logit_lens(model, cache)
    assert torch.equal(lens[-1], output.logits)
    assert torch.allclose(lens[-1], expected, atol=1e-4)
    dla = direct_logit_attribution(model, cache, 11, position=-1)
    assert torch.allclose(dla.values.sum(-1), expected[:, -1, 11], atol=1e-4)
    assert torch.allclose(dla.values.sum(-1), dla.logit, atol=1e-5)


def test_an_unknown_name_points_to_valid_names_and_the_listing():
    with pytest.raises(KeyError, match=r"no hook point matches 'nonsense' \(this model has \d+ hook points, such "
                                       r"as hook_embed, .*heron\.core\.hook_points\(model\) lists them all\)"):
        run_with_cache(make_model(), make_ids(), ["nonsense"])


def test_empty_input_is_named():
    with pytest.raises(ValueError, match="^ids: empty input$"):
        run_with_cache(make_model(), torch.zeros(1, 0, dtype=torch.long))


def test_dla_target_and_position_out_of_range_name_the_argument_and_its_range():
    model = make_model()
    _, cache = run_with_cache(model, make_ids(seq=8), dla_names(model))
    with pytest.raises(ValueError, match=r"^target: token id 64 outside the vocabulary \(0..63\)"):
        direct_logit_attribution(model, cache, 64)
    with pytest.raises(ValueError, match=r"^target: token id -1 outside"):
        direct_logit_attribution(model, cache, torch.tensor([3, -1]))
    with pytest.raises(ValueError, match=r"^position: 8 outside the 8 input tokens \(valid: -8..7\)"):
        direct_logit_attribution(model, cache, 3, position=8)
    assert torch.equal(direct_logit_attribution(model, cache, 3, position=-8).values,
                       direct_logit_attribution(model, cache, 3, position=0).values)


# ----- a scalar head (a reward model) ------------------------------------------------


def test_a_scalar_heads_score_is_target_0_and_token_targets_are_refused_naming_the_head():
    """A reward model's one output is its score: attribution of target 0 splits it; a token
    id, or probabilities over a one-output "vocabulary" (always 1), are refused."""
    model = make_model(head="scalar", tie_embeddings=False)
    output, cache = run_with_cache(model, make_ids(), [*resid_names(model), *dla_names(model)])
    score = output.logits[:, -1, 0]  # (B,)
    dla = direct_logit_attribution(model, cache, 0)
    assert torch.allclose(dla.logit, score, atol=1e-5) and torch.allclose(dla.values.sum(-1), score, atol=1e-5)
    for target in (7, torch.tensor([0, 7])):
        with pytest.raises(ValueError, match=r"^target: a model with head 'scalar' has one output, its score, "
                                             r"not a vocabulary .* pass target=0 .*\(got 7\)$"):
            direct_logit_attribution(model, cache, target)
    for target in (0, 7):
        with pytest.raises(ValueError, match=r"^token_lens: a model with head 'scalar' .*logit_lens"):
            token_lens(model, cache, target)
