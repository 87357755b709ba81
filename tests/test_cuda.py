"""Heron on an NVIDIA GPU: the same model gives on a CUDA device what it gives on the CPU.

The CPU suite proves each computation against its reference (transformers, a
masked dense computation, a token-by-token MoE); these tests carry that proof
to the GPU by comparing each device-side result with the CPU's. They also run
the branches that only run off the CPU: sparse patterns through compiled
FlexAttention (core/sparse.py), MoE experts looped one by one in training
(core/moe.py), quantised linears' dequantising path (compress/qlinear.py), and
energy metered through NVML. The training loop's are in
tests/train/test_cuda_training.py.

Skipped without a CUDA GPU. TF32 is switched off so that fp32 means fp32; the
tolerances are the CPU suite's, loosened where GPU kernels sum in another order.

    python -m pytest -m cuda
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from heron.compress import quantize_model
from heron.core import KVCache, ModelConfig, Transformer
from heron.core.config import AttentionPattern, MoEConfig, RopeScaling
from heron.core.sparse import BLOCK, dense_mask, sparse_attention
from heron.generate import Generator, SamplingParams
from heron.govern.energy import EnergyMeter

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = "cuda"
LOGIT_TOL = 1e-4  # fp32 logits of order 1, summed in another order than on the CPU
GRAD_REL_TOL = 1e-4  # ‖g_cuda - g_cpu‖ / ‖g_cpu‖
ATTENTION_TOL = 1e-5  # the CPU suite's bound for sparse against masked dense

PATTERNS = {
    "sliding": AttentionPattern(kind="sliding", window=24),
    "dilated": AttentionPattern(kind="dilated", window=9, dilation=3),
    "strided": AttentionPattern(kind="strided", stride=11),
    "fixed": AttentionPattern(kind="fixed", block=20, summary=3),
    "bigbird": AttentionPattern(kind="bigbird", block=8, local_blocks=1, global_blocks=1, random_blocks=2, seed=3),
}
VARIANTS = {
    "gqa": dict(n_kv_heads=2),
    "learned_layernorm_gelu": dict(positions="learned", norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True,
                                   mlp_bias=True),
    **{name: dict(attention=(pattern,)) for name, pattern in PATTERNS.items()},
    "neox_parallel_partial_rotary": dict(norm="layernorm", mlp="gelu", qkv_bias=True, parallel_residual=True,
                                         rotary_dim=8),
    "qk_norm_llama3_scaling": dict(n_kv_heads=2, qk_norm=True, rope_scaling=RopeScaling(
        kind="llama3", factor=8.0, original_max_seq_len=64)),
    "dense_then_sliding": dict(attention=(AttentionPattern(kind="dense"), PATTERNS["sliding"])),
    "moe_top2_shared": dict(feed_forward=("dense", "moe"), moe=MoEConfig(n_experts=4, top_k=2, shared_expert=True)),
}


@pytest.fixture(autouse=True)
def true_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=160, **overrides)
    return Transformer(config).eval()


def random_ids(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_and_gradients_equal_the_cpu(variant):
    """Training mode, so MoE takes its expert-by-expert path; lengths cross BLOCK and every pattern's span."""
    cpu = make_model(**VARIANTS[variant]).train()
    gpu = copy.deepcopy(cpu).to(CUDA)
    ids, targets = random_ids((2, BLOCK + 13)), random_ids((2, BLOCK + 13), seed=2)
    grads = {}
    for name, model in (("cpu", cpu), ("cuda", gpu)):
        device = next(model.parameters()).device
        out = model(ids.to(device))
        loss = F.cross_entropy(out.logits.flatten(0, 1), targets.to(device).flatten()) + out.aux_loss
        loss.backward()
        grads[name] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    (cpu_logits, cpu_grads), (gpu_logits, gpu_grads) = grads["cpu"], grads["cuda"]
    assert (gpu_logits.cpu() - cpu_logits).abs().max().item() <= LOGIT_TOL
    for name, want in cpu_grads.items():
        assert relative_error(gpu_grads[name], want) <= GRAD_REL_TOL, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_the_full_forward(variant):
    model = make_model(**VARIANTS[variant]).to(CUDA)
    ids = random_ids((3, 90)).to(CUDA)
    with torch.no_grad():
        full = model(ids).logits  # (3, 90, V)
        cache = KVCache.allocate(model.config, batch_size=3, max_len=96, device=CUDA)
        pieces = [model(ids[:, :37], cache=cache).logits, model(ids[:, 37:41], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(41, 90)]
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= LOGIT_TOL


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("length", [1, 2 * BLOCK + 5])
def test_sparse_attention_equals_masked_dense_forward_and_backward(pattern, length):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(2, 4, length, 16, generator=g).to(CUDA).requires_grad_()
    k, v = (torch.randn(2, 2, length, 16, generator=g).to(CUDA).requires_grad_() for _ in range(2))
    rule = PATTERNS[pattern]
    out = sparse_attention(q, k, v, rule)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(rule, length, CUDA), enable_gqa=True)
    assert (out - want).abs().max().item() <= ATTENTION_TOL
    grad = torch.randn(out.shape, generator=g).to(CUDA)
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        assert (got - expected).abs().max().item() <= ATTENTION_TOL


def test_batched_greedy_generation_equals_the_cpu():
    model = make_model(n_kv_heads=2)
    prompts = [random_ids((n,), seed=n).tolist() for n in (3, 11, 7)]
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    on_cpu = Generator(model).complete(prompts, params)
    on_gpu = Generator(copy.deepcopy(model).to(CUDA)).complete(prompts, params)
    assert [c.ids for c in on_gpu] == [c.ids for c in on_cpu]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantised_model_equals_the_cpu(scheme):
    model = quantize_model(make_model(n_kv_heads=2), scheme, group_size=32, progress=False)
    ids = random_ids((2, 40))
    with torch.no_grad():
        want = model(ids).logits
        got = copy.deepcopy(model).to(CUDA)(ids.to(CUDA)).logits
    assert (got.cpu() - want).abs().max().item() <= LOGIT_TOL


def test_nvml_meters_the_gpu(tmp_path: Path):
    pytest.importorskip("pynvml")
    meter = EnergyMeter(powercap_root=tmp_path).start()  # no RAPL here: the CPU part is the estimate
    a = torch.randn(8192, 8192, device=CUDA, dtype=torch.bfloat16)
    began = time.monotonic()
    while time.monotonic() - began < 3.0:
        for _ in range(50):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
    report = meter.stop(tokens=1000)
    assert "nvml:GPU 0" in report.source and not [why for why in report.unavailable if why.startswith("nvml")]
    watts = report.joules / report.seconds
    assert 50 < watts < 2000, report.summary()  # a busy H100/H200 board draws hundreds of watts
