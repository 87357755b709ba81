"""Weight tables and config mappings: complete, unambiguous, strict.

Every Heron parameter comes from exactly one row; every checkpoint tensor is
used or explicitly ignored; a missing, misshaped or unexpected tensor and an
unsupported config field are errors that name it.
"""
import collections
import dataclasses

import pytest
import torch

from heron.core import AttentionPattern, ModelConfig, MoEConfig, RopeScaling, Transformer
from heron.interop import FAMILIES, export_family, family_config, heron_to_hf, hf_config, load_into
from heron.interop.families import (GPT2, GPT_NEO, LLAMA, MISTRAL, MIXTRAL, PHI3, QWEN2, QWEN3, QWEN3_MOE,
                                    STABLELM)
from heron.interop.tables import expand, rotary_order
from heron.models.presets import PRESETS

SMALL = dict(vocab_size=50, d_model=32, n_layers=3, n_heads=4, max_seq_len=32)
LOCAL = AttentionPattern(kind="sliding", window=8)
CONFIGS = {  # (family, a Heron config it expresses)
    "llama_tied": (LLAMA, ModelConfig(**SMALL, n_kv_heads=2)),
    "llama_biases": (LLAMA, ModelConfig(**SMALL, tie_embeddings=False, qkv_bias=True, out_bias=True, mlp_bias=True)),
    "llama_mqa_scaled": (LLAMA, ModelConfig(**SMALL, n_kv_heads=1,
                                            rope_scaling=RopeScaling(kind="llama3", factor=2.0, original_max_seq_len=16))),
    "mistral": (MISTRAL, ModelConfig(**SMALL, n_kv_heads=2, attention=(LOCAL,))),
    "qwen2": (QWEN2, ModelConfig(**SMALL, n_kv_heads=2, qkv_bias=True)),
    "qwen3": (QWEN3, ModelConfig(**SMALL, n_kv_heads=2, head_dim=16, qk_norm=True)),
    "qwen3_moe": (QWEN3_MOE, ModelConfig(**SMALL, n_kv_heads=2, qk_norm=True, tie_embeddings=False,
                                         feed_forward=("dense", "moe", "moe"),
                                         moe=MoEConfig(n_experts=4, top_k=2, d_ff=16, z_loss_coef=0.0))),
    "phi3": (PHI3, ModelConfig(**SMALL, tie_embeddings=False, attention=(LOCAL,))),
    "mixtral": (MIXTRAL, ModelConfig(**SMALL, n_kv_heads=2, tie_embeddings=False, feed_forward=("moe",),
                                     moe=MoEConfig(n_experts=4, top_k=2, z_loss_coef=0.0))),
    "gpt2": (GPT2, ModelConfig(**SMALL, norm="layernorm", positions="learned", mlp="gelu_tanh", qkv_bias=True,
                               out_bias=True, mlp_bias=True)),
    "gpt_neo": (GPT_NEO, ModelConfig(**{**SMALL, "n_layers": 2}, norm="layernorm", positions="learned",
                                     mlp="gelu_tanh", out_bias=True, mlp_bias=True, attn_scale=1.0,
                                     attention=(AttentionPattern(), LOCAL))),
}


def heron_params(config: ModelConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return dict(Transformer(config).named_parameters())  # a tied lm_head appears once, as embed


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_heron_parameter_comes_from_exactly_one_row(name):
    family, config = CONFIGS[name]
    experts = config.moe.n_experts if config.moe else 0
    rows = collections.Counter(heron for heron, _, _ in expand(family.weights, config.n_layers, experts))
    assert all(rows[p] == 1 for p in heron_params(config)), {p: rows[p] for p in heron_params(config) if rows[p] != 1}


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_no_name_is_claimed_twice(family):
    heron = [row.heron for row in family.weights]
    hf = [name for row in family.weights for name in row.hf]
    assert len(heron) == len(set(heron)) and len(hf) == len(set(hf))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_both_directions_invert_each_other(name):
    family, config = CONFIGS[name]
    heron = heron_params(config)
    hf = dict(heron_to_hf(heron, family.weights, config))
    back = empty_like(heron)
    load_into(hf, back, family.weights, config)
    assert all(torch.equal(back[n], heron[n]) for n in heron)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip(name):
    family, config = CONFIGS[name]
    # Phi-3 expresses what Mistral does (in fused tensors): export takes it only when named.
    assert export_family(config) == (MISTRAL if family is PHI3 else family)
    assert family_config(family, hf_config(family, config)) == config


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_export_as_llama(name):
    config = PRESETS[name]
    assert export_family(config) == LLAMA
    assert family_config(LLAMA, hf_config(LLAMA, config)) == config


@pytest.fixture
def mixtral() -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    _, config = CONFIGS["mixtral"]
    heron = heron_params(config)
    return config, heron, dict(heron_to_hf(heron, MIXTRAL.weights, config))


def empty_like(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: torch.full_like(p, float("nan"), requires_grad=False) for n, p in params.items()}


def convert(config, heron, hf, ignored=()):
    targets = empty_like(heron)
    load_into(hf, targets, MIXTRAL.weights, config, ignored)
    return targets


@pytest.mark.parametrize("key", ["model.layers.1.self_attn.k_proj.weight", "lm_head.weight",
                                 "model.layers.2.block_sparse_moe.experts.3.w2.weight"])
def test_missing_tensor_is_named(mixtral, key):
    config, heron, hf = mixtral
    del hf[key]
    with pytest.raises(ValueError, match=f"^{key.replace('.', r'[.]')}: missing"):
        convert(config, heron, hf)


@pytest.mark.parametrize("key, named", [
    ("model.layers.0.self_attn.v_proj.weight", "blocks.0.attn.qkv.weight"),
    ("model.layers.1.block_sparse_moe.experts.0.w1.weight", "model.layers.1.block_sparse_moe.experts.0.w1.weight"),
    ("model.layers.2.self_attn.o_proj.weight", "blocks.2.attn.out.weight"),
])
def test_misshaped_tensor_is_named(mixtral, key, named):
    config, heron, hf = mixtral
    hf[key] = torch.zeros(hf[key].shape[0] + 1, *hf[key].shape[1:])
    with pytest.raises(ValueError, match=f"^{named.replace('.', '[.]')}:"):
        convert(config, heron, hf)


def test_unexpected_tensor_is_named_unless_ignored(mixtral):
    config, heron, hf = mixtral
    hf["model.layers.9.mlp.gate_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"^model[.]layers[.]9[.]mlp[.]gate_proj[.]weight: unexpected"):
        convert(config, heron, hf)
    assert convert(config, heron, hf, ignored=(r"model\.layers\.\d+\.mlp\..*",)).keys() == heron.keys()


def test_target_without_a_row_is_named(mixtral):
    config, heron, hf = mixtral
    with pytest.raises(ValueError, match=r"^blocks[.]0[.]attn[.]extra: no row"):
        load_into(hf, {**empty_like(heron), "blocks.0.attn.extra": torch.zeros(3)}, MIXTRAL.weights, config)


@pytest.mark.parametrize("changes, field", [
    (dict(norm="layernorm"), "norm"), (dict(positions="learned"), "positions"), (dict(mlp="gelu"), "mlp"),
    (dict(qkv_bias=True), "qkv_bias"), (dict(attn_scale=1.0), "attn_scale"), (dict(qk_norm=True), "qk_norm"),
    (dict(attention=(AttentionPattern(kind="strided", stride=4),)), "attention"),
    (dict(feed_forward=("moe",), moe=MoEConfig(n_experts=4)), "feed_forward"),
    (dict(feed_forward=("none",)), "feed_forward"),
])
def test_llama_refuses_what_it_cannot_express_by_name(changes, field):
    config = CONFIGS["llama_tied"][1].replace(**changes)
    with pytest.raises(ValueError, match=f"^{field}:"):
        hf_config(LLAMA, config)


@pytest.mark.parametrize("field, value", [("shared_expert", True), ("capacity_factor", 1.25),
                                          ("router_centering", True), ("routed_scale", 2.0)])
def test_mixtral_refuses_routing_it_cannot_express(mixtral, field, value):
    config = mixtral[0]
    changed = config.replace(moe=dataclasses.replace(config.moe, **{field: value}))
    with pytest.raises(ValueError, match=f"^moe.{field}: Mixtral needs"):
        hf_config(MIXTRAL, changed)


@torch.no_grad()
def test_a_window_as_long_as_the_context_exports_as_dense_attention():
    """Within max_seq_len tokens such a window leaves no key out: the same logits as dense."""
    config = CONFIGS["llama_tied"][1]
    wide = config.replace(attention=({"kind": "sliding", "window": config.max_seq_len},))
    assert hf_config(LLAMA, wide) == hf_config(LLAMA, config)
    torch.manual_seed(0)
    dense = Transformer(config).eval()
    sliding = Transformer(wide).eval()
    sliding.load_state_dict(dense.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, config.max_seq_len))
    torch.testing.assert_close(sliding(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="^attention: layer 0 is 'sliding'"):
        hf_config(LLAMA, config.replace(attention=({"kind": "sliding", "window": config.max_seq_len - 1},)))


def test_a_family_names_every_field_it_cannot_express_at_once(mixtral):
    """tiny-moe-sparse's shape through Mixtral (to-gguf's path): the window and each routing
    setting, not only the first, so one try says all that must change."""
    config = mixtral[0]
    changed = config.replace(attention=(AttentionPattern(kind="strided", stride=4),),
                             moe=dataclasses.replace(config.moe, shared_expert=True, router_centering=True))
    with pytest.raises(ValueError) as err:
        hf_config(MIXTRAL, changed)
    assert [part.split(":")[0] for part in str(err.value).split("; and ")] == \
        ["attention", "moe.shared_expert", "moe.router_centering"]


def test_a_model_no_family_expresses_lists_every_reason():
    config = CONFIGS["llama_tied"][1].replace(attention=(AttentionPattern(kind="strided", stride=4),))
    with pytest.raises(ValueError, match="no Hugging Face family") as err:
        export_family(config)
    assert all(f"{family.name}: " in str(err.value) for family in FAMILIES)


@pytest.mark.parametrize("key, value, message", [
    ("hidden_act", "relu", "hidden_act"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_parameters.rope_type"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "rope_parameters.partial_rotary_factor"),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4}, "rope_parameters.factor"),
    ("layer_types", ["full_attention", "chunked_attention", "full_attention"], "layer_types"),
])
def test_unsupported_hf_config_names_the_field(key, value, message):
    family, config = CONFIGS["mistral"]
    hf = {**hf_config(family, config), key: value}
    with pytest.raises(ValueError, match=f"^{message}"):
        family_config(family, hf)


def test_older_rope_spelling_is_read():
    family, config = CONFIGS["llama_mqa_scaled"]
    hf = hf_config(family, config)
    params = hf.pop("rope_parameters")
    hf["rope_theta"] = params.pop("rope_theta")
    hf["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    assert family_config(family, hf) == config


def test_qwen3_moe_routing_heron_cannot_run_is_refused():
    family, config = CONFIGS["qwen3_moe"]
    hf = {**hf_config(family, config), "norm_topk_prob": False}  # top-k softmax weights left unnormalised
    with pytest.raises(ValueError, match="^norm_topk_prob: Heron implements True only"):
        family_config(family, hf)
    with pytest.raises(ValueError, match="^moe.shared_expert: Qwen3-MoE needs False"):
        hf_config(family, config.replace(moe=dataclasses.replace(config.moe, shared_expert=True)))


@pytest.mark.parametrize("name, family_name", [("mixtral", "Mixtral"), ("qwen3_moe", "Qwen3-MoE")])
def test_top_1_routing_of_a_family_that_renormalises_is_refused_by_name(name, family_name):
    """These families weigh a lone expert 1; Heron's top-1 gate is the router's probability (Switch)."""
    family, config = CONFIGS[name]
    hf = {**hf_config(family, config), "num_experts_per_tok": 1}
    with pytest.raises(ValueError, match=f"^num_experts_per_tok: 1 is not supported: {family_name} renormalises"):
        family_config(family, hf)


def test_stablelm_refuses_heads_other_than_d_model_over_n_heads():
    """Its config.json has no head_dim: written anyway, the folder would load nowhere."""
    config = ModelConfig(**SMALL, norm="layernorm", head_dim=4, n_kv_heads=2)
    with pytest.raises(ValueError, match=r"^head_dim: this family has heads of d_model / n_heads = 8, got 4"):
        hf_config(STABLELM, config)
    assert hf_config(STABLELM, config.replace(head_dim=None))  # the same model at the default width exports
    with pytest.raises(ValueError, match="no Hugging Face family") as err:
        export_family(config)
    assert "stablelm: head_dim: this family has heads of d_model / n_heads" in str(err.value)


def test_rotary_order_moves_a_checkpoints_rotated_halves_to_where_herons_tables_rotate():
    """A 12-wide head rotating 4 dims: the checkpoint pairs (0, 2) and (1, 3); Heron's tables
    rotate dims 0, 1 with 6, 7 (pairs head_dim / 2 apart), so those hold checkpoint dims 0-3."""
    assert rotary_order(12, 4) == [0, 1, 4, 5, 6, 7, 2, 3, 8, 9, 10, 11]
    assert rotary_order(8, None) == rotary_order(8, 8) == list(range(8))
