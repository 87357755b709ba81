"""The Heron <-> LlamaForCausalLM name table: complete, unambiguous, strict."""
import collections

import pytest
import torch

transformers = pytest.importorskip("transformers")

from heron.core import ModelConfig, RopeScaling, Transformer  # noqa: E402
from heron.interop import LLAMA_WEIGHTS, heron_config, heron_to_hf_weights, hf_to_heron_weights, llama_config  # noqa: E402
from heron.interop.llama import expand_rows  # noqa: E402
from heron.models.presets import PRESETS  # noqa: E402

SMALL = dict(vocab_size=50, d_model=32, n_layers=3, n_heads=4, max_seq_len=32)
CONFIGS = {
    "tied": ModelConfig(**SMALL, n_kv_heads=2),
    "untied_biases": ModelConfig(**SMALL, tie_embeddings=False, qkv_bias=True, out_bias=True, mlp_bias=True),
    "mqa_scaled": ModelConfig(**SMALL, n_kv_heads=1, rope_scaling=RopeScaling(kind="llama3", factor=2.0, original_max_seq_len=16)),
}


def heron_params(config: ModelConfig) -> dict[str, torch.Tensor]:
    return dict(Transformer(config).named_parameters())  # a tied lm_head appears once, as embed


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_heron_parameter_is_covered_exactly_once(name):
    config = CONFIGS[name]
    rows = collections.Counter(heron for heron, _, _ in expand_rows(config.n_layers))
    params = heron_params(config)
    assert all(rows[p] == 1 for p in params), {p: rows[p] for p in params if rows[p] != 1}


def test_no_name_is_claimed_twice():
    heron = [row.heron for row in LLAMA_WEIGHTS]
    hf = [name for row in LLAMA_WEIGHTS for name in row.hf]
    assert len(heron) == len(set(heron)) and len(hf) == len(set(hf))



def hf_params(config: ModelConfig) -> dict[str, torch.Tensor]:
    return dict(transformers.LlamaForCausalLM(llama_config(config)).named_parameters())


def shapes(params: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in params.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_hf_parameter_is_covered_exactly_once(name):
    config = CONFIGS[name]
    rows = collections.Counter(hf for _, names, _ in expand_rows(config.n_layers) for hf in names)
    params = hf_params(config)
    assert all(rows[p] == 1 for p in params), {p: rows[p] for p in params if rows[p] != 1}
    # ...and both directions produce exactly the other side's parameters, with their shapes.
    heron = heron_params(config)
    assert shapes(heron_to_hf_weights(heron, shapes(params), config.n_layers)) == shapes(params)
    assert shapes(hf_to_heron_weights(params, shapes(heron), config.n_layers)) == shapes(heron)


@pytest.fixture
def both() -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    config = CONFIGS["untied_biases"]
    return config, heron_params(config), hf_params(config)


@pytest.mark.parametrize("key", ["model.layers.1.self_attn.k_proj.weight", "lm_head.weight", "model.norm.weight"])
def test_missing_hf_key_is_named(both, key):
    config, heron, hf = both
    del hf[key]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        hf_to_heron_weights(hf, shapes(heron), config.n_layers)


@pytest.mark.parametrize("key", ["blocks.2.mlp.up.weight", "blocks.0.attn.qkv.bias", "embed.weight"])
def test_missing_heron_key_is_named(both, key):
    config, heron, hf = both
    del heron[key]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        heron_to_hf_weights(heron, shapes(hf), config.n_layers)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.v_proj.weight", "model.layers.2.mlp.down_proj.bias"])
def test_misshaped_hf_key_is_named(both, key):
    config, heron, hf = both
    hf[key] = torch.zeros(hf[key].shape[0] + 1, *hf[key].shape[1:])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        hf_to_heron_weights(hf, shapes(heron), config.n_layers)


@pytest.mark.parametrize("key", ["blocks.1.attn.qkv.weight", "blocks.0.mlp_norm.weight"])
def test_misshaped_heron_key_is_named(both, key):
    config, heron, hf = both
    heron[key] = torch.zeros(heron[key].shape[0] - 1, *heron[key].shape[1:])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        heron_to_hf_weights(heron, shapes(hf), config.n_layers)


def test_unexpected_key_is_named(both):
    config, heron, hf = both
    hf["model.layers.9.mlp.gate_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.gate_proj\.weight"):
        hf_to_heron_weights(hf, shapes(heron), config.n_layers)


def test_target_without_a_row_is_named(both):
    config, heron, hf = both
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.extra"):
        hf_to_heron_weights(hf, {**shapes(heron), "blocks.0.attn.extra": torch.Size([3])}, config.n_layers)


@pytest.mark.parametrize("config", [*CONFIGS.values(), *PRESETS.values()], ids=[*CONFIGS, *PRESETS])
def test_config_round_trip(config):
    assert heron_config(llama_config(config)) == config


@pytest.mark.parametrize("field, value", [
    ("norm", "layernorm"), ("positions", "learned"), ("mlp", "gelu"), ("qkv_bias", True), ("n_heads", 3),
])
def test_unsupported_heron_config_names_the_field(field, value):
    changes = {field: value, **({"head_dim": 8} if field == "n_heads" else {})}
    config = CONFIGS["tied"].replace(**changes, n_kv_heads=None)
    with pytest.raises(ValueError, match=rf"^{field}:"):
        llama_config(config)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "gelu", "hidden_act"),
    ("attention_dropout", 0.1, "attention_dropout"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_parameters.rope_type"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "rope_parameters.partial_rotary_factor"),
])
def test_unsupported_hf_config_names_the_field(field, value, message):
    hf_config = llama_config(CONFIGS["tied"])
    setattr(hf_config, field, value)
    with pytest.raises(ValueError, match=rf"^{message}"):
        heron_config(hf_config)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(attention=({"kind": "dense"}, {"kind": "sliding", "window": 8})), "attention"),
        (dict(feed_forward=("moe",), moe={"n_experts": 4, "top_k": 2}), "feed_forward"),
    ],
)
def test_sparse_and_moe_configs_are_refused_by_name(overrides, field):
    config = ModelConfig.from_dict(dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, **overrides))
    with pytest.raises(ValueError, match=f"^{field}:"):
        llama_config(config)
