"""Sparse checkpoints: the bitmask + values form round-trips exactly, and a
pruned model saved with it (a MoE's stacked experts too) loads back through
heron.load bit for bit from a file smaller than the dense one by the expected
amount."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import heron
from heron.compress.prune_model import prune_model
from heron.compress.calibration import block_experts, block_linears
from heron.compress.sparse_store import SPARSITY_FILE, pack_sparse, packed_bytes, save_sparse, unpack_sparse
from heron.core import ModelConfig, MoEConfig, Transformer
from heron.train.checkpoint import MODEL_FILE, CheckpointError, save_model_folder, verify_checkpoint

torch.set_num_threads(1)


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)).eval()


@pytest.mark.parametrize("shape", [(5, 13), (8, 8), (3, 4, 7), (1, 1)])
def test_pack_unpack_is_exact(shape):
    w = torch.randn(shape)
    w[torch.rand(shape) < 0.6] = 0
    bits, values = pack_sparse(w)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-w.numel() // 8)
    assert values.numel() == int((w != 0).sum())
    assert torch.equal(unpack_sparse(bits, values, shape), w)


def test_bit_order_is_little_endian_row_major():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3, 4.0]])  # elements 0, 2, 7 | 8
    bits, values = pack_sparse(w)
    assert bits.tolist() == [0b10000101, 0b1] and values.tolist() == [1, 2, 3, 4]


def test_a_negative_zero_keeps_its_sign():
    """-0.0 == 0, so a mask of `!= 0` would leave it out and bring it back as +0.0: it is stored."""
    w = torch.tensor([[0.5, -0.0, 0.0, -1.25, 0.0], [-0.0, 0.0, 2.0, -0.0, 0.0], [0.0, 0.0, 0.0, 0.0, -3.0]])
    bits, values = pack_sparse(w)
    back = unpack_sparse(bits, values, tuple(w.shape))
    assert torch.equal(back, w) and torch.equal(back.signbit(), w.signbit())
    assert values.numel() == 7 and packed_bytes(w) == 2 + 7 * 4  # the 4 nonzeros and the 3 -0.0


def test_negative_zeros_survive_a_saved_checkpoint_bit_for_bit(tmp_path):
    model = tiny()
    prune_model(model, "magnitude", sparsity=0.5, progress=False)
    weight = model.blocks[0].mlp.up.weight
    with torch.no_grad():
        weight[tuple((weight == 0).nonzero()[:5].T)] = -0.0  # a few of the pruned zeros
    save_sparse(tmp_path / "sparse", model)
    loaded, _ = heron.load(tmp_path / "sparse")
    want = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, want[name]) and torch.equal(value.signbit(), want[name].signbit()), name
    up = loaded.blocks[0].mlp.up.weight
    assert int(((up == 0) & up.signbit()).sum()) == 5  # the -0.0 set above and no other


def test_save_load_round_trip_is_exact_and_the_file_is_smaller(tmp_path):
    model = tiny()
    prune_model(model, "magnitude", sparsity=0.5, progress=False)
    save_model_folder(tmp_path / "dense", model)
    save_sparse(tmp_path / "sparse", model)
    verify_checkpoint(tmp_path / "sparse")  # sparsity.json is hashed with the rest
    record = json.loads((tmp_path / "sparse" / SPARSITY_FILE).read_text())
    pruned = {f"{name}.weight" for name in block_linears(model)}
    assert set(record["tensors"]) == pruned  # dense weights (embedding, norms) are stored as they are
    loaded, tokenizer = heron.load(tmp_path / "sparse")
    assert tokenizer is None and loaded.config == model.config
    want = model.state_dict()
    assert all(torch.equal(value, want[name]) for name, value in loaded.state_dict().items())
    assert loaded.lm_head.weight is loaded.embed.weight  # still tied
    # Expected saving: each pruned fp32 weight goes from 4 bytes to 1/8 + 4 * 0.5.
    weights = [want[name] for name in pruned]
    saving = sum(w.nbytes - packed_bytes(w) for w in weights)
    assert saving == pytest.approx(sum(w.nbytes for w in weights) * (1 - 2.125 / 4))
    dense, sparse = ((tmp_path / k / MODEL_FILE).stat().st_size for k in ("dense", "sparse"))
    assert abs((dense - sparse) - saving) < 2048  # the rest: safetensors' JSON header
    stored = safetensors.torch.load_file(tmp_path / "sparse" / MODEL_FILE)
    assert stored["blocks.0.mlp.up.weight.sparse_mask"].dtype == torch.uint8


def test_a_pruned_moe_round_trips_with_its_stacked_experts_packed(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, feed_forward=("moe",),
                         moe=MoEConfig(n_experts=4, top_k=2))
    model, ids = Transformer(config).eval(), torch.randint(0, 256, (2, 16))
    prune_model(model, "magnitude", nm=(2, 4), progress=False)
    save_sparse(tmp_path / "moe", model)
    record = json.loads((tmp_path / "moe" / SPARSITY_FILE).read_text())["tensors"]
    assert record["blocks.0.mlp.up"] == {"shape": [4, 64, 192], "dtype": "float32", "nonzeros": 4 * 64 * 192 // 2}
    assert set(block_experts(model)) <= set(record)
    stored = safetensors.torch.load_file(tmp_path / "moe" / MODEL_FILE)
    assert "blocks.1.mlp.down" not in stored and stored["blocks.1.mlp.down.sparse_values"].numel() == 4 * 96 * 64 // 2
    loaded, _ = heron.load(tmp_path / "moe")
    want = model.state_dict()
    assert all(torch.equal(value, want[name]) for name, value in loaded.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_dense_weights_are_not_packed_and_a_damaged_record_is_named(tmp_path):
    model = tiny()
    save_sparse(tmp_path / "m", model)
    assert json.loads((tmp_path / "m" / SPARSITY_FILE).read_text())["tensors"] == {}
    (tmp_path / "m" / SPARSITY_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match=SPARSITY_FILE):
        heron.load(tmp_path / "m")
