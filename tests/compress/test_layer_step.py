"""Quantised layers decode in one kernel call: the core's whole-layer kernel (core/step_kernels.py,
`LayerStep`) runs the products the fused kernel offers it (compress/kernels.py, csrc/product.h),
and gives the block's own numbers to fp32 rounding."""
import copy

import pytest
import torch

from heron.compress import kernels
from heron.compress.kernels import KERNELS
from heron.compress.qlinear import QuantLinear, set_kernel
from heron.compress.quant_moe import QuantMoE
from heron.compress.quantize import quantize_model, swap_module
from heron.compress.schemes import Int4Grouped, Int8PerChannel, quantize_rtn
from heron.core import ModelConfig, Transformer
from heron.core.config import MoEConfig
from heron.core.kv_cache import KVCache
from heron.core.linear import set_decode_layout, streams
from heron.core.step_kernels import LayerStep, step_kernels
from heron.core.token_step import TokenStep

PRODUCTS = ("attn.qkv", "attn.out", "mlp.up", "mlp.down")
CONFIG = dict(vocab_size=64, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=96, max_seq_len=32,
              qkv_bias=True, out_bias=True, mlp_bias=True)

runs_here = pytest.mark.skipif(
    step_kernels() is None or not streams() or not KERNELS["fused"].supports(Int8PerChannel(), 32, 32),
    reason="the step kernels, the streaming product or the fused kernel are not built or do not run here")


def _quantised_block(scheme, products, *, input_scale: bool, rows: int):
    """A plain block (biases on) whose `products` are quantised by rounding, each with a per-input
    scale if asked (as AWQ leaves them); the rest stay fp32 Linears laid out for decoding."""
    torch.manual_seed(len(products) + rows)
    model = Transformer(ModelConfig(**CONFIG)).eval()
    set_decode_layout(model, rows)
    block = model.blocks[1]
    with torch.no_grad():
        for p in (block.attn.qkv.bias, block.attn.out.bias, block.mlp.up.bias, block.mlp.down.bias):
            p.uniform_(-1, 1)
    for name in products:
        linear = block.get_submodule(name)
        codes, params = quantize_rtn(linear.weight.detach(), scheme)
        scale = torch.rand(linear.in_features) + 0.5 if input_scale else None
        swap_module(block, name, QuantLinear.from_codes(codes, params, scheme, bias=linear.bias, input_scale=scale))
    return model, block


def _cache(model: Transformer, rows: int) -> KVCache:
    cache = KVCache.allocate(model.config, rows, 32)
    cache.length = 6
    for t in cache.keys + cache.values:
        t.normal_()
    return cache


@runs_here
@pytest.mark.parametrize("scheme", [Int8PerChannel(), Int4Grouped(group_size=32)], ids=["int8", "int4-g32"])
@pytest.mark.parametrize(("products", "input_scale"), [(PRODUCTS, False), (PRODUCTS, True), (("mlp.up", "attn.out"), True)],
                         ids=["all", "all-input-scaled", "some"])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_quantised_layer_in_one_call_equals_the_block(scheme, products, input_scale, rows):
    model, block = _quantised_block(scheme, products, input_scale=input_scale, rows=rows)
    assert LayerStep.takes(block)
    cache = _cache(model, rows)
    reference_cache = copy.deepcopy(cache)
    x = torch.randn(rows, 1, 128)
    rope = model.rope_cos[6:7], model.rope_sin[6:7]
    with torch.inference_mode():
        got = LayerStep(block)(x, rope, cache)
        expected = block(x, rope, None, reference_cache)  # each QuantLinear through its own forward
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.keys[1], reference_cache.keys[1], rtol=1e-6, atol=1e-6)


@runs_here
def test_a_layer_step_keeps_the_layout_it_was_made_with():
    """The offered product holds the kernel's layout: a layer moved to another kernel afterwards (which
    drops its cached layout) leaves the step made before it computing what it did."""
    model, block = _quantised_block(Int8PerChannel(), PRODUCTS, input_scale=False, rows=1)
    step, x, rope = LayerStep(block), torch.randn(1, 1, 128), (model.rope_cos[6:7], model.rope_sin[6:7])
    with torch.inference_mode():
        torch.manual_seed(0)
        before = step(x, rope, _cache(model, 1))
        set_kernel(block, "dequant")
        torch.manual_seed(0)  # nothing but the layout changed: the same cache again
        assert torch.equal(step(x, rope, _cache(model, 1)), before)
        assert block.mlp.up.kernel == "dequant" and not LayerStep.takes(block)


@runs_here
@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "fused"])
def test_layers_on_a_kernel_that_offers_no_product_run_in_parts(kernel):
    model, block = _quantised_block(Int8PerChannel(), ("mlp.up",), input_scale=False, rows=1)
    set_kernel(block, kernel)
    assert block.mlp.up.kernel != "fused" and block.mlp.up.step_product() is None
    assert not LayerStep.takes(block)


@runs_here
def test_an_offered_product_of_the_wrong_shape_is_refused_by_name():
    model, block = _quantised_block(Int8PerChannel(), PRODUCTS, input_scale=False, rows=1)
    step = LayerStep(block)
    wrong = quantize_rtn(torch.randn(256, 96), Int8PerChannel())  # the down product's transpose
    step.weights = (*step.weights[:13], QuantLinear.from_codes(*wrong, Int8PerChannel()).step_product(),
                    *step.weights[14:])
    with pytest.raises(ValueError, match="the down product offered is 256 x 96 where the layer needs 128 x 96"):
        step(torch.randn(1, 1, 128), (model.rope_cos[6:7], model.rope_sin[6:7]), _cache(model, 1))


@runs_here
def test_the_fused_kernel_refuses_to_offer_what_it_cannot_multiply():
    fused = kernels._fused_module()
    with pytest.raises(ValueError, match="bits 8 or 4"):
        fused.product(None, 5, 1, 1, 0, 0, 8, 8, 0)
    with pytest.raises(ValueError, match="a group of a multiple of 32 dividing K"):
        fused.product(None, 4, 1, 1, 1, 0, 8, 64, 48)
    with pytest.raises(ValueError, match="N and K must be >= 1"):
        fused.product(None, 8, 1, 1, 0, 0, 0, 8, 0)
    with pytest.raises(TypeError, match=r"product\(keep, bits, codes_ptr"):
        fused.product(None, 8)


@runs_here
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("feed_forward", ["dense", "moe"])
def test_a_quantised_model_decodes_through_whole_layer_steps(scheme, feed_forward):
    """Every layer of an int8 or int4 model (embedding and head int8; a MoE's experts too) runs in
    one kernel call, and the decoded tokens and logits are the model forward's."""
    torch.manual_seed(0)
    moe = dict(feed_forward=("moe",), moe=MoEConfig(n_experts=4, top_k=2, d_ff=64)) if feed_forward == "moe" else {}
    model = Transformer(ModelConfig(**{**CONFIG, "d_model": 64, "n_layers": 3, "mlp_bias": False, **moe})).eval()
    model = quantize_model(model, scheme, group_size=32, progress=False)
    assert (feed_forward == "moe") == isinstance(model.blocks[0].mlp, QuantMoE)
    set_decode_layout(model, 2)
    with torch.inference_mode():
        cache = KVCache.allocate(model.config, 2, 32)
        model(torch.randint(0, 64, (2, 5)), cache=cache)
        reference_cache = copy.deepcopy(cache)
        step = TokenStep(model)
        assert all(whole is not None for whole, *_ in step.layers)
        ids = torch.tensor([3, 9])
        for _ in range(6):
            logits = step(ids, cache)
            expected = model(ids[:, None], cache=reference_cache).logits[:, -1]
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
            assert torch.equal(logits.argmax(-1), expected.argmax(-1))
            ids = logits.argmax(-1)
