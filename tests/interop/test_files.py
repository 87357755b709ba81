"""Reading Hugging Face folders: safetensors single and sharded, legacy .bin,
dtypes, and clear errors for what is broken or unsupported."""
import json
import shutil

import pytest
import safetensors.torch
import torch

transformers = pytest.importorskip("transformers")

from heron.core import ModelConfig, Transformer  # noqa: E402
from heron.interop import WeightFileError, WeightFiles, load_hf_model, save_hf_folder  # noqa: E402
from heron.interop.files import read_safetensors_header  # noqa: E402
from heron.train.checkpoint import CheckpointError  # noqa: E402


@pytest.fixture(scope="module")
def hf_model() -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, initializer_range=0.3)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def single(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    hf_model.save_pretrained(folder)
    return folder


def same_logits(model, hf_model) -> bool:
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (model(ids).logits - hf_model(ids).logits).abs().max().item() <= 1e-5


def test_reader_matches_the_safetensors_package(single):
    ours = WeightFiles(single)
    theirs = safetensors.torch.load_file(single / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours.shape(name) == tensor.shape and ours.dtype(name) == tensor.dtype
        assert torch.equal(ours[name], tensor)
    assert ours.nbytes() == sum(t.numel() * t.element_size() for t in theirs.values())


def test_sharded_checkpoint_imports(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    assert same_logits(load_hf_model(tmp_path), hf_model)


def test_legacy_bin_checkpoint_imports(hf_model, single, tmp_path):
    shutil.copy(single / "config.json", tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    assert same_logits(load_hf_model(tmp_path), hf_model)


def test_half_precision_checkpoint_imports_into_fp32(hf_model, tmp_path):
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path)
    hf_model.float()
    model = load_hf_model(tmp_path)
    assert next(model.parameters()).dtype == torch.float32
    stored = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert torch.equal(model.embed.weight, stored["model.embed_tokens.weight"].float())


def test_missing_shard_is_named(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightFileError, match=f"{shard.name}: missing shard"):
        load_hf_model(tmp_path)


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "/abs/model.safetensors"])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(hf_model, tmp_path, shard):
    hf_model.save_pretrained(tmp_path / "model", max_shard_size="20KB")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(sorted((tmp_path / "model").glob("*.safetensors"))[0], tmp_path / "elsewhere" / "model.safetensors")
    index = tmp_path / "model" / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"] = {name: shard for name in content["weight_map"]}
    index.write_text(json.dumps(content))
    with pytest.raises(WeightFileError, match="which is not a file in the folder"):
        load_hf_model(tmp_path / "model")


def test_a_header_with_a_negative_size_or_reversed_offsets_is_refused(single, tmp_path):
    for entry in ({"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]},
                  {"dtype": "F32", "shape": [2, 1], "data_offsets": [8, 0]}):
        header = json.dumps({"w": entry}).encode()
        (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
        with pytest.raises(WeightFileError, match="tensor w: shape .* out of range"):
            read_safetensors_header(tmp_path / "model.safetensors")


def test_truncated_file_names_the_tensor(single, tmp_path):
    shutil.copytree(single, tmp_path, dirs_exist_ok=True)
    file = tmp_path / "model.safetensors"
    last = max(read_safetensors_header(file).items(), key=lambda item: item[1].start)[0]
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(WeightFileError, match=f"tensor {last} ends .* truncated"):
        load_hf_model(tmp_path)


def test_garbage_file_is_refused(single, tmp_path):
    shutil.copy(single / "config.json", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WeightFileError, match="model.safetensors: unreadable safetensors header"):
        load_hf_model(tmp_path)


def test_mismatched_shape_names_the_tensor(single, tmp_path):
    shutil.copytree(single, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48  # the stored MLP weights are 64 wide
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"^blocks\.0\.mlp\.up\.weight: .*gate_proj"):
        load_hf_model(tmp_path)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("vocab_size", 10**10, r"describes [\d,]+ parameters, but the weights hold [\d,]+ numbers"),
    ("intermediate_size", 10**9, r"describes [\d,]+ parameters, but the weights hold [\d,]+ numbers"),
    ("num_hidden_layers", 10**7, r"asks for 10000000 layers, but the weights number their parts up to 3"),
    ("max_position_embeddings", 10**11, r"max_seq_len 100,000,000,000 asks for [\d,]+ bytes of position tables"),
])
def test_a_config_the_weights_cannot_fill_is_refused_before_anything_is_allocated(single, tmp_path, key, value,
                                                                                   message):
    """Each of these would take terabytes (or, for the layers, minutes of building) if the model were made first."""
    shutil.copytree(single, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {key: value}))
    with pytest.raises(CheckpointError, match=message):
        load_hf_model(tmp_path)


def test_unsupported_architecture_is_named(single, tmp_path):
    shutil.copytree(single, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertForMaskedLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type: 'bert' .* not supported; Heron imports llama"):
        load_hf_model(tmp_path)


def test_folder_without_weights_is_named(single, tmp_path):
    shutil.copy(single / "config.json", tmp_path)
    with pytest.raises(WeightFileError, match="no weight files"):
        load_hf_model(tmp_path)


def test_export_never_leaves_half_a_folder(tmp_path, monkeypatch):
    model = Transformer(ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_hf_folder(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
