"""A quantised Heron model to GGUF (compress/gguf_export.py): its codes carried over.

Known answers: every block of the file, dequantised by gguf-py, equals the
Heron model's own dequantised weight in llama.cpp's layout: exactly for
symmetric int4 in Q4_0, and for int8 in Q8_0 and int4 in Q4_1 up to the f16
rounding of the one stored value that Heron keeps wider (the row scale; the
minimum -s * z), far below the half step a second rounding would cost. With
llama.cpp installed, its logits match the Heron quantised model's.
"""
import gguf
import numpy as np
import pytest
import torch
from gguf_layout import CONFIGS, CONTEXT, expected_tensors, fields, llama_cpp_logits, make_tokenizer, perturbed_model

from heron.cli.main import main
from heron.compress.gguf_export import ggml_blocks, ggml_type, save_quantized_gguf
from heron.compress.quant_moe import QuantMoE
from heron.compress.quantize import quantize_model
from heron.compress.checkpoint import save_quantized
from heron.compress.schemes import get_scheme, quantize_rtn
from heron.core import Transformer, attach_hooks

Q = gguf.GGMLQuantizationType
# name -> (quantize_model arguments, the ggml type of the block linears, general.file_type)
VARIANTS = {
    "int8": (dict(scheme="int8"), Q.Q8_0, 7),
    "int4-symmetric": (dict(scheme="int4", group_size=32, symmetric=True), Q.Q4_0, 2),
    "int4": (dict(scheme="int4", group_size=32), Q.Q4_1, 3),
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def quantized(config_name: str, **options) -> Transformer:
    return quantize_model(perturbed_model(CONFIGS[config_name]), progress=False, **options)


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory) -> dict[str, tuple[Transformer, object]]:
    folder = tmp_path_factory.mktemp("gguf-quantized")
    out = {}
    for name, (options, _, _) in VARIANTS.items():
        model = quantized("base", **options)
        out[name] = model, save_quantized_gguf(model, tokenizer, folder / f"{name}.gguf")
    return out


def dequantized_copy(model: Transformer) -> Transformer:
    """A float model holding the quantised model's effective weights."""
    plain = Transformer(model.config).eval()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            module_name, _, kind = name.rpartition(".")
            module = model.get_submodule(module_name)
            if isinstance(module, QuantMoE) and kind in ("up", "down"):
                p.copy_(module.dequantized()[kind == "down"])
            else:
                p.copy_(getattr(module, kind))
    return plain


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_blocks_hold_the_quantised_weights_without_a_second_rounding(exported, variant):
    model, path = exported[variant]
    _, linear_type, file_type = VARIANTS[variant]
    want = expected_tensors(dequantized_copy(model))
    tensors = gguf.GGUFReader(path).tensors
    assert sorted(t.name for t in tensors) == sorted(want)
    assert fields(path)["general.file_type"] == file_type
    for t in tensors:
        expected = want[t.name].float().numpy()
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        if expected.ndim == 1:
            assert t.tensor_type == Q.F32, t.name
            np.testing.assert_array_equal(got, expected, err_msg=t.name)
            continue
        embedding_or_head = t.name in ("token_embd.weight", "output.weight")
        assert t.tensor_type == (Q.Q8_0 if embedding_or_head else linear_type), t.name  # embeddings int8
        if t.tensor_type == Q.Q4_0:
            np.testing.assert_array_equal(got, expected, err_msg=t.name)
        else:  # one f16 rounding (relative 2^-11) of a value no larger than the row's largest weight
            bound = 2**-11 * np.abs(expected).max(axis=1, keepdims=True) + 1e-7
            assert (np.abs(got - expected) <= bound).all(), t.name


def test_q4_0_codes_are_the_heron_codes(exported):
    """The packed bytes themselves: byte j of a block holds codes j (low nibble) and j + 16."""
    model, path = exported["int4-symmetric"]
    codes, params = model.blocks[0].attn.out.unpacked()  # (64, 64), no RoPE reordering
    block = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_output.weight")
    raw = np.asarray(block.data).reshape(64, 2, 18)  # (rows, blocks, d + 16 bytes)
    assert np.array_equal(raw[:, :, :2].copy().view(np.float16)[..., 0], params.scale.half().numpy()[:, :2])
    nibbles = np.concatenate([raw[:, :, 2:] & 0x0F, raw[:, :, 2:] >> 4], axis=2).reshape(64, 64)
    assert np.array_equal(nibbles, codes.numpy())


@pytest.mark.parametrize("symmetric", [False, True])
def test_groups_wider_than_a_block_give_every_block_its_groups_parameters(symmetric):
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    scheme = get_scheme("int4", 128, symmetric)
    codes, params = quantize_rtn(w, scheme)
    qtype = ggml_type(scheme, 256)
    got = gguf.quants.dequantize(ggml_blocks(codes, params, qtype).numpy(), qtype)
    want = scheme.dequantize(codes, params).numpy()
    assert (np.abs(got - want) <= (0 if symmetric else 2**-11 * np.abs(want).max())).all()


def test_a_tied_head_is_read_from_token_embd(tokenizer, tmp_path):
    model = quantized("tied_linear", scheme="int4", group_size=32, symmetric=True)
    path = save_quantized_gguf(model, tokenizer, tmp_path / "tied.gguf")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in types and types["token_embd.weight"] == Q.Q8_0


def test_a_tied_gpt_neox_head_is_written_as_the_embeddings_own_blocks(tokenizer, tmp_path):
    """llama.cpp's gptneox, unlike its llama, requires output.weight: the tied head goes in as
    the int8 embedding's Q8_0 blocks, byte for byte."""
    neox = CONFIGS["base"].replace(norm="layernorm", mlp="gelu_tanh", n_kv_heads=None, tie_embeddings=True)
    model = quantize_model(perturbed_model(neox), progress=False, scheme="int8")
    path = save_quantized_gguf(model, tokenizer, tmp_path / "neox.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    head, embedding = tensors["output.weight"], tensors["token_embd.weight"]
    assert head.tensor_type == embedding.tensor_type == Q.Q8_0
    np.testing.assert_array_equal(np.asarray(head.data), np.asarray(embedding.data))


def test_blocks_that_cross_groups_fall_back_to_dequantised_floats(tokenizer, tmp_path):
    model = quantized("base", scheme="int4", group_size=16)  # 32-value blocks would span two groups
    path = save_quantized_gguf(model, tokenizer, tmp_path / "g16.gguf", dtype="f32")
    want = expected_tensors(dequantized_copy(model))
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name:
            assert t.tensor_type == Q.F32, t.name
            np.testing.assert_array_equal(np.asarray(t.data).reshape(want[t.name].shape), want[t.name].numpy())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantised_experts_go_in_as_their_own_blocks_stacked(tokenizer, tmp_path, variant):
    options, expert_type, _ = VARIANTS[variant]
    model = quantized("moe", **options)
    path = save_quantized_gguf(model, tokenizer, tmp_path / "moe.gguf")
    want = expected_tensors(dequantized_copy(model))
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert sorted(tensors) == sorted(want)
    for layer in range(2):
        for linear in ("gate", "up", "down"):
            t = tensors[f"blk.{layer}.ffn_{linear}_exps.weight"]
            expected = want[t.name].numpy()  # (E, out, in)
            assert t.tensor_type == expert_type, t.name
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
            bound = 0 if expert_type == Q.Q4_0 else 2**-11 * np.abs(expected).max(axis=2, keepdims=True) + 1e-7
            assert (np.abs(got - expected) <= bound).all(), t.name  # the codes, at most the scale re-rounded


def test_experts_whose_codes_fit_no_block_go_in_dequantised(tokenizer, tmp_path):
    model = quantized("moe", scheme="int4", group_size=16)
    path = save_quantized_gguf(model, tokenizer, tmp_path / "moe.gguf", dtype="f32")
    want = expected_tensors(dequantized_copy(model))
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_down_exps.weight")
    assert t.tensor_type == Q.F32
    np.testing.assert_array_equal(np.asarray(t.data).reshape(want[t.name].shape), want[t.name].numpy())


def test_awq_input_scales_are_refused_naming_the_layer(tokenizer, tmp_path):
    calibration = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    model = quantized("base", scheme="int4", group_size=32, method="awq", calibration=calibration)
    with pytest.raises(ValueError, match=r"^blocks\.0\.attn\.qkv: AWQ's per-input-channel scale"):
        save_quantized_gguf(model, tokenizer, tmp_path / "awq.gguf")
    assert list(tmp_path.iterdir()) == []


# config, quantize_model arguments, one weight (an expert's is (expert, in, out)), its value -> the layer
# refused and what overflows:
# int8's row scale 1e7 / 127 = 78740.2 as Q8_0's d; int4's minimum -s * z (z = 15, s = 6668 in fp16) as Q4_1's m.
SCALE_OVERFLOWS = {
    "int8": ("base", dict(scheme="int8"), ("blocks.0.mlp.down.weight", (0, 0)), 1e7,
             r"blocks\.0\.mlp\.down: as q8_0, a block's f16 scale would be 78740\.2, "),
    "int4": ("base", dict(scheme="int4", group_size=32), ("blocks.0.mlp.down.weight", (0, 0)), -1e5,
             r"blocks\.0\.mlp\.down: as q4_1, a block's f16 minimum would be -100020, "),
    "int8-expert": ("moe", dict(scheme="int8"), ("blocks.1.mlp.down", (2, 0, 0)), 1e7,
                    r"blocks\.1\.mlp\.experts_down\.2: as q8_0, a block's f16 scale would be 78740\.2, "),
}


@pytest.mark.parametrize("case", list(SCALE_OVERFLOWS))
def test_a_block_scale_past_fp16s_range_is_refused_naming_the_layer(tokenizer, tmp_path, case):
    """A scale or minimum past fp16's 65504 would be inf in the file (and llama.cpp's logits NaN):
    refused as save_gguf refuses a float weight, in the same words."""
    config, options, (weight, index), value, refusal = SCALE_OVERFLOWS[case]
    model = perturbed_model(CONFIGS[config])
    with torch.no_grad():
        model.get_parameter(weight)[index] = value
    quantize_model(model, progress=False, **options)
    with pytest.raises(ValueError, match=f"^{refusal}beyond f16's range \\(±65504\\), so the file would hold inf "
                                         "and llama.cpp would compute NaN logits; .* as f32 \\(--type f32\\)$"):
        save_quantized_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


def test_convert_to_gguf_writes_a_quantised_checkpoints_own_codes(tokenizer, tmp_path, capsys):
    model = quantized("base", scheme="int4", group_size=32, symmetric=True)
    save_quantized(tmp_path / "ckpt", model, tokenizer=tokenizer)
    assert main(["convert", "to-gguf", str(tmp_path / "ckpt"), str(tmp_path / "out.gguf")]) == 0
    assert "quantised layers' own codes" in capsys.readouterr().out
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "out.gguf").tensors}
    assert types["blk.1.ffn_down.weight"] == Q.Q4_0


# llama.cpp multiplies Q4_0, Q4_1 and Q8_0 weights by activations it rounds to Q8_0 blocks, so its logits
# differ from Heron's weight-only product by about what Q8_0 files show in test_gguf.py; the weights
# themselves are the same numbers (above).
@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_llama_cpp_logits_match_the_quantised_model(exported, variant):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, path = exported[variant]
    ids = torch.randint(0, model.config.vocab_size, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = model(torch.tensor([ids])).logits[0].numpy()  # (T, V)
    theirs = llama_cpp_logits(llama_cpp, path, ids, CONTEXT)
    difference = np.abs(ours - theirs)
    assert difference.max() <= 0.6, f"{variant}: max {difference.max()}"  # measured 0.28-0.33
    assert difference.mean() <= 0.05, f"{variant}: mean {difference.mean()}"  # measured 0.025-0.026


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_llama_cpp_logits_match_the_quantised_moe_where_routing_is_clear(tokenizer, tmp_path, variant):
    """llama.cpp rounds activations to 8 bits, which can swap a token's second and third
    expert where the router nearly ties them (measured, int8: the two positions off by more
    than 0.5 of 48 had gaps of 0.0009 and 0.006 in probability). Positions whose gap is at
    least 0.01 in every layer (measured 85-88% of them) must match as dense layers do (max
    0.18-0.29 measured)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = quantized("moe", **VARIANTS[variant][0])
    path = save_quantized_gguf(model, tokenizer, tmp_path / "moe.gguf")
    ids = torch.randint(0, model.config.vocab_size, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    probs = []
    hooks = {f"blocks.{i}.mlp.hook_router_probs": lambda t, name: probs.append(t[0]) for i in range(2)}
    with attach_hooks(model, hooks):
        ours = model(torch.tensor([ids])).logits[0].numpy()  # (T, V)
    ranked = torch.stack(probs).sort(dim=-1, descending=True).values  # (layers, T, E)
    clear = ((ranked[..., 1] - ranked[..., 2]).min(dim=0).values >= 0.01).numpy()  # (T,) second expert not a tie
    assert clear.mean() >= 0.8
    difference = np.abs(ours - llama_cpp_logits(llama_cpp, path, ids, CONTEXT)).max(axis=1)  # (T,)
    assert difference[clear].max() <= 0.6, f"{variant}: max {difference[clear].max()}"
