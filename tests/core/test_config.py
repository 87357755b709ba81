import pytest

from heron.core.config import AttentionPattern, MoEConfig, ModelConfig, RopeScaling

BASE = dict(vocab_size=100, d_model=64, n_layers=2, n_heads=4)


def test_json_round_trip_keeps_every_field():
    config = ModelConfig(**BASE, n_kv_heads=2, rope_scaling=RopeScaling(kind="llama3", factor=8.0))
    assert ModelConfig.from_json(config.to_json()) == config


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="n_layerz: unknown ModelConfig field"):
        ModelConfig.from_dict({**BASE, "n_layerz": 3})


@pytest.mark.parametrize("data, message", [
    ({"vocab_size": 100, "n_layers": 2}, "d_model: missing; ModelConfig needs d_model, n_heads"),
    ({**BASE, "rope_scaling": [2.0]}, r"rope_scaling: expected a mapping such as \{kind: linear"),
    ([BASE], "ModelConfig: expected a mapping of ModelConfig fields"),
])
def test_missing_fields_and_a_config_that_is_no_mapping_are_named(data, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(data)


def test_unknown_rope_scaling_field_is_named():
    with pytest.raises(ValueError, match="rope_scaling.fator"):
        ModelConfig.from_dict({**BASE, "rope_scaling": {"kind": "linear", "fator": 2.0}})


@pytest.mark.parametrize(
    "change, field",
    [
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"d_model": 66}, "n_heads"),
        ({"norm": "batchnorm"}, "norm"),
        ({"mlp": "relu"}, "mlp"),
        ({"positions": "alibi"}, "positions"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"head_dim": 7}, "head_dim"),
        ({"positions": "learned", "rope_scaling": {"kind": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"d_model": "64"}, "d_model"),
        ({"tie_embeddings": 1}, "tie_embeddings"),
        ({"moe": {"n_experts": 8}}, "moe: settings are given but feed_forward names no 'moe' layer"),
    ],
)
def test_inconsistent_fields_are_named(change, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        ModelConfig.from_dict({**BASE, **change})


@pytest.mark.parametrize("change, message", [
    ({"rope_theta": 0}, "rope_theta: must be positive and finite, got 0"),
    ({"rope_theta": -10000.0}, "rope_theta: must be positive"),
    ({"rope_theta": float("inf")}, "rope_theta: must be positive and finite, got inf"),
    ({"norm_eps": float("nan")}, "norm_eps: must be positive and finite, got nan"),
    ({"init_std": -0.02}, "init_std: must be >= 0 and finite, got -0.02"),
    ({"rope_scaling": {"kind": "llama3", "low_freq_factor": 0}}, r"rope_scaling\.low_freq_factor: must be positive"),
    ({"rope_scaling": {"kind": "llama3", "original_max_seq_len": 0}}, r"rope_scaling\.original_max_seq_len: must be"),
    ({"rope_scaling": {"kind": "llama3", "original_max_seq_len": -8192}}, r"rope_scaling\.original_max_seq_len"),
    ({"rope_scaling": {"kind": "linear", "factor": float("nan")}}, r"rope_scaling\.factor: must be positive"),
    ({"rope_scaling": {"kind": "llama3", "low_freq_factor": 4.0, "high_freq_factor": 2.0}},
     r"rope_scaling\.high_freq_factor: must exceed low_freq_factor \(4\), got 2$"),
    ({"rope_scaling": {"kind": "linear", "low_freq_factor": 3.0}},
     r"rope_scaling\.low_freq_factor: a linear scaling does not use it \(its fields: factor\); "
     r"set kind to one that does \(llama3\)"),
])
def test_numbers_that_would_make_nan_or_be_ignored_are_named(change, message):
    """rope_theta 0 or inf made NaN RoPE tables (attention then silently zero), llama3's
    low_freq_factor 0 a ZeroDivisionError naming nothing, and linear scaling ignored
    llama3's settings: each is refused at construction, named with its path."""
    with pytest.raises(ValueError, match=f"^{message}"):
        ModelConfig.from_dict({**BASE, **change})


def test_derived_sizes():
    config = ModelConfig(**BASE, n_kv_heads=1)
    assert config.resolved_head_dim == 16
    assert config.resolved_kv_heads == 1
    # LLaMA's rule: 8/3 * d rounded up to a multiple of 64.
    assert config.resolved_d_ff == 192
    assert config.replace(mlp="gelu").resolved_d_ff == 256


def test_moe_config_json_round_trip():
    moe = MoEConfig(n_experts=8, top_k=2, d_ff=96, shared_expert=True, capacity_factor=1.25,
                    aux_loss_coef=0.02, z_loss_coef=0.0)
    config = ModelConfig(**BASE, feed_forward=("dense", "moe"), moe=moe)
    back = ModelConfig.from_json(config.to_json())
    assert back == config and back.moe == moe and back.feed_forward == ("dense", "moe")
    assert [back.is_moe_layer(i) for i in range(back.n_layers)] == [False, True]
    dropless = ModelConfig(**BASE, feed_forward=("moe",), moe=MoEConfig())
    assert ModelConfig.from_json(dropless.to_json()).moe.capacity_factor is None


def test_attention_only_layers_round_trip_and_unknown_kinds_are_named():
    config = ModelConfig(**BASE, feed_forward=("none",))
    back = ModelConfig.from_json(config.to_json())
    assert back == config and [back.feed_forward_kind(i) for i in range(2)] == ["none", "none"]
    assert not back.is_moe_layer(0) and ModelConfig(**BASE).feed_forward_kind(1) == "dense"
    with pytest.raises(ValueError, match=r"^feed_forward\[1\]: 'nothing' is not one of dense, moe, none"):
        ModelConfig(**BASE, feed_forward=("dense", "nothing"))


@pytest.mark.parametrize("pattern, message", [
    ({"kind": "dense", "window": 128}, r"attention\[1\]\.window: a dense pattern does not use it \(its fields: none\)"),
    ({"kind": "sliding", "window": 8, "stride": 4}, r"attention\[1\]\.stride: a sliding pattern does not use it "
                                                   r"\(its fields: window\)"),
    ({"kind": "strided", "window": 8}, r"attention\[1\]\.window: a strided pattern does not use it"),
])
def test_a_setting_the_pattern_does_not_read_is_named(pattern, message):
    """{kind: dense, window: 128} meant a window: silently ignoring it would train another model."""
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**BASE, "attention": [{"kind": "dense"}, pattern]})
    sliding = ModelConfig.from_dict({**BASE, "attention": [{"kind": "sliding", "window": 8}]})
    assert ModelConfig.from_json(sliding.to_json()) == sliding  # saved patterns hold only defaults elsewhere


@pytest.mark.parametrize("change, message", [
    ({"attention": ["dense", "sliding"]}, r"^attention\[0\]: expected a mapping such as \{kind: sliding, window: 128\}, "
                                          r"got 'dense'"),
    ({"attention": [{"kind": "sliding", "window": 8.5}]}, r"^attention\[0\]\.window: expected int, got 8\.5"),
    ({"attention": {"kind": "sliding"}}, r"^attention: expected a list such as"),
    ({"feed_forward": ["moe"], "moe": {"d_ff": 1.5}}, r"^moe\.d_ff: expected int \| None, got 1\.5"),
    ({"feed_forward": ["moe"], "moe": 5}, r"^moe: expected a mapping such as \{n_experts: 8, top_k: 2\}, got 5"),
    ({"rope_scaling": 2.0}, r"^rope_scaling: expected a mapping"),
    ({"feed_forward": [1]}, r"^feed_forward\[0\]: expected one of dense, moe, none, got 1"),
    ({"attention": [{"window": 4}]}, r"a dense pattern does not use it .*; set kind to one that does \(sliding, dilated\)"),
])
def test_nested_settings_of_the_wrong_kind_are_named_with_their_path(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**BASE, **change})


def test_nested_settings_built_from_mappings_or_lists_equal_those_built_from_their_classes():
    """ModelConfig(..., attention=[{...}]) in Python is the config from_dict builds."""
    from_classes = ModelConfig(**BASE, attention=(AttentionPattern(kind="sliding", window=4),), feed_forward=("moe",),
                               moe=MoEConfig(top_k=1))
    from_plain = ModelConfig(**BASE, attention=[{"kind": "sliding", "window": 4}], feed_forward=["moe"],
                             moe={"top_k": 1})
    assert from_plain == from_classes and hash(from_plain) == hash(from_classes)
    assert ModelConfig.from_json(from_plain.to_json()) == from_classes


@pytest.mark.parametrize("change, message", [
    ({"vocab_size": 64.0}, r"^vocab_size: expected int, got 64\.0"),
    ({"tie_embeddings": "no"}, r"^tie_embeddings: expected bool, got 'no'"),
    ({"d_model": "32"}, r"^d_model: expected int, got '32'"),
])
def test_the_constructor_checks_types_as_from_dict_does(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**BASE, **change})
