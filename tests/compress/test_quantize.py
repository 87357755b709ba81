"""quantize_model on tiny random Transformers: which modules are swapped,
how close the logits stay, calibration, and errors that name the argument."""
from __future__ import annotations

import copy

import pytest
import torch

from compress_helpers import V, logits, token_ids
from heron.compress import QuantEmbedding, QuantLinear, block_linears, quantize_model
from heron.compress.quant_moe import QuantMoE
from heron.core import KVCache, ModelConfig, MoEConfig, Transformer
from heron.models.presets import parameter_count

CONFIG = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CONFIG.replace(**overrides) if overrides else CONFIG).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_rtn_int8_swaps_every_block_linear_and_the_tied_embedding() -> None:
    model = tiny_model()
    names = set(block_linears(model))
    assert names == {f"blocks.{i}.{s}" for i in range(2) for s in ("attn.qkv", "attn.out", "mlp.up", "mlp.down")}
    ids = token_ids(4, 32, seed=1)
    reference = logits(model, ids)
    quantize_model(model, "int8", "rtn", progress=False)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert isinstance(model.embed, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.qweight is model.embed.qweight  # tied: one table
    assert relative_error(logits(model, ids), reference) < 0.02


def test_hook_points_still_fire_and_change_nothing_when_idle() -> None:
    model = quantize_model(tiny_model(), "int4", "rtn", group_size=32, progress=False)
    ids = token_ids(2, 20, seed=2)  # over 16 rows: the MLP's split product reads `up.weight`
    plain = logits(model, ids)
    seen: dict[str, tuple[int, ...]] = {}

    def record(x: torch.Tensor, name: str) -> None:
        seen[name] = tuple(x.shape)

    hooks = {"blocks.0.hook_resid_post": record, "blocks.1.mlp.hook_post": record, "blocks.0.attn.hook_z": record}
    with model.hooks(hooks):
        hooked = logits(model, ids)
    assert set(seen) == set(hooks)
    assert torch.equal(hooked, plain)


@pytest.mark.parametrize("feed_forward", ["dense", "moe"])
def test_cached_decoding_equals_the_full_forward(feed_forward: str) -> None:
    """Few-row steps (the kernel; a MoE's token through its experts) and the many-row
    prefill (the MLP's split product; a MoE's grouped experts) agree."""
    moe = dict(feed_forward=("moe",), moe=MoEConfig(n_experts=4, top_k=2, d_ff=64)) if feed_forward == "moe" else {}
    model = quantize_model(tiny_model(**moe), "int4", "rtn", group_size=32, progress=False)
    ids = token_ids(1, 24, seed=3)
    full = logits(model, ids)
    cache = KVCache.allocate(model.config, 1, 24)
    with torch.inference_mode():
        steps = [model(ids[:, :20], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(20, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-3, atol=1e-4)


def test_gptq_int4_beats_rtn_int4_on_held_out_tokens() -> None:
    reference = tiny_model(seed=4)
    calibration, held_out = token_ids(32, 48, seed=5), token_ids(8, 48, seed=6)
    fp32 = logits(reference, held_out)
    errors = {}
    for method in ("rtn", "gptq"):
        model = quantize_model(copy.deepcopy(reference), "int4", method, calibration if method == "gptq" else None,
                               group_size=32, embeddings="fp32", progress=False)
        errors[method] = relative_error(logits(model, held_out), fp32)
    assert errors["gptq"] < 0.9 * errors["rtn"]


def test_awq_records_its_choices_and_stays_close() -> None:
    model = tiny_model(seed=7)
    ids = token_ids(8, 32, seed=8)
    reference = logits(model, ids)
    quantize_model(model, "int4", "awq", ids, group_size=32, awq_grid=6, progress=False)
    report = model.quantization["layers"]
    assert set(report) == {f"blocks.{i}.{s}" for i in range(2) for s in ("attn.qkv", "attn.out", "mlp.up", "mlp.down")}
    assert all(r["mse"] <= r["rtn_mse"] for r in report.values())
    assert relative_error(logits(model, ids), reference) < 0.1


def test_gelu_mlp_with_biases_and_act_order_gptq_int8() -> None:
    model = tiny_model(seed=9, mlp="gelu", qkv_bias=True, mlp_bias=True, tie_embeddings=False)
    ids = token_ids(8, 32, seed=10)
    reference = logits(model, ids)
    quantize_model(model, "int8", "gptq", ids, act_order=True, progress=False)
    assert model.blocks[0].mlp.up.bias is not None
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.qweight is not model.embed.qweight
    assert relative_error(logits(model, ids), reference) < 0.02


def test_moe_blocks_quantise_attention_shared_expert_and_experts_and_keep_the_router() -> None:
    moe = MoEConfig(n_experts=4, top_k=2, shared_expert=True)
    model = tiny_model(seed=11, feed_forward=("dense", "moe"), moe=moe)
    ids = token_ids(4, 16, seed=12)
    reference = logits(model, ids)
    quantize_model(model, "int8", "gptq", ids, progress=False)
    moe_block = model.blocks[1]
    assert isinstance(moe_block.attn.qkv, QuantLinear) and isinstance(moe_block.mlp.shared.down, QuantLinear)
    assert isinstance(moe_block.mlp, QuantMoE) and isinstance(moe_block.mlp.router, torch.nn.Linear)
    assert all(isinstance(layer, QuantLinear) for layer in [*moe_block.mlp.experts_up, *moe_block.mlp.experts_down])
    assert relative_error(logits(model, ids), reference) < 0.02


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(scheme="int3"), "scheme: unknown 'int3'"),
    (dict(method="hqq"), "method: unknown 'hqq'"),
    (dict(scheme="int4", group_size=48), "group_size: 48 does not divide the 64 input features of blocks.0.attn.qkv"),
    (dict(scheme="int4", group_size=5), "group_size: expected an even integer"),
    (dict(method="gptq"), "calibration: method 'gptq' needs calibration token ids"),
    (dict(method="rtn", act_order=True), "act_order: applies to method 'gptq' only"),
    (dict(embeddings="int2"), "embeddings: unknown 'int2'"),
    (dict(method="gptq", calibration=torch.zeros(4)), "calibration: expected token ids"),
    (dict(method="gptq", calibration=token_ids(2, 8, 0), percdamp=2.0), "percdamp"),
    (dict(method="awq", calibration=token_ids(2, 8, 0), awq_grid=1), "awq_grid: expected at least 2 points"),
])
def test_bad_arguments_fail_before_any_work_naming_the_argument(kwargs, message) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        quantize_model(model, progress=False, **kwargs)
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def test_a_quantised_model_is_not_quantised_again() -> None:
    model = quantize_model(tiny_model(), progress=False)
    with pytest.raises(ValueError, match="model: already quantised"):
        quantize_model(model, progress=False)


@pytest.mark.parametrize("feed_forward", ["dense", "moe"])
def test_a_quantised_model_counts_the_weights_its_codes_stand_for(feed_forward: str) -> None:
    """Packed codes are buffers: counting parameters() would report a quantised model a fraction of its size."""
    moe = dict(feed_forward=("moe",), moe=MoEConfig(n_experts=4, top_k=2, d_ff=64)) if feed_forward == "moe" else {}
    model = tiny_model(**moe)
    full = sum(p.numel() for p in model.parameters())
    quantize_model(model, "int4", "rtn", group_size=32, progress=False)
    assert sum(p.numel() for p in model.parameters()) < full // 10
    assert parameter_count(model) == full
