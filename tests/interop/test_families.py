"""Every supported family, imported from a folder `transformers` wrote.

For each family a tiny randomly initialised `transformers` model is saved
with `save_pretrained` and converted by the production importer. Known
answers: logits equal `transformers`' (max abs difference <= 1e-4 in fp32)
at several lengths, longer than the sliding window where there is one;
greedy generation of 32 tokens through Heron's KV-cached engine gives the
same tokens as `generate`; Heron -> Hugging Face -> Heron is exact.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from heron.core import ModelConfig, Transformer  # noqa: E402
from heron.generate import Generator, SamplingParams  # noqa: E402
from heron.interop import load_hf_model, save_hf_folder  # noqa: E402
from heron.interop.families import FAMILIES as FAMILIES_OF_HERON  # noqa: E402
from heron.interop.families import GPT_NEOX, STABLELM, hf_config, partial_rotary_factor  # noqa: E402

VOCAB = 97
WINDOW = 8  # Mistral's, Qwen2's and GPT-Neo's local window: the test lengths go past it
LENGTHS = (5, 19, 40)
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(
        **_LLAMA_LIKE, rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 16}),
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=WINDOW),
    # Layer 0 full, layer 1 sliding.
    "qwen2": lambda: transformers.Qwen2Config(**{**_LLAMA_LIKE, "tie_word_embeddings": True}, use_sliding_window=True,
                                              sliding_window=WINDOW, max_window_layers=1),
    # Heads wider than d_model / n_heads, and q and k normalised per head.
    "qwen3": lambda: transformers.Qwen3Config(**{**_LLAMA_LIKE, "head_dim": 32, "attention_bias": True}),
    # Experts on layer 1, a dense MLP on layer 0.
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, norm_topk_prob=True,
                                                     mlp_only_layers=[0]),
    "phi3": lambda: transformers.Phi3Config(**_LLAMA_LIKE, sliding_window=WINDOW, pad_token_id=0),
    "mixtral": lambda: transformers.MixtralConfig(**_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "gpt_neo": lambda: transformers.GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=128,
        attention_types=[[["global", "local"], 1]], window_size=WINDOW),
    # Parallel residuals, RoPE on a quarter of each 16-wide head, q/k/v fused head by head.
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                      "partial_rotary_factor": 0.25}),
    # LLaMA's layout with LayerNorms, q/k/v biases and RoPE on a quarter of each head.
    "stablelm": lambda: transformers.StableLmConfig(
        **_LLAMA_LIKE, use_qkv_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                           "partial_rotary_factor": 0.25}),
}


def random_hf_model(config) -> "transformers.PreTrainedModel":
    """Weights far from init (norm gains around 1, biases non-zero), so every
    parameter moves the logits visibly."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tmp_path_factory) -> tuple[str, "transformers.PreTrainedModel", object, Path]:
    hf = random_hf_model(FAMILIES[request.param]())
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, load_hf_model(folder), folder


@torch.no_grad()
def test_logits_match_transformers(imported):
    name, hf, model, _ = imported
    for length in LENGTHS:
        ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
        ours, theirs = model(ids).logits, hf(ids).logits
        assert theirs.abs().max() > 1.0  # real numbers, not near-zero logits
        difference = (ours - theirs).abs().max().item()
        assert difference <= 1e-4, f"{name} at length {length}: {difference}"


@torch.no_grad()
def test_greedy_generation_matches_transformers(imported):
    name, hf, model, _ = imported
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None,
                         min_new_tokens=32)[0, prompt.shape[1]:].tolist()
    ours = Generator(model).generate_ids([prompt[0].tolist()],
                                         SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True))[0]
    assert len(set(ours)) > 1  # not a degenerate repeat of one token
    assert ours == theirs, name


def test_round_trip_is_exact(imported, tmp_path):
    name, _, model, _ = imported
    assert save_hf_folder(model, tmp_path / "out", family=name).name == name
    back = load_hf_model(tmp_path / "out")
    assert back.config == model.config
    torch.testing.assert_close(back.state_dict(), model.state_dict(), rtol=0, atol=0)  # keys and bits


@torch.no_grad()
def test_a_bf16_import_is_the_fp32_import_cast(imported):
    """load_hf_model(dtype=bf16) runs in bf16 (RoPE tables too) with the numbers of `.to(bf16)`."""
    name, _, _, folder = imported
    half = load_hf_model(folder, dtype=torch.bfloat16)
    cast = load_hf_model(folder).to(torch.bfloat16)  # not the fixture's: a decode may have laid its weights out anew
    torch.testing.assert_close(half.state_dict(), cast.state_dict(), rtol=0, atol=0)  # keys and bits
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))  # 80 rows: MoE's dispatch
    logits = half(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, cast(ids).logits), name
    assert {b.dtype for b in half.buffers() if b.is_floating_point()} <= {torch.bfloat16}, name


@torch.no_grad()
def test_export_loads_in_transformers_with_the_same_logits(imported, tmp_path):
    name, _, model, _ = imported
    save_hf_folder(model, tmp_path / "out", family=name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_gpt_neox_reads_pythia_style_keys_and_skips_its_buffers(tmp_path):
    """Pythia's config.json says `rotary_pct` and `rotary_emb_base`, and its checkpoints
    carry mask and RoPE-frequency buffers beside the weights."""
    from safetensors.torch import load_file, save_file

    hf = random_hf_model(FAMILIES["gpt_neox"]())
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rotary_pct=0.25, rotary_emb_base=500.0, use_parallel_residual=True)
    del config["attention_bias"]  # Pythia's configs leave it out: transformers' default, biases on
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    tensors["gpt_neox.layers.1.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load_hf_model(tmp_path)
    assert (model.config.rotary_dim, model.config.rope_theta, model.config.parallel_residual) == (4, 500.0, True)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4


def test_every_default_heron_assumes_is_transformers_own():
    for family in FAMILIES_OF_HERON:
        defaults = transformers.AutoConfig.for_model(family.model_type).to_dict()
        for key, value in family.hf_defaults:
            theirs = defaults[key] if key in defaults else defaults["rope_parameters"][key]
            ours = json.loads(json.dumps(value))  # as config.json holds it: GPT-Neo's tuples are lists there
            assert theirs == ours, f"{family.name}.{key}: transformers {theirs!r}, Heron {value!r}"


def logits_match_on(folder: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model = load_hf_model(folder)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert difference <= 1e-4, f"{folder.name}: {difference}"


def rewrite_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_keys_left_to_their_defaults_read_as_transformers_reads_them(imported, tmp_path):
    """Hub configs often leave out keys at their defaults (tie_word_embeddings, rms_norm_eps, ...):
    the model must be the one transformers builds from the same short config."""
    name, _, _, folder = imported
    family = next(f for f in FAMILIES_OF_HERON if f.name == name)
    shutil.copytree(folder, tmp_path / name)
    rewrite_config(tmp_path / name, lambda config: [config.pop(key) for key, value in family.hf_defaults
                                                    if config.get(key) == value])
    logits_match_on(tmp_path / name)


@pytest.mark.parametrize("name, change", [
    # StableLM 2 and transformers 4: partial_rotary_factor and rope_theta beside the other keys.
    ("stablelm", lambda c: c.update(partial_rotary_factor=0.25, rope_theta=500.0, rope_parameters=None)),
    # Qwen2 before layer_types: the layers from max_window_layers on slide.
    ("qwen2", lambda c: c.pop("layer_types")),
    # GPT-NeoX in transformers 4 (Pythia's keys) with linear RoPE scaling beside rotary_emb_base.
    ("gpt_neox", lambda c: c.update(rope_parameters=None, rotary_pct=0.25, rotary_emb_base=500.0,
                                    rope_scaling={"type": "linear", "factor": 4.0})),
])
def test_older_spellings_read_as_transformers_reads_them(name, change, tmp_path):
    hf = random_hf_model(FAMILIES[name]())
    hf.save_pretrained(tmp_path)
    rewrite_config(tmp_path, change)
    logits_match_on(tmp_path)


def test_a_partial_rotary_factor_phi3_cannot_run_is_refused_by_name(tmp_path):
    random_hf_model(FAMILIES["phi3"]()).save_pretrained(tmp_path)
    rewrite_config(tmp_path, lambda c: c.update(partial_rotary_factor=0.5, rope_theta=10000.0, rope_parameters=None))
    with pytest.raises(ValueError, match="partial_rotary_factor: not supported"):
        load_hf_model(tmp_path)


@torch.no_grad()
def test_qwen3_moe_slides_on_every_layer_as_transformers_does(tmp_path):
    """transformers' Qwen3MoeModel applies `sliding_window` to every layer and ignores
    `max_window_layers`; a Heron model with dense and sliding layers has no such folder."""
    config = transformers.Qwen3MoeConfig(**_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=True, use_sliding_window=True, sliding_window=WINDOW,
                                         max_window_layers=1)
    hf = random_hf_model(config)
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf_model(tmp_path / "hf")
    assert {model.config.attention_pattern(i).kind for i in range(2)} == {"sliding"}
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4
    mixed = model.config.replace(attention=({"kind": "dense"}, {"kind": "sliding", "window": WINDOW}))
    with pytest.raises(ValueError, match="attention: layer 0 is 'dense'; this family has either dense attention on "
                                         "every layer or one sliding window on every layer"):
        save_hf_folder(type(model)(mixed), tmp_path / "out", family="qwen3_moe")


# ----- Heron models exported: what transformers builds from the folder -------------------------------------


def random_heron_model(config: ModelConfig) -> Transformer:
    """As random_hf_model: norm gains around 1, every other weight far from init."""
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name and name.endswith("weight") else p.normal_(0.0, 0.15)
    return model


@torch.no_grad()
def exports_with_the_same_logits_and_comes_back_exact(model: Transformer, folder: Path) -> str:
    """The family save_hf_folder picked, once transformers' logits equal Heron's and
    Heron -> Hugging Face -> Heron is exact."""
    family = save_hf_folder(model, folder).name
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    difference = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert difference <= 1e-4, f"{family}: {difference}"
    back = load_hf_model(folder)
    assert back.config == model.config
    torch.testing.assert_close(back.state_dict(), model.state_dict(), rtol=0, atol=0)
    return family


PARTIAL_ROTARY = {  # Heron configs GPT-NeoX and StableLM express, but for d_model, n_heads and rotary_dim
    "gpt_neox": dict(norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, parallel_residual=True),
    "stablelm": dict(norm="layernorm"),
}


def partial_rotary_model(family: str, head_dim: int, rotary_dim: int) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=2 * head_dim, n_layers=2, n_heads=2, max_seq_len=64,
                       rotary_dim=rotary_dim, **PARTIAL_ROTARY[family])


def test_the_written_partial_rotary_factor_rotates_rotary_dim_for_every_head():
    """transformers rotates int(head_dim * partial_rotary_factor) dims; rotary_dim / head_dim
    lands below a whole number for 4,560 pairs up to 1024-wide heads (44 * (30 / 44) = 29.999...)."""
    missed = 0
    for head_dim in range(2, 1025, 2):
        for rotary_dim in range(2, head_dim + 1, 2):
            factor = partial_rotary_factor(rotary_dim, head_dim)
            assert int(head_dim * factor) == rotary_dim and 0 < factor <= 1, (head_dim, rotary_dim, factor)
            missed += int(head_dim * (rotary_dim / head_dim)) != rotary_dim
    assert missed == 4560  # the pairs the plain quotient gets wrong, each checked above


@pytest.mark.parametrize("family", [GPT_NEOX, STABLELM], ids=["gpt_neox", "stablelm"])
@pytest.mark.parametrize("head_dim, rotary_dim", [(44, 30), (46, 26), (98, 2), (64, 16), (44, 44)])
def test_transformers_rotates_the_dims_heron_does(family, head_dim, rotary_dim):
    """transformers' own attention and RoPE tables, built from the config.json Heron writes."""
    written = json.loads(json.dumps(hf_config(family, partial_rotary_model(family.name, head_dim, rotary_dim))))
    config = transformers.AutoConfig.for_model(**written)
    modeling = transformers.models.gpt_neox.modeling_gpt_neox if family is GPT_NEOX else \
        transformers.models.stablelm.modeling_stablelm
    attention, rope = (modeling.GPTNeoXAttention, modeling.GPTNeoXRotaryEmbedding) if family is GPT_NEOX else \
        (modeling.StableLmAttention, modeling.StableLmRotaryEmbedding)
    assert attention(config, layer_idx=0).rotary_ndims == rotary_dim
    assert 2 * rope(config).inv_freq.numel() == rotary_dim


@pytest.mark.parametrize("family", list(PARTIAL_ROTARY))
def test_a_44_wide_head_rotating_30_dims_exports_with_the_same_logits(family, tmp_path):
    model = random_heron_model(partial_rotary_model(family, 44, 30))
    assert exports_with_the_same_logits_and_comes_back_exact(model, tmp_path / "hf") == family


@pytest.mark.parametrize("changes, family", [
    ({}, "mistral"),
    ({"qkv_bias": True}, "qwen2"),
    ({"qk_norm": True}, "qwen3"),
])
def test_heads_that_do_not_divide_d_model_export_as_a_family_transformers_loads(changes, family, tmp_path):
    """Three 16-wide heads on d_model 64: LlamaConfig refuses a hidden_size that is not a
    multiple of num_attention_heads; Mistral's and Qwen's configs take the head_dim as given."""
    config = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=16,
                         max_seq_len=64, **changes)
    model = random_heron_model(config)
    assert exports_with_the_same_logits_and_comes_back_exact(model, tmp_path / "hf") == family
    with pytest.raises(ValueError, match="n_heads: LLaMA needs d_model a multiple of n_heads, got d_model=64, "
                                         "n_heads=3"):
        save_hf_folder(model, tmp_path / "llama", family="llama")


# ----- config.json keys read as transformers reads them, where a key is left out or set ---------------------


def saved_with(config, folder: Path, change=lambda c: None) -> Path:
    """`folder` holding a random transformers model of `config`, its config.json then changed."""
    random_hf_model(config).save_pretrained(folder)
    rewrite_config(folder, change)
    return folder


def test_qwen3_moe_without_norm_topk_prob_is_refused_as_transformers_reads_false(tmp_path):
    """Qwen3MoeConfig's norm_topk_prob defaults to False (the top-k softmax weights left as they
    are), which Heron's router does not run: refused by name, not read as True."""
    folder = saved_with(FAMILIES["qwen3_moe"](), tmp_path, lambda c: c.pop("norm_topk_prob"))
    assert transformers.AutoConfig.from_pretrained(folder).norm_topk_prob is False
    with pytest.raises(ValueError, match=r"norm_topk_prob: Heron implements True only, got False \(config.json "
                                         r"leaves norm_topk_prob out: that is transformers' default for qwen3_moe\)"):
        load_hf_model(folder)


def mixtral_sliding() -> "transformers.MixtralConfig":
    return transformers.MixtralConfig(**_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=WINDOW)


@pytest.mark.parametrize("config, change", [
    # Qwen's switches mean nothing to these families: sliding_window alone slides every layer.
    (FAMILIES["mistral"], lambda c: c.update(use_sliding_window=False)),
    (FAMILIES["mistral"], lambda c: c.update(max_window_layers=1)),
    (FAMILIES["phi3"], lambda c: c.update(use_sliding_window=False)),
    (FAMILIES["phi3"], lambda c: c.update(max_window_layers=1)),
    (FAMILIES["phi3"], lambda c: c.update(layer_types=["full_attention", "sliding_attention"])),
    (mixtral_sliding, lambda c: c.update(use_sliding_window=False)),
    (mixtral_sliding, lambda c: c.update(max_window_layers=1, layer_types=["full_attention", "sliding_attention"])),
    # transformers reads a mistral config.json with layer_types as Ministral's: layer 0 full, layer 1 sliding.
    (FAMILIES["mistral"], lambda c: c.update(layer_types=["full_attention", "sliding_attention"])),
    # Qwen2 with use_sliding_window false: no layer slides, whatever sliding_window says.
    (FAMILIES["qwen2"], lambda c: (c.pop("layer_types"), c.update(use_sliding_window=False))),
], ids=["mistral-use_sliding_window", "mistral-max_window_layers", "phi3-use_sliding_window",
        "phi3-max_window_layers", "phi3-layer_types", "mixtral-use_sliding_window", "mixtral-qwen_keys",
        "mistral-layer_types", "qwen2-switched_off"])
def test_sliding_window_keys_read_as_transformers_reads_them(config, change, tmp_path):
    logits_match_on(saved_with(config(), tmp_path / "hf", change))  # 19 tokens: past the window of 8


_LINEAR = {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("change", [
    # Both spellings: transformers takes rope_scaling (`rope_scaling or rope_parameters`), rope_theta beside it.
    lambda c: c.update(rope_scaling=_LINEAR, rope_theta=300.0),
    lambda c: c.update(rope_scaling=_LINEAR),  # rope_parameters' theta of 500 goes with it: 10000.0
    # The oldest key `type`, beside rope_type or alone, in either dict.
    lambda c: c.update(rope_scaling={**_LINEAR, "type": "linear"}, rope_parameters=None, rope_theta=300.0),
    lambda c: c.update(rope_parameters={**_LINEAR, "type": "linear", "rope_theta": 300.0}),
    lambda c: c.update(rope_parameters={"type": "linear", "factor": 2.0, "rope_theta": 300.0}),
    # rope_parameters without rope_theta: the top-level key, else 10000.0.
    lambda c: c.update(rope_parameters=_LINEAR, rope_theta=300.0),
    lambda c: c.update(rope_parameters=_LINEAR),
], ids=["both", "both-no-theta", "type-and-rope_type-in-rope_scaling", "type-and-rope_type-in-rope_parameters",
        "type-in-rope_parameters", "top-level-theta", "default-theta"])
def test_rope_keys_read_as_transformers_reads_them(change, tmp_path):
    logits_match_on(saved_with(FAMILIES["llama"](), tmp_path / "hf", change))


def test_rope_type_and_type_that_differ_are_refused_naming_both(tmp_path):
    """transformers reads rope_type (plain RoPE here); the older `type` says linear: ambiguous."""
    folder = saved_with(FAMILIES["llama"](), tmp_path, lambda c: c.update(
        rope_scaling={"type": "linear", "rope_type": "default", "factor": 2.0}, rope_theta=300.0))
    with pytest.raises(ValueError, match="rope_scaling.type: 'linear' differs from rope_scaling.rope_type 'default'"):
        load_hf_model(folder)


def _without_original_max(config: dict) -> None:
    del config["rope_parameters"]["original_max_position_embeddings"]


@pytest.mark.parametrize("change", [
    _without_original_max,  # max_position_embeddings (128) stands in, not the fixture's 16
    lambda c: c.update(original_max_position_embeddings=32),  # a top-level key wins over rope_parameters' 16
    lambda c: (_without_original_max(c), c.update(original_max_position_embeddings=32)),
], ids=["absent", "top-level-beside", "top-level-only"])
def test_llama3_original_max_position_embeddings_reads_as_transformers_reads_it(change, tmp_path):
    logits_match_on(saved_with(FAMILIES["llama"](), tmp_path / "hf", change))


def test_qwen3_without_head_dim_has_transformers_default_of_128(tmp_path):
    """Qwen3Config's head_dim defaults to 128, not hidden_size // num_attention_heads (16 here)."""
    config = transformers.Qwen3Config(**_LLAMA_LIKE)
    folder = saved_with(config, tmp_path, lambda c: c.pop("head_dim"))
    assert load_hf_model(folder).config.head_dim == 128
    logits_match_on(folder)


def gpt_neo(num_layers: int, **attention_types) -> "transformers.GPTNeoConfig":
    """GPT-Neo; without attention_types, transformers' default: global and local in turn, 24 layers."""
    return transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=num_layers, num_heads=4,
                                     max_position_embeddings=128, window_size=WINDOW, **attention_types)


def _without_attention_types(config: dict) -> None:
    config.pop("attention_types")
    config.pop("attention_layers", None)


def test_gpt_neo_without_attention_types_has_transformers_default(tmp_path):
    folder = saved_with(gpt_neo(24), tmp_path, _without_attention_types)
    kinds = [load_hf_model(folder).config.attention_pattern(i).kind for i in range(24)]
    assert kinds == ["dense", "sliding"] * 12
    logits_match_on(folder)


def test_gpt_neo_without_attention_types_and_other_than_24_layers_is_refused_by_name(tmp_path):
    """transformers' default describes 24 layers; GPTNeoConfig refuses it for 2 as well."""
    folder = saved_with(gpt_neo(2, attention_types=[[["global", "local"], 1]]), tmp_path, _without_attention_types)
    with pytest.raises(ValueError, match=r"attention_types: describes 24 layers, num_layers is 2; give one kind per "
                                         r"layer \(config.json leaves attention_types out: that is transformers' "
                                         r"default for gpt_neo\)"):
        load_hf_model(folder)


# ----- Phi-3's rope types, as transformers' Phi3Config takes them -------------------------------------------

_LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 16}


@pytest.mark.parametrize("change, complaint", [
    (lambda c: c.update(rope_parameters={**_LINEAR, "rope_theta": 500.0}), "rope_parameters.rope_type: 'linear'"),
    (lambda c: c.update(rope_parameters={**_LLAMA3, "rope_theta": 500.0}), "rope_parameters.rope_type: 'llama3'"),
    (lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.type: 'linear'"),
], ids=["linear", "llama3", "legacy-type"])
def test_phi3_rope_types_transformers_refuses_are_refused_by_name(change, complaint, tmp_path):
    """Phi3Config.validate_rope takes default and longrope only: such a folder loads in no Phi-3 model."""
    folder = saved_with(FAMILIES["phi3"](), tmp_path, change)
    with pytest.raises(Exception, match="type field must be one of"):
        transformers.AutoConfig.from_pretrained(folder)
    with pytest.raises(ValueError, match=f"config.json: {complaint} is not a Phi-3 rope type"):
        load_hf_model(folder)


def test_a_heron_model_with_rope_scaling_is_not_written_as_phi3(tmp_path):
    config = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
                         rope_scaling={"kind": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_scaling: Phi-3 .transformers' Phi3Config. has no 'linear' rope scaling"):
        save_hf_folder(Transformer(config), tmp_path / "out", family="phi3")
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


# ----- GPT-NeoX's and StableLM's top-level RoPE keys, each read only by the config class that reads it ------

@pytest.mark.parametrize("name, change", [
    # GPTNeoXConfig fills rope_parameters from rotary_emb_base and rotary_pct alone.
    ("gpt_neox", lambda c: c.update(rope_parameters=None, rope_theta=500.0)),  # 10000.0, as no rotary_emb_base
    ("gpt_neox", lambda c: c.update(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.25},
                                    rope_theta=500.0)),
    ("gpt_neox", lambda c: c.update(rope_parameters=None, rotary_emb_base=500.0, partial_rotary_factor=0.5)),  # 0.25
    ("gpt_neox", lambda c: c.update(rope_parameters=None, rotary_emb_base=500.0, partial_rotary_factor=0.5,
                                    rotary_pct=0.25)),
    # StableLmConfig reads rope_theta and partial_rotary_factor, never Pythia's names.
    ("stablelm", lambda c: (c.pop("partial_rotary_factor", None),
                            c.update(rope_parameters=None, rotary_emb_base=500.0, rotary_pct=0.5))),
], ids=["neox-rope_theta", "neox-rope_theta-beside-rope_parameters", "neox-partial_rotary_factor",
        "neox-partial_rotary_factor-beside-rotary_pct", "stablelm-pythia-keys"])
def test_top_level_rope_keys_read_as_each_config_class_reads_them(name, change, tmp_path):
    folder = saved_with(FAMILIES[name](), tmp_path / "hf", change)
    theirs = transformers.AutoConfig.from_pretrained(folder).rope_parameters
    ours = load_hf_model(folder).config
    head_dim = 64 // 4
    assert (ours.rope_theta, ours.rotary_dim or head_dim) == (
        theirs["rope_theta"], int(head_dim * theirs["partial_rotary_factor"]))
    logits_match_on(folder)


# ----- Heron -> Hugging Face -> Heron: schedules come back as they went ---------------------------------------

_SLIDING = {"kind": "sliding", "window": WINDOW}


@pytest.mark.parametrize("changes, family", [
    ({"attention": (_SLIDING,), "rope_scaling": {"kind": "linear", "factor": 2.0}}, "mistral"),
    ({"attention": ({"kind": "dense"}, _SLIDING), "qkv_bias": True,
      "rope_scaling": {"kind": "llama3", "factor": 4.0, "original_max_seq_len": 16}}, "qwen2"),
    ({"attention": (_SLIDING,), "qk_norm": True}, "qwen3"),
    ({"attention": ({"kind": "dense"}, _SLIDING), "norm": "layernorm", "positions": "learned", "mlp": "gelu_tanh",
      "out_bias": True, "mlp_bias": True, "attn_scale": 1.0, "n_kv_heads": None, "tie_embeddings": True}, "gpt_neo"),
    ({"feed_forward": ("dense", "moe"), "qk_norm": True,
      "moe": {"n_experts": 4, "top_k": 2, "d_ff": 32, "z_loss_coef": 0.0}}, "qwen3_moe"),
], ids=["mistral-sliding-linear", "qwen2-dense-sliding-llama3", "qwen3-sliding", "gpt_neo-global-local",
        "qwen3_moe-dense-moe"])
def test_a_schedule_over_four_layers_comes_back_as_it_went(changes, family, tmp_path):
    """config.json lists each layer; Heron's schedule cycles. (dense, sliding) on four layers must
    come back as (dense, sliding), not as four entries that compare unequal."""
    config = ModelConfig(**{**dict(vocab_size=VOCAB, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                   tie_embeddings=False), **changes})
    assert exports_with_the_same_logits_and_comes_back_exact(random_heron_model(config), tmp_path / "hf") == family
