"""GGUF export (interop/gguf.py), read back two ways.

With gguf-py's reader: metadata values, tensor names, shapes and types, the
tokenizer arrays, and every tensor equal to the Heron weight it comes from,
rearranged by hand into llama.cpp's layout (exact in f32, to f16 rounding in
f16, within a quantisation step's rounding in Q8_0, Q4_0 and Q4_1). With llama.cpp itself
(llama-cpp-python, the `llama` extra; those tests skip where it is not
installed): each file loads, its logits match Heron's within a tolerance per
type, and its tokenizer gives Heron's ids.
"""
import json

import gguf
import numpy as np
import pytest
import torch
from gguf_layout import (CONFIGS, CONTEXT, CORPUS, HARD_TEXTS, VOCAB, expected_tensors, fields, llama3_rope_factors,
                         llama_cpp_logits, make_tokenizer, perturbed_model, spec_of)
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from heron.core import AttentionPattern, MoEConfig, RopeScaling, Transformer
from heron.core.rope import apply_rope, rope_tables
from heron.interop import save_gguf
from heron.interop.gguf import encode_tensor, interleave_rope, qkv_in_blocks, stacked_experts
from heron.interop.gguf_tokenizer import LLAMA3_REGEX, QWEN2_REGEX, gguf_tokenizer_style
from heron.tokenizer import SPECIAL_TOKENS, HeronTokenizer
from heron.tokenizer.pretrained import PretrainedTokenizer

DTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
Q = gguf.GGMLQuantizationType
MATRIX_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3}  # llama.cpp's LLAMA_FTYPE_*


@pytest.fixture(scope="module")
def tokenizer() -> HeronTokenizer:
    return make_tokenizer()


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory) -> dict[tuple[str, str], tuple[Transformer, object]]:
    """(config name, dtype) -> (model, path of its GGUF file), every config in every type."""
    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, config in CONFIGS.items():
        model = perturbed_model(config)
        for dtype in DTYPES:
            out[name, dtype] = model, save_gguf(model, tokenizer, folder / f"{name}-{dtype}.gguf", dtype=dtype)
    return out


# ----- read back with gguf-py --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_metadata(exported, dtype):
    _, path = exported["base", dtype]
    got = fields(path)
    want = {
        "general.architecture": "llama", "general.name": f"base-{dtype}", "general.file_type": FILE_TYPES[dtype],
        "llama.vocab_size": VOCAB, "llama.context_length": CONTEXT, "llama.embedding_length": 64,
        "llama.block_count": 2, "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.attention.key_length": 16, "llama.attention.value_length": 16,
        "llama.rope.dimension_count": 16, "llama.rope.freq_base": 10000.0,
    }
    assert {key: got[key] for key in want} == want
    assert got["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert "llama.rope.scaling.type" not in got


def test_moe_metadata(exported):
    got = fields(exported["moe", "f32"][1])
    assert (got["llama.expert_count"], got["llama.expert_used_count"], got["llama.feed_forward_length"]) == (4, 2, 32)
    assert "llama.expert_count" not in fields(exported["base", "f32"][1])


def test_qwen3_metadata(exported):
    got = fields(exported["qwen3", "f32"][1])
    want = {"general.architecture": "qwen3", "qwen3.embedding_length": 64, "qwen3.attention.head_count": 4,
            "qwen3.attention.head_count_kv": 2, "qwen3.attention.key_length": 32, "qwen3.rope.dimension_count": 32,
            "qwen3.feed_forward_length": 96}
    assert {key: got[key] for key in want} == want


def test_qwen3_moe_metadata(exported):
    got = fields(exported["qwen3_moe", "f32"][1])
    want = {"general.architecture": "qwen3moe", "qwen3moe.expert_count": 4, "qwen3moe.expert_used_count": 2,
            "qwen3moe.expert_feed_forward_length": 32, "qwen3moe.attention.key_length": 32}
    assert {key: got[key] for key in want} == want


def test_heads_that_do_not_divide_d_model_go_in_with_their_own_width(exported):
    """LlamaConfig refuses 3 heads on d_model 64 (Hugging Face export writes Mistral instead); a
    GGUF file states the head width, so the llama architecture takes it as it is."""
    got = fields(exported["odd_heads", "f32"][1])
    want = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 3,
            "llama.attention.head_count_kv": 1, "llama.attention.key_length": 32,
            "llama.attention.value_length": 32, "llama.rope.dimension_count": 32}
    assert {key: got[key] for key in want} == want


def test_rope_scaling_metadata(exported):
    linear = fields(exported["tied_linear", "f32"][1])
    assert (linear["llama.rope.scaling.type"], linear["llama.rope.scaling.factor"]) == ("linear", 2.0)
    llama3 = fields(exported["llama3", "f32"][1])
    assert "llama.rope.scaling.type" not in llama3  # carried by rope_freqs.weight instead
    assert (llama3["llama.rope.dimension_count"], llama3["llama.attention.key_length"]) == (32, 32)
    assert llama3["llama.rope.freq_base"] == 500.0


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_tensors_hold_the_heron_weights(exported, name, dtype):
    model, path = exported[name, dtype]
    want = expected_tensors(model)
    tensors = gguf.GGUFReader(path).tensors
    assert sorted(t.name for t in tensors) == sorted(want)
    for t in tensors:
        expected = want[t.name].float().numpy()
        assert tuple(int(n) for n in reversed(t.shape)) == expected.shape, t.name  # ggml lists ne0 first
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        if expected.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=t.name)
        elif t.tensor_type in BLOCK_ERROR:
            # Each block of 32 values is rounded to a grid of `step` (off by at most half a step, or by
            # one for values Q4_0 clips), plus the f16 rounding (relative 2^-11) of the stored scale d
            # (and Q4_1's minimum m), which moves a value `levels` steps from the grid's origin by
            # levels * 2^-11 of a step more.
            blocks = expected.reshape(-1, 32)
            step, rounding, levels = BLOCK_ERROR[t.tensor_type](blocks)
            assert (np.abs(got.reshape(-1, 32) - blocks) <= (rounding + levels * 2**-11) * step + 1e-7).all(), t.name
        else:
            assert t.tensor_type == MATRIX_TYPES[dtype] or (dtype.startswith("q") and expected.shape[-1] % 32), t.name
            exact = expected.astype(np.float16).astype(np.float32) if t.tensor_type != MATRIX_TYPES["f32"] else expected
            np.testing.assert_array_equal(got, exact, err_msg=t.name)


def _amax(blocks: np.ndarray) -> np.ndarray:
    return np.abs(blocks).max(axis=1, keepdims=True)


def _range(blocks: np.ndarray) -> np.ndarray:
    return blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)


# ggml type -> blocks (n, 32) -> (grid step per block, error in steps from rounding to the grid, most
# levels between the grid's origin and a value). Q8_0: int8 x amax / 127. Q4_1: min + q x (max - min) / 15.
# Q4_0: (q - 8) x d, d = -(the value of largest |x|) / 8: codes 0..15 reach 8 steps on that value's side
# of zero and 7 on the other, where a value up to 8 steps out is clipped, one step off.
BLOCK_ERROR = {
    Q.Q8_0: lambda b: (_amax(b) / 127, 0.5, 127),
    Q.Q4_0: lambda b: (_amax(b) / 8, 1.0, 8),
    Q.Q4_1: lambda b: (_range(b) / 15, 0.5, 15 + 15 * _amax(b) / np.maximum(_range(b), 1e-12)),
}


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q4_1"])
def test_block_types_fall_back_to_f16_for_rows_that_do_not_fill_blocks(exported, dtype):
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(exported["llama3", dtype][1]).tensors}
    assert types["blk.0.ffn_down.weight"] == Q.F16  # rows of d_ff = 80
    assert types["blk.0.ffn_up.weight"] == MATRIX_TYPES[dtype]  # rows of d_model = 64


def test_tokenizer_arrays(exported, tokenizer):
    got = fields(exported["llama3", "f32"][1])
    spec = json.loads(tokenizer.to_json())
    backend = tokenizer.backend
    assert (got["tokenizer.ggml.model"], got["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens, types = got["tokenizer.ggml.tokens"], got["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == VOCAB + 20
    assert tokens[:VOCAB] == [backend.id_to_token(i) for i in range(VOCAB)]
    assert tokens[VOCAB:] == [f"[PAD{i}]" for i in range(VOCAB, VOCAB + 20)]
    special = set(tokenizer.special_ids.values())
    assert types[:VOCAB] == [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(VOCAB)]
    assert set(types[VOCAB:]) == {gguf.TokenType.UNUSED}
    assert got["tokenizer.ggml.merges"] == [" ".join(pair) for pair in spec["model"]["merges"]]
    assert (got["tokenizer.ggml.bos_token_id"], got["tokenizer.ggml.eos_token_id"],
            got["tokenizer.ggml.padding_token_id"]) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    assert (got["tokenizer.ggml.add_bos_token"], got["tokenizer.ggml.add_eos_token"]) == (False, False)
    assert got["tokenizer.chat_template"].startswith("{{ '<|bos|>' }}")


def test_interleave_rope_turns_rotate_half_into_pair_rotation():
    """Known mechanism: rotating q with Heron's rotate-half RoPE and then
    interleaving equals interleaving and then rotating consecutive pairs
    (2j, 2j + 1) by the same angles, which is llama.cpp's "normal" RoPE."""
    heads, head_dim, length = 3, 8, 5
    x = torch.randn(length, heads * head_dim, generator=torch.Generator().manual_seed(0))  # (T, H * hd)
    cos, sin = rope_tables(length, head_dim, 10000.0, None)  # (T, hd); angle j repeats at j + hd/2, sin signed -, +
    rotated = apply_rope(x.view(length, heads, head_dim).transpose(0, 1), cos, sin)  # (H, T, hd)
    ours = interleave_rope(rotated.transpose(0, 1).reshape(length, -1).T, heads).T  # (T, H * hd)
    pairs = interleave_rope(x.T, heads).T.reshape(length, heads, head_dim // 2, 2)
    c, s = cos[:, None, : head_dim // 2], sin[:, None, head_dim // 2 :]  # (T, 1, hd/2)
    theirs = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], dim=-1)
    torch.testing.assert_close(ours, theirs.reshape(length, -1))


# ----- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "field"), [
    (dict(attention=(AttentionPattern(kind="sliding", window=8),)), "attention"),
    (dict(norm="layernorm", positions="learned"), "norm"),  # LayerNorm goes in as gptneox, with RoPE only
    (dict(attn_scale=1.0), "attn_scale"),
    (dict(qk_norm=True, mlp_bias=False), "qkv_bias"),  # written as llama.cpp's qwen3: no attention biases
    (dict(qk_norm=True, qkv_bias=False, mlp_bias=False), "out_bias"),
    (dict(vocab_size=VOCAB - 1), "vocab_size"),
    (dict(parallel_residual=True), "parallel_residual"),  # GPT-NeoX's: no llama.cpp architecture Heron writes
    (dict(rotary_dim=4), "rotary_dim"),
])
def test_refuses_models_llama_cpp_cannot_run(tokenizer, tmp_path, change, field):
    model = Transformer(CONFIGS["base"].replace(**change))
    with pytest.raises(ValueError, match=f"^{field}:"):
        save_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_refusal_says_which_architectures_a_gguf_file_can_have(tokenizer, tmp_path):
    model = Transformer(CONFIGS["base"].replace(norm="layernorm", positions="learned"))
    with pytest.raises(ValueError, match=r"^norm: LlamaForCausalLM needs 'rmsnorm'.*\(a GGUF file is written as "
                                         r"llama.cpp's llama, qwen3, qwen3moe or gptneox architecture"):
        save_gguf(model, tokenizer, tmp_path / "model.gguf")


@pytest.mark.parametrize(("change", "field"), [
    (dict(feed_forward=("dense", "moe")), "feed_forward"),  # Mixtral: experts on every layer
    (dict(moe=MoEConfig(n_experts=4, top_k=2, d_ff=32, router_centering=True)), "moe.router_centering"),
    (dict(moe=MoEConfig(n_experts=4, top_k=2, d_ff=32, shared_expert=True)), "moe.shared_expert"),
    (dict(moe=MoEConfig(n_experts=4, top_k=2, d_ff=32, routed_scale=2.0)), "moe.routed_scale"),
    (dict(qkv_bias=True), "qkv_bias"),
    # qwen3moe: experts on every layer, and no attention biases
    (dict(qk_norm=True, feed_forward=("dense", "moe")), "feed_forward"),
    (dict(qk_norm=True, qkv_bias=True, out_bias=True), "qkv_bias"),
])
def test_refuses_moe_models_llama_cpp_cannot_run(tokenizer, tmp_path, change, field):
    model = Transformer(CONFIGS["moe"].replace(**change))
    with pytest.raises(ValueError, match=f"^{field}:"):
        save_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


def test_refuses_tokenizers_it_cannot_express(tmp_path):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    model = Transformer(CONFIGS["base"])
    with pytest.raises(ValueError, match="pre_tokenizer.type: 'Whitespace'"):
        save_gguf(model, PretrainedTokenizer(backend), tmp_path / "model.gguf")
    with pytest.raises(ValueError, match="dtype: 'q4_k'"):
        save_gguf(model, PretrainedTokenizer(backend), tmp_path / "model.gguf", dtype="q4_k")


def model_with_weight(name: str, value: float) -> Transformer:
    """CONFIGS[name] (perturbed) with one weight of layer 0's MLP output set to `value`."""
    model = perturbed_model(CONFIGS[name])
    with torch.no_grad():
        model.blocks[0].mlp.down.weight[0, 0] = value
    return model


# The number each type keeps as f16 (gguf.quants): a value; Q8_0's scale 1e7 / 127; Q4_0's 1e6 / 8; Q4_1's
# minimum, the block's smallest value, and its scale (max - min) / 15 (the block's others are within ±0.6).
OVERFLOWS = {
    "f16": ("f16", 1e5, "base", r"f16, a value would be 100000, .* as f32 or q8_0 \(--type\)$"),
    "q4_1_minimum": ("q4_1", -1e5, "base",
                     r"q4_1, a block's f16 minimum \(its smallest value\) would be -100000, .* as f32 or q8_0 "),
    "q4_1_scale": ("q4_1", 1e6, "base",
                   r"q4_1, a block's f16 scale \(\(its largest value - its smallest\) / 15\) would be 66666\.\d, "),
    "q4_0": ("q4_0", 1e6, "base",
             r"q4_0, a block's f16 scale \(its largest \|value\| / 8\) would be 125000, .* as f32 or q8_0 "),
    "q8_0": ("q8_0", 1e7, "base",
             r"q8_0, a block's f16 scale \(its largest \|value\| / 127\) would be 78740\.2, .* as f32 \(--type\)$"),
    # Rows of d_ff = 80 fill no blocks and fall back to f16, so q8_0 would not hold them either.
    "q8_0_rows_in_f16": ("q8_0", 1e5, "llama3",
                         r"f16 \(its rows fill no q8_0 blocks\), a value would be 100000, .* as f32 \(--type\)$"),
}


@pytest.mark.parametrize("case", list(OVERFLOWS))
def test_refuses_a_weight_its_type_would_hold_as_inf(tokenizer, tmp_path, case):
    """Past f16's largest number (65504), a weight, or a block's scale or minimum, would be inf in
    the file, and llama.cpp's logits NaN."""
    dtype, value, config, what = OVERFLOWS[case]
    model = model_with_weight(config, value)
    with pytest.raises(ValueError, match=r"^blocks.0.mlp.down.weight \(blk.0.ffn_down.weight in the file\): as "
                                         + what) as refusal:
        save_gguf(model, tokenizer, tmp_path / "model.gguf", dtype=dtype)
    assert "beyond f16's range (±65504), so the file would hold inf and llama.cpp would compute NaN logits" in \
        str(refusal.value)
    assert list(tmp_path.iterdir()) == []


def test_q4_1_holds_a_large_positive_weight_its_scale_and_minimum_keep_finite(tokenizer, tmp_path):
    """Q4_1 keeps a block's minimum and (max - min) / 15: with 1e5 among values within ±0.6 both are
    finite (about -0.6 and 6667), and the block dequantises to 1e5 within a grid step's f16 rounding."""
    path = save_gguf(model_with_weight("base", 1e5), tokenizer, tmp_path / "model.gguf", dtype="q4_1")
    down = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    values = gguf.quants.dequantize(down.data, down.tensor_type)
    assert down.tensor_type == Q.Q4_1 and np.isfinite(values).all()
    assert values.flat[0] == pytest.approx(1e5, rel=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_refuses_a_weight_that_is_not_a_number_in_every_type(tokenizer, tmp_path, dtype, value):
    """A NaN or inf weight makes llama.cpp's logits NaN in any type, f32 too: refused before the range check."""
    model = model_with_weight("base", value)
    with torch.no_grad():
        model.blocks[0].mlp.down.weight[3, 5] = value
    with pytest.raises(ValueError, match=rf"^blocks.0.mlp.down.weight \(blk.0.ffn_down.weight in the file\): 2 of its "
                                         rf"values are not finite \(the first, at \(0, 0\), is {value}\); in any type"):
        save_gguf(model, tokenizer, tmp_path / "model.gguf", dtype=dtype)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_norm_that_is_not_a_number(tokenizer, tmp_path):
    model = perturbed_model(CONFIGS["base"])
    with torch.no_grad():
        model.norm.weight[7] = float("nan")
    with pytest.raises(ValueError, match=r"^norm.weight \(output_norm.weight in the file\): 1 of its values are not "
                                         r"finite \(the first, at \(7,\), is nan\)"):
        save_gguf(model, tokenizer, tmp_path / "model.gguf", dtype="f32")


def test_encode_tensor_names_a_tensor_it_is_given_no_name_for():
    """`name` is for save_gguf's refusals; a caller that gives none still encodes, and a refusal says "tensor"."""
    data, qtype = encode_tensor(torch.ones(2, 32), Q.Q8_0)
    assert qtype == Q.Q8_0 and data.shape == (2, 34)
    with pytest.raises(ValueError, match=r"^tensor: as f16, a value would be 100000, "):
        encode_tensor(torch.full((2, 3), 1e5), Q.F16)


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_a_weight_past_f16s_range_goes_in_as_f32_or_q8_0(tokenizer, tmp_path, dtype):
    path = save_gguf(model_with_weight("base", 1e5), tokenizer, tmp_path / "model.gguf", dtype=dtype)
    down = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    values = gguf.quants.dequantize(down.data, down.tensor_type)
    assert np.isfinite(values).all() and values.flat[0] == pytest.approx(1e5, rel=2**-11)


def regex_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def regex_bpe(regex: str, ignore_merges: bool) -> PretrainedTokenizer:
    """A byte-level BPE split by `regex`, trained on CORPUS split as Llama 3
    splits it: the merges hold digit pairs ("12") that Qwen2's split, digit by
    digit, never lets form, so a file that names the wrong split tokenizes
    "123456" otherwise."""
    backend = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    backend.pre_tokenizer = regex_then_bytes(LLAMA3_REGEX)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  progress=False)
    backend.train_from_iterator(CORPUS * 4, trainer)
    backend.pre_tokenizer = regex_then_bytes(regex)
    return PretrainedTokenizer(backend)


REGEX_BPE = {"llama-bpe": (LLAMA3_REGEX, True), "qwen2": (QWEN2_REGEX, False)}


def test_the_pre_tokenizer_is_named_by_how_text_is_split(tokenizer):
    assert gguf_tokenizer_style(spec_of(tokenizer)) == "gpt-2"
    for name, (regex, ignore_merges) in REGEX_BPE.items():
        assert gguf_tokenizer_style(spec_of(regex_bpe(regex, ignore_merges))) == name


@pytest.mark.parametrize(("regex", "ignore_merges", "field"), [
    (QWEN2_REGEX, True, "model.ignore_merges: True"),  # Qwen2's split with Llama 3's merging: neither
    (LLAMA3_REGEX.replace("{1,3}", "{1,2}"), True, r"pre_tokenizer.pretokenizers.0.pattern.Regex: .*llama-bpe"),
])
def test_a_near_miss_names_the_field_that_differs(regex, ignore_merges, field):
    with pytest.raises(ValueError, match=f"^tokenizer.json {field}"):
        gguf_tokenizer_style(spec_of(regex_bpe(regex, ignore_merges)))


def test_a_failed_write_leaves_the_old_file_whole(tokenizer, tmp_path, monkeypatch):
    model = perturbed_model(CONFIGS["base"])
    path = save_gguf(model, tokenizer, tmp_path / "model.gguf")
    before = path.read_bytes()

    def crash(self, *, progress=False):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_gguf(model, tokenizer, path, dtype="q8_0")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no partial file left beside it


# ----- llama.cpp ---------------------------------------------------------------------------------

# (max, mean) |logit difference| allowed by file type, for logits of spread ~1.3 and peak ~5.
# Measured on the test's sequence (and the worst of 10 random ones): f32 max 1.0e-5 (1.2e-5),
# mean 1.1e-6; f16 max 1.2e-2 (1.4e-2), mean 1.6e-3; q8_0 max 0.28 (0.79), mean 4.3e-2. f32
# differs by summation order only. f16 and Q8_0 add rounding of the weights and, in llama.cpp's
# matmuls, of the activations too (to f16, or to Q8_0 blocks), which RMSNorm then rescales.
# Q4_0 and Q4_1 round these random weights coarsely (max 3.3, mean 0.44 measured): here the bound
# only catches a scrambled layout (shuffled logits differ by a mean of 1.2-1.4);
# test_gguf_quantized.py matches a Heron int4 model's own logits closely.
TOLERANCES = {"f32": (1e-4, 1e-5), "f16": (5e-2, 5e-3), "q8_0": (1.0, 0.1), "q4_0": (5.0, 0.6), "q4_1": (5.0, 0.6)}
LLAMA_RUNS = [("base", "f32"), ("base", "f16"), ("base", "q8_0"), ("base", "q4_0"), ("base", "q4_1"),
              ("tied_linear", "f32"), ("llama3", "f32"), ("odd_heads", "f32"), ("odd_heads", "q8_0"),
              ("qwen2", "f32"), ("qwen3", "f32"), ("qwen3", "q8_0"),
              ("qwen3_moe", "f32"), ("moe", "f32"), ("moe", "q8_0")]


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.mark.parametrize(("name", "dtype"), LLAMA_RUNS)
@torch.no_grad()
def test_llama_cpp_logits_match_heron(llama_cpp, exported, name, dtype):
    model, path = exported[name, dtype]
    ids = torch.randint(0, model.config.vocab_size, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = model(torch.tensor([ids])).logits[0].numpy()  # (T, V)
    theirs = llama_cpp_logits(llama_cpp, path, ids)
    assert np.abs(ours).max() > 1.0  # real numbers, not near-zero logits
    difference = np.abs(ours - theirs)
    most, mean = TOLERANCES[dtype]
    assert difference.max() <= most, f"{name} {dtype}: max {difference.max()}"
    assert difference.mean() <= mean, f"{name} {dtype}: mean {difference.mean()}"


def assert_llama_cpp_tokenizes_alike(llama_cpp, path, tokenizer, texts) -> None:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in texts:
            ids = tokenizer.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
            assert llm.detokenize(ids, special=True) == text.encode(), text
    finally:
        llm.close()


def test_llama_cpp_tokenizes_like_heron(llama_cpp, exported, tokenizer):
    chat = f"{SPECIAL_TOKENS['user']}\nHi there{SPECIAL_TOKENS['end']}\n{SPECIAL_TOKENS['assistant']}\n"
    assert_llama_cpp_tokenizes_alike(llama_cpp, exported["base", "f32"][1], tokenizer, HARD_TEXTS + [chat])


@pytest.mark.parametrize("pre", REGEX_BPE)
def test_llama_cpp_splits_like_llama3_and_qwen2_tokenizers(llama_cpp, pre, tmp_path):
    tokenizer = regex_bpe(*REGEX_BPE[pre])
    path = save_gguf(Transformer(CONFIGS["base"]), tokenizer, tmp_path / "model.gguf")
    assert fields(path)["tokenizer.ggml.pre"] == pre
    assert_llama_cpp_tokenizes_alike(llama_cpp, path, tokenizer, HARD_TEXTS)


def test_stacking_experts_names_a_layer_whose_experts_are_incomplete():
    rows = [(f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight", torch.full((2, 3), float(e))) for e in (0, 1)]
    stacked = dict(stacked_experts(iter(rows + [("model.norm.weight", torch.ones(3))]), n_experts=2))
    assert stacked["model.layers.0.block_sparse_moe.experts.w1.weight"][:, 0, 0].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"experts.w1.weight: got experts \[0\] of 2"):
        list(stacked_experts(iter(rows[:1]), n_experts=2))


# ----- GPT-NeoX (llama.cpp's gptneox) --------------------------------------------------------------

NEOX = CONFIGS["base"].replace(norm="layernorm", mlp="gelu_tanh", n_kv_heads=None, rotary_dim=4,
                               parallel_residual=True)


def test_gpt_neox_goes_in_as_llama_cpps_gptneox(tokenizer, tmp_path):
    """Partial rotary and parallel residuals in the metadata; q, k and v in blocks, each head's
    dims in the checkpoint's order (rotated dims first), as convert_hf_to_gguf.py writes them."""
    model = perturbed_model(NEOX)
    path = save_gguf(model, tokenizer, tmp_path / "neox.gguf", dtype="f32")
    reader, meta = gguf.GGUFReader(path), fields(path)
    assert meta["general.architecture"] == "gptneox" and meta["gptneox.rope.dimension_count"] == 4
    assert meta["gptneox.use_parallel_residual"] is True
    assert meta["gptneox.attention.layer_norm_epsilon"] == pytest.approx(1e-5)  # stored as f32
    qkv = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    hd, d = 16, 64
    heron_rows = model.blocks[0].attn.qkv.weight.detach().view(3, 4, hd, d)  # (q k v, head, dim, in)
    checkpoint_dims = [0, 1, 4, 5, 6, 7, 8, 9, 2, 3, 10, 11, 12, 13, 14, 15]  # Heron's dim i holds this one
    expected = torch.empty_like(heron_rows)
    expected[:2, :, checkpoint_dims] = heron_rows[:2]  # q and k back in the checkpoint's order
    expected[2] = heron_rows[2]
    stored = torch.from_numpy(np.array(qkv.data)).reshape(3 * d, d)
    torch.testing.assert_close(stored, expected.reshape(3 * d, d), rtol=0, atol=0)
    interleaved = torch.arange(12).view(4, 3)  # head h's q, k, v rows, head by head
    assert qkv_in_blocks(interleaved.reshape(12, 1), 4).flatten().tolist() == interleaved.T.flatten().tolist()


@pytest.mark.parametrize("mlp", [True, False])
@torch.no_grad()
def test_llama_cpp_runs_gpt_neox_as_heron_does(llama_cpp, tokenizer, tmp_path, mlp):
    """Attention, norms, partial rotary and parallel residuals agree to f32 rounding (without the
    MLP's output); with it, to llama.cpp's GELU, which looks the activation up in a table of f16
    inputs (rounding an input to f16 alone moves tanh-GELU by up to ~4e-3)."""
    model = perturbed_model(NEOX)
    if not mlp:
        for block in model.blocks:
            block.mlp.down.weight.zero_()
    path = save_gguf(model, tokenizer, tmp_path / "neox.gguf", dtype="f32")
    ids = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, theirs = model(torch.tensor([ids])).logits[0].numpy(), llama_cpp_logits(llama_cpp, path, ids)
    assert np.abs(ours).max() > 1.0
    assert np.abs(ours - theirs).max() <= (1e-2 if mlp else 1e-4)


# ----- what each llama.cpp architecture reads ------------------------------------------------------

SLIDING = AttentionPattern(kind="sliding", window=8)
LLAMA3_ROPE = RopeScaling(kind="llama3", factor=4.0, original_max_seq_len=16)


@pytest.mark.parametrize(("name", "attention", "layer"), [
    ("base", (SLIDING,), 0),
    ("moe", (SLIDING,), 0),  # Mixtral's sliding_window
    ("qwen3", (AttentionPattern(), SLIDING), 1),  # Qwen3's layer_types: full, then sliding
    ("qwen3_moe", (SLIDING,), 0),
])
def test_refuses_a_sliding_window_on_every_architecture(tokenizer, tmp_path, name, attention, layer):
    """llama.cpp's llama, qwen3 and qwen3moe read no sliding window: the file would attend to the
    whole context where the model sees 8 tokens back."""
    model = Transformer(CONFIGS[name].replace(attention=attention))
    with pytest.raises(ValueError, match=rf"^attention: layer {layer} is 'sliding'"):
        save_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["moe", "qwen3", "qwen3_moe"])
def test_a_window_as_long_as_the_context_is_dense_attention(tokenizer, tmp_path, name):
    model = perturbed_model(CONFIGS[name].replace(attention=(AttentionPattern(kind="sliding", window=CONTEXT),)))
    path = save_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert sorted(t.name for t in gguf.GGUFReader(path).tensors) == sorted(expected_tensors(model))
    assert not [key for key in fields(path) if "sliding_window" in key]


@pytest.mark.parametrize(("config", "arch"), [
    (CONFIGS["qwen3"], "qwen3"), (CONFIGS["qwen3_moe"], "qwen3moe"), (NEOX, "gptneox"),
])
def test_llama3_rope_scaling_goes_into_the_llama_architecture_only(tokenizer, tmp_path, config, arch):
    """Its divisors travel as rope_freqs.weight, a tensor llama.cpp's qwen3, qwen3moe and gptneox
    do not load; the llama architecture (Mixtral's too) does."""
    with pytest.raises(ValueError, match=f"^rope_scaling: llama.cpp's {arch} architecture reads no rope_freqs"):
        save_gguf(Transformer(config.replace(rope_scaling=LLAMA3_ROPE)), tokenizer, tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []
    model = Transformer(CONFIGS["moe"].replace(rope_scaling=LLAMA3_ROPE))
    tensors = {t.name: t for t in gguf.GGUFReader(save_gguf(model, tokenizer, tmp_path / "moe.gguf")).tensors}
    np.testing.assert_allclose(tensors["rope_freqs.weight"].data, llama3_rope_factors(model.config), rtol=1e-6)


def test_gpt_neox_carries_linear_rope_scaling(tokenizer, tmp_path):
    """llama.cpp reads rope.scaling.* for every architecture and turns positions by 1 / factor."""
    model = Transformer(NEOX.replace(rope_scaling=RopeScaling(kind="linear", factor=4.0)))
    meta = fields(save_gguf(model, tokenizer, tmp_path / "neox.gguf"))
    assert (meta["gptneox.rope.scaling.type"], meta["gptneox.rope.scaling.factor"]) == ("linear", 4.0)


NEOX_TIED = NEOX.replace(tie_embeddings=True, qkv_bias=False, out_bias=False,
                         rope_scaling=RopeScaling(kind="linear", factor=2.0))
NEOX_LAYER = ("attn_norm.weight", "attn_norm.bias", "attn_qkv.weight", "attn_qkv.bias", "attn_output.weight",
              "attn_output.bias", "ffn_norm.weight", "ffn_norm.bias", "ffn_up.weight", "ffn_up.bias",
              "ffn_down.weight", "ffn_down.bias")


def test_gpt_neox_gets_every_tensor_llama_cpp_requires(tokenizer, tmp_path):
    """llama.cpp's gptneox loader requires each of these (none is optional there, unlike llama's):
    a tied head goes in as the embedding itself, and a bias the model lacks as zeros, which add nothing."""
    model = perturbed_model(NEOX_TIED)
    path = save_gguf(model, tokenizer, tmp_path / "neox.gguf", dtype="f32")
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    required = {"token_embd.weight", "output_norm.weight", "output_norm.bias", "output.weight"}
    assert set(tensors) == required | {f"blk.{i}.{name}" for i in range(2) for name in NEOX_LAYER}
    np.testing.assert_array_equal(tensors["output.weight"], model.embed.weight.detach().numpy())
    for i in range(2):
        np.testing.assert_array_equal(tensors[f"blk.{i}.attn_qkv.bias"], np.zeros(3 * 64, np.float32))
        np.testing.assert_array_equal(tensors[f"blk.{i}.attn_output.bias"], np.zeros(64, np.float32))


@torch.no_grad()
def test_llama_cpp_runs_a_tied_bias_free_scaled_gpt_neox_as_heron_does(llama_cpp, tokenizer, tmp_path):
    model = perturbed_model(NEOX_TIED)
    for block in model.blocks:  # llama.cpp's GELU rounds its inputs to f16: compare without it
        block.mlp.down.weight.zero_()
    path = save_gguf(model, tokenizer, tmp_path / "neox.gguf", dtype="f32")
    ids = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, theirs = model(torch.tensor([ids])).logits[0].numpy(), llama_cpp_logits(llama_cpp, path, ids)
    assert np.abs(ours).max() > 1.0
    assert np.abs(ours - theirs).max() <= 1e-4


def test_qwen2_biases_go_in_as_llamas_own_tensors(exported):
    """q, k and v biases without an o bias: Hugging Face's LlamaConfig has one attention_bias for all
    four, llama.cpp's llama a tensor each, read where present (test_tensors_hold_the_heron_weights
    holds their values)."""
    _, path = exported["qwen2", "f32"]
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert fields(path)["general.architecture"] == "llama"
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    assert "blk.0.attn_output.bias" not in names


def test_a_normalized_added_token_goes_in_when_there_is_no_normalizer(llama_cpp, tokenizer, tmp_path):
    """Byte-level BPE has no normalizer: Hugging Face matches a normalized added token in the raw text,
    as llama.cpp does (a SentencePiece one is refused: test_gguf_sentencepiece.py)."""
    backend = Tokenizer.from_str(tokenizer.backend.to_str())
    backend.add_tokens([AddedToken("<tool>", normalized=True), AddedToken(" hello world", normalized=True)])
    plain = PretrainedTokenizer(backend, {"bos_token": SPECIAL_TOKENS["bos"], "eos_token": SPECIAL_TOKENS["eos"]})
    path = save_gguf(Transformer(CONFIGS["base"].replace(vocab_size=VOCAB + 2)), plain, tmp_path / "model.gguf")
    assert_llama_cpp_tokenizes_alike(llama_cpp, path, plain, ["call <tool> now", "say hello world ok", "a<tool>b"])
