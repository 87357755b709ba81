"""Parity with `transformers`' LlamaForCausalLM on tiny random models.

As minGPT's and litgpt's tests: the same weights in both implementations give
the same logits and the same greedy tokens. Nothing downloads: the Hugging
Face models are built from configs.
"""
import copy

import pytest
import torch

from heron.core import KVCache, ModelConfig, RopeScaling, Transformer

transformers = pytest.importorskip("transformers")
from heron.interop import from_transformers, to_transformers  # noqa: E402

VOCAB = 97
CONFIGS = {
    "mha": dict(),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "untied": dict(tie_embeddings=False, n_kv_heads=2),
    "biases": dict(qkv_bias=True, out_bias=True, mlp_bias=True, n_kv_heads=2),
    "head_dim_d_ff": dict(head_dim=32, d_ff=96, n_kv_heads=2),
    "rope_linear": dict(rope_scaling=RopeScaling(kind="linear", factor=4.0), rope_theta=500.0),
    # original_max_seq_len below the test length, so all three llama3 bands occur.
    "rope_llama3": dict(rope_scaling=RopeScaling(kind="llama3", factor=8.0, original_max_seq_len=16)),
}


def random_model(seed: int = 0, **overrides) -> Transformer:
    """Weights far from init (norm gains around 1, biases non-zero), so every
    parameter moves the logits visibly."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, **overrides)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model


def heron_greedy(model: Transformer, ids: torch.Tensor, steps: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy tokens (B, steps) decoded through the KV cache."""
    cache = KVCache.allocate(model.config, ids.shape[0], ids.shape[1] + steps)
    logits = model(ids, attention_mask=mask, cache=cache, last_only=True).logits  # (B, 1, V)
    new = []
    for _ in range(steps):
        new.append(logits[:, -1].argmax(-1, keepdim=True))  # (B, 1)
        logits = model(new[-1], cache=cache, last_only=True).logits
    return torch.cat(new, dim=1)  # (B, steps)


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def pair(request) -> tuple[Transformer, "transformers.LlamaForCausalLM"]:
    model = random_model(**CONFIGS[request.param])
    return model, to_transformers(model).eval()


@torch.no_grad()
def test_logits_match(pair):
    model, hf = pair
    ids = torch.randint(0, VOCAB, (3, 48), generator=torch.Generator().manual_seed(1))
    ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.abs().max() > 1.0  # a test of real numbers, not of near-zero logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_greedy_tokens_match(pair):
    model, hf = pair
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(heron_greedy(model, ids, 12), theirs)


@torch.no_grad()
def test_left_padded_greedy_matches():
    """Batched decoding with left padding, as the decode benchmark runs it."""
    model = random_model(n_kv_heads=2)
    hf = to_transformers(model).eval()
    ids = torch.randint(1, VOCAB, (3, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :5], mask[2, :2] = False, False
    ids = ids.masked_fill(~mask, 0)
    theirs = hf.generate(ids, attention_mask=mask.long(), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(heron_greedy(model, ids, 10, mask), theirs[:, ids.shape[1]:])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact(name):
    model = random_model(**CONFIGS[name])
    back = from_transformers(to_transformers(model))
    assert back.config == model.config
    torch.testing.assert_close(back.state_dict(), model.state_dict(), rtol=0, atol=0)  # keys and bits


@torch.no_grad()
def test_import_of_a_random_transformers_model():
    """The other direction, from a model `transformers` initialised itself."""
    torch.manual_seed(4)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, initializer_range=0.2,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    model = from_transformers(hf)
    assert (model.config.d_ff, model.config.n_kv_heads, model.config.norm_eps) == (160, 2, 1e-6)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_import_of_a_bf16_transformers_model_is_bf16_and_the_fp32_model_cast():
    """from_transformers keeps the `transformers` model's dtype, as to_transformers keeps Heron's:
    a bf16 model comes back in bf16, RoPE tables too, with the logits of the fp32 model cast."""
    model = random_model(n_kv_heads=2)
    imported = from_transformers(to_transformers(copy.deepcopy(model).to(torch.bfloat16)))
    assert imported.rope_cos.dtype == imported.rope_sin.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(6))
    logits = imported(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, model.to(torch.bfloat16)(ids).logits)
