"""Quantised MoE experts (compress/quant_moe.py): against the same MoE holding
the dequantised weights as floats, on the batched and the decoding path;
calibrated methods; saved and loaded; and errors."""
from __future__ import annotations

import copy

import pytest
import torch

from compress_helpers import logits, tiny, token_ids
from heron.compress import quantize_model, save_quantized, set_kernel
from heron.compress.checkpoint import load_quantized_folder, quantized_modules
from heron.compress.quant_moe import QuantMoE
from heron.core import MoEConfig, Transformer, attach_hooks

def moe_model(seed: int = 0, **overrides) -> Transformer:
    """Two MoE blocks of 4 experts of width 64, top-2."""
    return tiny(seed, **{"n_kv_heads": 2, "feed_forward": ("moe",),
                         "moe": MoEConfig(n_experts=4, top_k=2, d_ff=64), **overrides})


def float_twin(original: Transformer, quantized: Transformer) -> Transformer:
    """`original` with every quantised matrix replaced by the dequantised numbers
    `quantized` computes with: experts stacked back, linears and embeddings as weights."""
    twin = copy.deepcopy(original)
    with torch.no_grad():
        for block, qblock in zip(twin.blocks, quantized.blocks):
            up, down = qblock.mlp.dequantized()
            block.mlp.up.copy_(up)
            block.mlp.down.copy_(down)
            for name in ("attn.qkv", "attn.out"):
                block.get_submodule(name).weight.copy_(qblock.get_submodule(name).weight)
        twin.embed.weight.copy_(quantized.embed.weight)
    return twin


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantised_experts_compute_what_their_dequantised_weights_do(scheme: str) -> None:
    model = moe_model()
    ids = token_ids(4, 24, seed=1)
    quantized = quantize_model(copy.deepcopy(model), scheme, group_size=32, progress=False)
    assert all(isinstance(block.mlp, QuantMoE) for block in quantized.blocks)
    set_kernel(quantized, "dequant")  # the reference product: the float twin's numbers exactly
    twin = float_twin(model, quantized)
    torch.testing.assert_close(logits(quantized, ids), logits(twin, ids), rtol=1e-5, atol=1e-5)
    set_kernel(quantized, None)  # this CPU's kernel (fbgemm fp16 here: int4 weights rounded to fp16)
    torch.testing.assert_close(logits(quantized, ids), logits(twin, ids), rtol=0, atol=2e-3)
    assert not torch.allclose(logits(quantized, ids), logits(model, ids), atol=1e-4)  # it did round


def test_decoding_a_token_through_its_experts_equals_the_batched_forward() -> None:
    quantized = quantize_model(moe_model(seed=2), "int8", progress=False)
    layer = quantized.blocks[0].mlp
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = layer(x)
        one_by_one = torch.cat([layer(x[:, t : t + 1]) for t in range(6)], dim=1)  # MoE._decode's path
    torch.testing.assert_close(one_by_one, batched, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_quantise_each_expert_on_its_own_tokens(method: str) -> None:
    model = moe_model(seed=4, init_std=0.02)  # at tiny()'s 0.1 a random model amplifies any rounding chaotically
    calibration, held_out = token_ids(8, 32, seed=5), token_ids(4, 32, seed=6)
    rtn = quantize_model(copy.deepcopy(model), "int4", group_size=32, progress=False)
    calibrated = quantize_model(copy.deepcopy(model), "int4", method, calibration, group_size=32, progress=False)
    rows = calibrated.quantization["layers"]["blocks.0.mlp.experts"]
    assert sum(rows["mlp.up"]) == 8 * 32 * 2  # every token's two assignments, each to its expert
    layer = calibrated.blocks[0].mlp
    assert (layer.experts_up[0].input_scale is not None) == (method == "awq")
    error = {name: (logits(m, held_out) - logits(model, held_out)).norm() for name, m in
             (("rtn", rtn), (method, calibrated))}
    assert error[method] < error["rtn"]


def test_an_expert_routed_no_calibration_token_is_rounded_to_nearest_with_a_warning() -> None:
    model = moe_model(seed=7)
    never_3 = {"blocks.0.mlp.hook_router_logits": lambda t, name: t.index_fill(-1, torch.tensor([3]), -1e9)}
    with attach_hooks(model, never_3), pytest.warns(UserWarning) as caught:
        quantized = quantize_model(model, "int8", "gptq", token_ids(2, 16, seed=8), progress=False)
    assert [str(w.message).split(":")[0] for w in caught] == ["blocks.0.mlp.up", "blocks.0.mlp.down"]
    assert "expert 3 was routed no calibration tokens; rounded to nearest instead of gptq" in str(caught[0].message)
    assert quantized.quantization["layers"]["blocks.0.mlp.experts"]["mlp.up"][3] == 0


def test_a_quantised_moe_saves_and_loads_as_it_was(tmp_path) -> None:
    model = moe_model(seed=9, moe=MoEConfig(n_experts=4, top_k=2, d_ff=64, router_centering=True,
                                            shared_expert=True))  # the shared expert's linears load one by one
    ids = token_ids(2, 16, seed=10)
    model.train()
    with torch.no_grad():
        model(ids)  # a running mean worth saving
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    quantized = quantize_model(model, "int4", "awq", ids, group_size=32, progress=False)
    manifest = quantized_modules(quantized)
    assert manifest["blocks.0.mlp"]["kind"] == "experts"
    assert not any(".experts_" in name for name in manifest)  # the expert layers come with their MoE
    assert manifest["blocks.0.mlp.shared.down"]["kind"] == "linear"
    folder = save_quantized(tmp_path / "q", quantized)
    loaded, _ = load_quantized_folder(folder)
    assert isinstance(loaded.blocks[1].mlp, QuantMoE)
    torch.testing.assert_close(loaded.blocks[0].mlp.router_center, quantized.blocks[0].mlp.router_center)
    torch.testing.assert_close(logits(loaded, ids), logits(quantized, ids), rtol=0, atol=0)
    assert (folder / "model.safetensors").stat().st_size < 0.25 * fp32_bytes  # int4 experts, int8 embedding


def test_expert_widths_the_group_does_not_divide_are_refused_before_any_work() -> None:
    model = moe_model(moe=MoEConfig(n_experts=4, top_k=2, d_ff=48))
    with pytest.raises(ValueError, match="group_size: 32 does not divide the 48 input features of blocks.0.mlp.down"):
        quantize_model(model, "int4", group_size=32, progress=False)
    assert not any(isinstance(block.mlp, QuantMoE) for block in model.blocks)
