"""Activation patching against invariants and known answers.

Known answers come from causality: when the clean and corrupted prompts
differ only at position p, every activation before p is the same in both
runs (patching it changes nothing), and the residual stream entering block 0
differs only at p (patching it there restores the clean run). When only the
last token differs, restoring the residual stream at the last position of
any layer restores the clean run.
"""
import pytest
import torch

from heron.compress.quantize import quantize_model
from heron.core import ModelConfig, MoEConfig, Transformer
from heron.interpret.cache import run_with_cache
from heron.interpret.patching import logit_diff, normalised, patch, patch_heads, patch_positions

# One thread: tiny models gain nothing from two, and the machine is shared.
torch.set_num_threads(1)

# Prompts longer than core's few-row Linear path (MAX_ROWS = 16) run every
# product, batched or not, through one GEMM path: sweeps are then bit-exact.
LONG = 20
METRIC = logit_diff(correct=1, incorrect=2)


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    # init_std 0.5: logits far from zero, so the clean-corrupted gap dwarfs float rounding.
    config = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, init_std=0.5)
    return Transformer(ModelConfig(**{**config, **overrides})).eval()


def prompts(T: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random clean prompt (T,) and a corrupted one that differs only at position p."""
    clean = torch.randint(0, 50, (T,), generator=torch.Generator().manual_seed(1))
    corrupted = clean.clone()
    corrupted[p] = (clean[p] + 7) % 50
    return clean, corrupted


def record(model: Transformer, ids: torch.Tensor, name: str) -> torch.Tensor:
    return run_with_cache(model, ids, [name])[1][name]


def reference(model: Transformer, clean: torch.Tensor, corrupted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return METRIC(model(clean[None]).logits)[0], METRIC(model(corrupted[None]).logits)[0]


def test_patching_nothing_changes_nothing_bit_for_bit():
    model = make_model()
    clean, corrupted = prompts(8, 3)
    ids = corrupted[None].expand(3, -1)
    with torch.no_grad():
        plain = model(ids).logits
        assert torch.equal(patch(model, ids, {}), plain)
        source = record(model, clean[None], "blocks.0.hook_resid_pre")
        nowhere = torch.zeros(3, 8, 1, dtype=torch.bool)
        assert torch.equal(patch(model, ids, {"blocks.0.hook_resid_pre": (nowhere, source)}), plain)


@pytest.mark.parametrize("name", ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "hook_embed"])
def test_patching_a_whole_residual_stream_recovers_the_clean_logits_exactly(name):
    model = make_model()
    clean, corrupted = prompts(8, 3)
    with torch.no_grad():
        clean_logits = model(clean[None]).logits
        patched = patch(model, corrupted[None], {name: record(model, clean[None], name)})
    assert torch.equal(patched, clean_logits)


def test_patching_an_int8_model_back_to_its_clean_run_gives_run_with_caches_logits_exactly():
    """patch runs without gradients, as run_with_cache does: with them on, an int8 layer took its
    differentiable reference path and the logits differed by ~4e-7 (and a graph was built)."""
    model = quantize_model(make_model(d_model=64), "int8", progress=False)
    clean, corrupted = prompts(12, 3)
    clean_run, cache = run_with_cache(model, clean[None], ["hook_embed"])
    patched = patch(model, corrupted[None], {"hook_embed": cache["hook_embed"]})  # gradients on, as a caller's are
    assert torch.equal(patched, clean_run.logits) and not patched.requires_grad


def test_index_and_mask_patches_agree_and_broadcast_over_the_batch():
    model = make_model()
    clean, corrupted = prompts(8, 3)
    name = "blocks.1.hook_resid_pre"
    ids = corrupted[None].expand(2, -1)
    with torch.no_grad():
        source = record(model, clean[None], name)  # (1, T, d): patches both rows
        by_index = patch(model, ids, {name: ((slice(None), 5), source)})
        mask = torch.zeros(1, 8, 1, dtype=torch.bool)
        mask[0, 5] = True
        by_mask = patch(model, ids, {name: (mask, source)})
    assert torch.equal(by_index, by_mask)
    assert torch.equal(by_index[0], by_index[1])


@pytest.mark.parametrize("T", [LONG, 8])
def test_sweep_restores_only_the_differing_position_at_block_0(T):
    model = make_model()
    p = 3
    clean, corrupted = prompts(T, p)
    values = patch_positions(model, clean, corrupted, METRIC)  # (L, T)
    expected = torch.zeros(T)
    expected[p] = 1.0
    torch.testing.assert_close(values[0], expected, atol=1e-6 if T == LONG else 1e-5, rtol=0)
    torch.testing.assert_close(values[1, :p], torch.zeros(p), atol=1e-6 if T == LONG else 1e-5, rtol=0)


@pytest.mark.parametrize("hook", ["hook_resid_pre", "hook_resid_mid", "hook_resid_post"])
def test_when_the_last_token_differs_every_layer_is_restored_at_the_last_position_only(hook):
    model = make_model()
    clean, corrupted = prompts(LONG, LONG - 1)
    values = patch_positions(model, clean, corrupted, METRIC, hook=hook)
    expected = torch.zeros(2, LONG)
    expected[:, -1] = 1.0
    torch.testing.assert_close(values, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("hook", ["hook_attn_out", "hook_mlp_out", "attn.hook_z", "mlp.hook_post"])
def test_component_sweeps_are_zero_before_the_differing_position(hook):
    model = make_model()
    p = 5
    clean, corrupted = prompts(LONG, p)
    values = patch_positions(model, clean, corrupted, METRIC, hook=hook)
    assert values.shape == (2, LONG)
    torch.testing.assert_close(values[:, :p], torch.zeros(2, p), atol=1e-6, rtol=0)
    assert values[:, p:].abs().max() > 1e-2


def test_one_head_sweep_equals_patching_all_of_hook_z():
    model = make_model(n_heads=1)
    clean, corrupted = prompts(LONG, 4)
    heads = patch_heads(model, clean, corrupted, METRIC)  # (L, 1)
    clean_value, corrupted_value = reference(model, clean, corrupted)
    for layer in range(2):
        name = f"blocks.{layer}.attn.hook_z"
        with torch.no_grad():
            logits = patch(model, corrupted[None], {name: record(model, clean[None], name)})
        assert torch.equal(heads[layer, 0], normalised(METRIC(logits), clean_value, corrupted_value)[0])
    per_position = patch_heads(model, clean, corrupted, METRIC, per_position=True)  # (L, 1, T)
    assert torch.equal(per_position[:, 0], patch_positions(model, clean, corrupted, METRIC, hook="attn.hook_z"))


def test_a_head_that_writes_nothing_has_no_effect():
    model = make_model()
    hd = 8
    with torch.no_grad():
        model.blocks[1].attn.out.weight[:, 2 * hd : 3 * hd] = 0.0  # head 2 of layer 1 writes nothing
    clean, corrupted = prompts(LONG, 4)
    heads = patch_heads(model, clean, corrupted, METRIC)
    per_position = patch_heads(model, clean, corrupted, METRIC, per_position=True)
    assert heads.shape == (2, 4) and per_position.shape == (2, 4, LONG)
    assert heads[1, 2] == 0.0
    assert torch.equal(per_position[1, 2], torch.zeros(LONG))
    assert heads.abs().max() > 1e-2


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_batched_position_sweep_equals_the_unbatched_loop_exactly(chunk_size):
    model = make_model()
    clean, corrupted = prompts(LONG, 6)
    clean_value, corrupted_value = reference(model, clean, corrupted)
    loop = torch.empty(2, LONG)
    for layer in range(2):
        name = f"blocks.{layer}.hook_mlp_out"
        source = record(model, clean[None], name)
        for position in range(LONG):
            with torch.no_grad():
                logits = patch(model, corrupted[None], {name: ((slice(None), position), source)})
            loop[layer, position] = METRIC(logits)[0]
    swept = patch_positions(model, clean, corrupted, METRIC, hook="hook_mlp_out", chunk_size=chunk_size)
    assert torch.equal(swept, normalised(loop, clean_value, corrupted_value))


def test_batched_head_sweep_equals_the_unbatched_loop_exactly():
    model = make_model()
    clean, corrupted = prompts(LONG, 6)
    loop = torch.empty(2, 4)
    for layer in range(2):
        name = f"blocks.{layer}.attn.hook_z"
        source = record(model, clean[None], name)
        for head in range(4):
            with torch.no_grad():
                logits = patch(model, corrupted[None], {name: ((..., slice(8 * head, 8 * head + 8)), source)})
            loop[layer, head] = METRIC(logits)[0]
    swept = patch_heads(model, clean, corrupted, METRIC, normalise=False, chunk_size=3)
    assert torch.equal(swept, loop)


def test_raw_values_normalise_to_the_normalised_sweep():
    model = make_model()
    clean, corrupted = prompts(LONG, 2)
    raw = patch_positions(model, clean, corrupted, METRIC, normalise=False)
    clean_value, corrupted_value = reference(model, clean, corrupted)
    assert torch.equal(raw[0, 0], corrupted_value)  # position 0 is the same in both runs
    assert torch.equal(raw[0, 2], clean_value)
    assert torch.equal(normalised(raw, clean_value, corrupted_value), patch_positions(model, clean, corrupted, METRIC))


def test_logit_diff_is_correct_minus_incorrect_at_the_position():
    logits = torch.arange(2 * 3 * 5, dtype=torch.float).view(2, 3, 5)
    assert torch.equal(logit_diff(4, 1)(logits), torch.tensor([3.0, 3.0]))
    assert torch.equal(logit_diff(0, 4, position=0)(logits), torch.tensor([-4.0, -4.0]))


def test_logit_diff_on_a_scalar_heads_scores_says_there_is_no_vocabulary():
    scores = torch.randn(2, 3, 1)  # (B, T, 1): a reward or value model's output
    with pytest.raises(ValueError, match="one score per position.*use the score itself"):
        logit_diff(0, 0)(scores)


MASK = torch.ones(8, 1, dtype=torch.bool)  # 2 dimensions, for a (B, T, d) activation
BAD_INPUTS = {  # call(model, clean, corrupted), the error, what its message names
    "lengths": (lambda m, c, x: patch_positions(m, c, x[:-1], METRIC), ValueError, "corrupted: 7 tokens"),
    "batch": (lambda m, c, x: patch_heads(m, c[None].expand(2, -1), x, METRIC), ValueError, "clean: expected one"),
    "hook": (lambda m, c, x: patch_positions(m, c, x, METRIC, hook="hook_pattern"), ValueError, "hook: expected"),
    "chunk": (lambda m, c, x: patch_positions(m, c, x, METRIC, chunk_size=0), ValueError, "chunk_size"),
    "metric": (lambda m, c, x: patch_positions(m, c, x, lambda lg: lg.sum()), ValueError, "metric: expected one"),
    "no gap": (lambda m, c, x: patch_positions(m, c, c, METRIC), ValueError, "metric: equal on the clean"),
    "name": (lambda m, c, x: patch(m, x[None], {"blocks.0.hook_resid_pr": c}), KeyError, "blocks.0.hook_resid_pr"),
    "shape": (lambda m, c, x: patch(m, x[None], {"hook_embed": torch.zeros(1, 8, 5)}), ValueError, "hook_embed"),
    "mask": (lambda m, c, x: patch(m, x[None], {"hook_embed": (MASK, torch.zeros(1, 8, 32))}), ValueError, "bool mask"),
}


@pytest.mark.parametrize("call, error, match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    model = make_model()
    clean, corrupted = prompts(8, 3)
    with torch.no_grad(), pytest.raises(error, match=match):
        call(model, clean, corrupted)


def test_empty_prompts_and_tokens_outside_the_vocabulary_are_named():
    model, (clean, corrupted) = make_model(), prompts(6, 2)
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="^clean: empty input$"):
        patch_positions(model, empty, empty, METRIC)
    with pytest.raises(ValueError, match=r"^logit_diff: correct: token id 50 outside the vocabulary \(0..49\)"):
        patch_positions(model, clean, corrupted, logit_diff(50, 1))
    with pytest.raises(ValueError, match=r"^logit_diff: incorrect: token id -3 outside"):
        patch_heads(model, clean, corrupted, logit_diff(1, -3))
    with pytest.raises(ValueError, match=r"^logit_diff: position: 6 outside the 6 input tokens"):
        patch_positions(model, clean, corrupted, logit_diff(1, 2, position=6))


def test_mlp_hook_post_on_moe_layers_is_refused_up_front_pointing_to_hook_mlp_out():
    model = make_model(feed_forward=("dense", "moe"), moe=MoEConfig(n_experts=4, top_k=2))
    clean, corrupted = prompts(6, 2)
    with pytest.raises(ValueError, match=r"the MoE layers \(blocks 1\) have no mlp.hook_post.*patch hook_mlp_out"):
        patch_positions(model, clean, corrupted, METRIC, hook="mlp.hook_post")
    assert patch_positions(model, clean, corrupted, METRIC, hook="hook_mlp_out").shape == (2, 6)


def test_an_attention_only_layer_has_no_mlp_hook_post_to_patch_and_says_so():
    config = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                         feed_forward=["dense", "none"])
    model = Transformer(config).eval()
    clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 5, 4]])
    with pytest.raises(ValueError, match=r"attention-only layers \(blocks 1\) have no MLP, so no mlp.hook_post"):
        patch_positions(model, clean, corrupted, logit_diff(1, 2), hook="mlp.hook_post")
