"""The flattened one-token step gives the model's own numbers (bit for bit
through torch's ops, to fp32 rounding through the step kernels), and steps
aside whenever a hook could be skipped."""
import copy

import pytest
import torch
from torch import nn

from heron.core import ModelConfig, Transformer
from heron.core.config import AttentionPattern, MoEConfig
from heron.core.kv_cache import KVCache
from heron.core.linear import STREAM_ROWS, set_decode_layout
from heron.core.moe import MoE
from heron.core.step_kernels import step_kernels
from heron.core.token_step import TokenStep

BASE = dict(vocab_size=96, d_model=32, n_layers=3, n_heads=4, max_seq_len=64)
CONFIGS = {
    "llama (rope, rmsnorm, swiglu, gqa, tied)": ModelConfig(**BASE, n_kv_heads=2),
    "gpt-2 style (learned, layernorm, gelu, biases, untied)": ModelConfig(
        **BASE, positions="learned", norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=False),
    "multi-query with a softmax scale": ModelConfig(**BASE, n_kv_heads=1, attn_scale=1.0),
    "attention-only, moe and dense layers": ModelConfig(
        **BASE, feed_forward=("none", "moe", "dense"), moe=MoEConfig(n_experts=4, top_k=2)),
    "moe with router centring and a shared expert": ModelConfig(
        **BASE, feed_forward=("moe",), moe=MoEConfig(n_experts=4, top_k=2, shared_expert=True, router_centering=True)),
    "qk_norm, heads wider than d_model / n_heads, biases": ModelConfig(
        **BASE, n_kv_heads=2, head_dim=16, qk_norm=True, qkv_bias=True, out_bias=True),
    "gpt-neox style (parallel residual, rotary on a quarter of each head, moe layer)": ModelConfig(
        **BASE, norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=False,
        rotary_dim=2, parallel_residual=True, feed_forward=("dense", "moe", "none"), moe=MoEConfig(n_experts=4)),
    "plain layers with biases, parallel residual and a softmax scale": ModelConfig(
        **BASE, n_kv_heads=2, qkv_bias=True, out_bias=True, mlp_bias=True, parallel_residual=True, attn_scale=0.3),
    "sliding-window and dense layers": ModelConfig(
        **BASE, attention=(AttentionPattern("sliding", window=5), AttentionPattern(), AttentionPattern("sliding", window=5))),
    "strided, bigbird and fixed layers (two strided: one step mask for both)": ModelConfig(
        **{**BASE, "n_layers": 4}, attention=(
            AttentionPattern("strided", stride=3), AttentionPattern("bigbird", block=2, random_blocks=2),
            AttentionPattern("fixed", block=4, summary=1), AttentionPattern("strided", stride=3))),
}


def _prefilled(model: Transformer, prompts: torch.Tensor, mask: torch.Tensor | None) -> KVCache:
    cache = KVCache.allocate(model.config, prompts.shape[0], model.config.max_seq_len)
    model(prompts, attention_mask=mask, cache=cache)
    return cache


@pytest.mark.parametrize("batch", [1, 3, 12, 40, STREAM_ROWS + 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_steps_equal_the_model_forward(name, batch):
    torch.manual_seed(0)
    model = Transformer(CONFIGS[name]).eval()
    with torch.no_grad():  # the q and k norms' gains away from the ones a new model has
        for norm in (m for b in model.blocks for m in (b.attn.q_norm, b.attn.k_norm) if m is not None):
            norm.weight.uniform_(0.5, 1.5)
    for buffer_name, buffer in model.named_buffers():
        if buffer_name.endswith("router_center"):  # a trained running mean, not the zeros of a new model
            buffer.normal_()
    set_decode_layout(model, batch)  # as the decoder lays the weights out for this batch
    prompts = torch.randint(0, 96, (batch, 9))
    mask = None
    if batch > 1:  # left padding: rows of 9, 6 and 3 real tokens, and so on
        lengths = torch.tensor([9 - 3 * (i % 3) for i in range(batch)])
        mask = torch.arange(9) >= (9 - lengths)[:, None]
    with torch.inference_mode():
        cache = _prefilled(model, prompts, mask)
        reference_cache = copy.deepcopy(cache)
        step = TokenStep(model)
        assert step.ready()
        ids = torch.randint(0, 96, (batch,))
        for _ in range(12):  # past the sliding window's ring of 5
            logits = step(ids, cache)
            stats = _routing_stats(model)
            reference = model(ids[:, None], cache=reference_cache).logits[:, -1]
            for mine, its in zip(stats, _routing_stats(model), strict=True):  # a MoE's statistics as its forward leaves them
                assert mine["load"] == its["load"]
                _assert_same_numbers(torch.tensor(mine["router_entropy"]), torch.tensor(its["router_entropy"]))
            assert logits.shape == (batch, 96)
            _assert_same_numbers(logits, reference)
            ids = logits.argmax(-1)
    assert cache.length == reference_cache.length == 9 + 12
    for a, b in zip(cache.keys + cache.values, reference_cache.keys + reference_cache.values):
        filled = min(cache.length, a.shape[2])  # the rest is unwritten memory
        _assert_same_numbers(a[:, :, :filled], b[:, :, :filled])


def _assert_same_numbers(step: torch.Tensor, model: torch.Tensor) -> None:
    """Bit for bit where the step runs torch's ops; to fp32 rounding where it runs the
    step kernels (csrc/step.c), which sum in another order."""
    if step_kernels() is None:
        assert torch.equal(step, model)
    else:
        torch.testing.assert_close(step, model, rtol=1e-5, atol=1e-6)


def _routing_stats(model: Transformer) -> list[dict[str, list[float]]]:
    return [{key: value.flatten().tolist() for key, value in b.mlp.last_stats.items()}
            for b in model.blocks if isinstance(b.mlp, MoE)]


@pytest.mark.parametrize("name", ["llama (rope, rmsnorm, swiglu, gqa, tied)", "attention-only, moe and dense layers"])
def test_quantised_models_step_to_the_forward_numbers(name):
    from heron.compress.quantize import quantize_model

    torch.manual_seed(0)
    model = quantize_model(Transformer(CONFIGS[name]).eval(), progress=False)  # a MoE's experts too
    set_decode_layout(model, 1)
    with torch.inference_mode():
        cache = _prefilled(model, torch.randint(0, 96, (1, 5)), None)
        reference_cache = copy.deepcopy(cache)
        ids = torch.tensor([7])
        _assert_same_numbers(TokenStep(model)(ids, cache), model(ids[:, None], cache=reference_cache).logits[:, -1])


def test_not_ready_while_any_hook_is_attached_or_autograd_is_on():
    model = Transformer(CONFIGS["llama (rope, rmsnorm, swiglu, gqa, tied)"]).eval()
    step = TokenStep(model)
    with torch.inference_mode():
        assert step.ready()
        with model.hooks({"blocks.1.hook_mlp_out": lambda x, name: None}):
            assert not step.ready()
        assert step.ready()
        handle = model.blocks[0].attn.qkv.register_forward_pre_hook(lambda module, args: None)
        assert not step.ready()
        handle.remove()
        handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
        assert not step.ready()
        handle.remove()
        assert step.ready()
    assert not step.ready()  # gradients on: the model's forward, with autograd's numbers
