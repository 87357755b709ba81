"""What the GGUF tests share: tiny LLaMA-, Qwen2-, Qwen3- and Mixtral-shaped configs, a model with weights
far from init, the llama.cpp layout each Heron tensor must take (derived by
hand, independently of interop/gguf.py), and llama.cpp's logits for a file."""
import json
import math

import gguf
import numpy as np
import torch

from heron.core import ModelConfig, RopeScaling, Transformer
from heron.core.config import MoEConfig
from heron.tokenizer import HeronTokenizer, train_tokenizer

CORPUS = [
    "def greet(name):\n    return f'Hello, {name}!'\n",
    "The quick brown fox jumps over the lazy dog. It's 42 degrees; we'll see.",
    "for i in range(10):\n\tprint(i * 3.14)  # numbers 123456\n",
    "Unicode: héllo wörld, naïve café, 日本語, emoji ✓.",
]
HARD_TEXTS = CORPUS + [
    "  leading spaces,\n\n\ttabs and   runs   of spaces  ",
    "It's they're we've I'm you'll he'd IT'S WE'LL 2024-06-01 3.14159 1234567",
    "lines\r\nending\r\n\n  in   \n\n\nspaces ✓✓ and... symbols?!",
]
VOCAB = 300
CONTEXT = 256  # llama.cpp rounds its context up to a multiple of 256; less draws a warning
SMALL = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=CONTEXT)
CONFIGS = {
    # Grouped-query attention, every bias, an untied head: the file tested in each type.
    "base": ModelConfig(vocab_size=VOCAB, **SMALL, d_ff=96, tie_embeddings=False, qkv_bias=True, out_bias=True,
                        mlp_bias=True),
    # A tied head (no output.weight) and linear RoPE scaling (llama.rope.scaling.*).
    "tied_linear": ModelConfig(vocab_size=VOCAB, **SMALL, d_ff=96, rope_scaling=RopeScaling(kind="linear", factor=2.0)),
    # Llama 3 scaling (rope_freqs.weight), head_dim != d_model / n_heads, a vocabulary padded past the
    # tokenizer's, and a feed-forward width (80) that Q8_0's 32-value blocks do not divide.
    "llama3": ModelConfig(vocab_size=VOCAB + 20, **SMALL, head_dim=32, d_ff=80, rope_theta=500.0,
                          rope_scaling=RopeScaling(kind="llama3", factor=4.0, original_max_seq_len=16)),
    # Three 32-wide heads on d_model 64, which LlamaConfig refuses (heads must divide hidden_size) and a
    # GGUF file states as key_length: llama.cpp's llama runs it.
    "odd_heads": ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=32,
                             max_seq_len=CONTEXT, d_ff=96),
    # Qwen2's biases, on q, k and v but not o: llama.cpp's llama reads each bias where the file has it.
    "qwen2": ModelConfig(vocab_size=VOCAB, **SMALL, d_ff=96, qkv_bias=True, out_bias=False),
    # Qwen3 (llama.cpp's qwen3 architecture): q and k normalised per head, heads wider than
    # d_model / n_heads, rows in rotate-half order as they are.
    "qwen3": ModelConfig(vocab_size=VOCAB, **SMALL, head_dim=32, d_ff=96, qk_norm=True, tie_embeddings=False),
    # Qwen3-MoE (llama.cpp's qwen3moe): the same attention, and experts as in "moe" below.
    "qwen3_moe": ModelConfig(vocab_size=VOCAB, **SMALL, head_dim=32, qk_norm=True, feed_forward=("moe",),
                             tie_embeddings=False, moe=MoEConfig(n_experts=4, top_k=2, d_ff=32)),
    # Mixtral: every feed-forward 4 experts of width 32, top-2, stacked per layer in the file.
    "moe": ModelConfig(vocab_size=VOCAB, **SMALL, feed_forward=("moe",), tie_embeddings=False,
                       moe=MoEConfig(n_experts=4, top_k=2, d_ff=32)),
}

def make_tokenizer() -> HeronTokenizer:
    """A byte-level BPE of VOCAB tokens trained on CORPUS."""
    return train_tokenizer(CORPUS * 4, vocab_size=VOCAB, progress=False)


def perturbed_model(config: ModelConfig) -> Transformer:
    """Weights far from init (norm gains around 1, biases non-zero), so every
    tensor moves the logits visibly and logits are O(1)."""
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1 if name.endswith("bias") else 0.15)
    return model


def spec_of(tokenizer) -> dict:
    """A tokenizer's tokenizer.json, parsed."""
    return json.loads(tokenizer.to_json())


def fields(path) -> dict[str, object]:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}



def rope_pairs(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Each head's rows j and j + hd/2 (rotate-half partners) made neighbours 2j and 2j + 1."""
    head_dim = rows.shape[0] // n_heads
    half = head_dim // 2
    order = [h * head_dim + a * half + j for h in range(n_heads) for j in range(half) for a in (0, 1)]
    return rows[order]


def expected_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Every tensor the file should hold, from Heron's names and fused layouts."""
    c = model.config
    q, kv, ff = c.n_heads * c.resolved_head_dim, c.resolved_kv_heads * c.resolved_head_dim, c.resolved_d_ff
    p = {name: t.detach() for name, t in model.named_parameters()}
    out = {"token_embd.weight": p["embed.weight"], "output_norm.weight": p["norm.weight"]}
    if not c.tie_embeddings:
        out["output.weight"] = p["lm_head.weight"]
    # llama.cpp's qwen3 rotates halves, as Heron does; its llama rotates pairs.
    order = (lambda rows, _: rows) if c.qk_norm else rope_pairs
    for i in range(c.n_layers):
        b, blk = f"blocks.{i}.", f"blk.{i}."
        out[blk + "attn_norm.weight"] = p[b + "attn_norm.weight"]
        out[blk + "ffn_norm.weight"] = p[b + "mlp_norm.weight"]
        if c.qk_norm:
            out[blk + "attn_q_norm.weight"] = p[b + "attn.q_norm.weight"]
            out[blk + "attn_k_norm.weight"] = p[b + "attn.k_norm.weight"]
        for kind in ("weight", "bias") if c.qkv_bias else ("weight",):
            qkv = p[b + "attn.qkv." + kind]
            out[blk + "attn_q." + kind] = order(qkv[:q], c.n_heads)
            out[blk + "attn_k." + kind] = order(qkv[q:q + kv], c.resolved_kv_heads)
            out[blk + "attn_v." + kind] = qkv[q + kv:]
        if c.moe is not None:  # experts (E, in, out) -> one (E, out, in) stack per linear
            width = c.resolved_expert_d_ff
            out[blk + "ffn_gate_inp.weight"] = p[b + "mlp.router.weight"]
            out[blk + "ffn_gate_exps.weight"] = p[b + "mlp.up"][..., :width].transpose(1, 2)
            out[blk + "ffn_up_exps.weight"] = p[b + "mlp.up"][..., width:].transpose(1, 2)
            out[blk + "ffn_down_exps.weight"] = p[b + "mlp.down"].transpose(1, 2)
        for kind in (("weight", "bias") if c.mlp_bias else ("weight",)) if c.moe is None else ():
            out[blk + "ffn_gate." + kind] = p[b + "mlp.up." + kind][:ff]
            out[blk + "ffn_up." + kind] = p[b + "mlp.up." + kind][ff:]
            out[blk + "ffn_down." + kind] = p[b + "mlp.down." + kind]
        for kind in ("weight", "bias") if c.out_bias else ("weight",):
            out[blk + "attn_output." + kind] = p[b + "attn.out." + kind]
    if c.rope_scaling is not None and c.rope_scaling.kind == "llama3":
        out["rope_freqs.weight"] = llama3_rope_factors(c)
    return out


def llama3_rope_factors(c: ModelConfig) -> torch.Tensor:
    """The divisor of each RoPE frequency, as llama.cpp's converter computes it
    (conversion/llama.py, `LlamaModel.generate_extra_tensors`)."""
    s, dim = c.rope_scaling, c.resolved_head_dim
    factors = []
    for freq in 1.0 / (c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < s.original_max_seq_len / s.high_freq_factor:
            factors.append(1.0)
        elif wavelen > s.original_max_seq_len / s.low_freq_factor:
            factors.append(s.factor)
        else:
            smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return torch.tensor(factors)



def llama_cpp_logits(llama_cpp, path, ids: list[int], context: int = CONTEXT) -> np.ndarray:
    """(T, V) llama.cpp's logits for `ids` from the file at `path`, with an f32
    KV cache: llama.cpp's default f16 cache alone moves f32 logits by ~7e-3."""
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=context, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()
