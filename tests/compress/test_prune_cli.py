"""`heron compress prune` on a tiny checkpoint and a tiny shard folder:
unstructured SparseGPT with recovery writes a sparse checkpoint heron.load
reads; MLP-channel pruning writes a plain, smaller one (a packed one where the
source was sparse: its zeros are kept)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import heron
from compress_helpers import checkpoint_and_shards
from heron.cli.main import main
from heron.compress.prune_model import prunable_weights, sparsity_of
from heron.compress.sparse_store import SPARSITY_FILE
from heron.core import ModelConfig, MoEConfig, Transformer
from heron.train.checkpoint import save_model_folder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    return checkpoint_and_shards(tmp_path_factory.mktemp("prune_cli"))


def test_unstructured_with_recovery_writes_a_sparse_checkpoint(folders, tmp_path, capsys):
    ckpt, shards = folders
    out = tmp_path / "sparse"
    assert main(["compress", "prune", str(ckpt), str(out), "--method", "sparsegpt", "--sparsity", "0.5",
                 "--calib-shards", str(shards), "--calib-batches", "2", "--calib-batch-size", "2", "--seq-len", "32",
                 "--recover-steps", "2"]) == 0
    assert "50.0% zeros" in capsys.readouterr().out
    assert (out / SPARSITY_FILE).is_file()
    model, _ = heron.load(out)
    assert sparsity_of(model) == pytest.approx(0.5)
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["pruning"]["settings"]["method"] == "sparsegpt" and "recover_loss" in lineage["pruning"]
    assert lineage["pruning"]["energy"]["joules"] > 0 and lineage["pruning"]["energy"]["source"]
    # The pruned model exports to Hugging Face as the dense model it equals, zeros and all.
    assert main(["convert", "to-hf", str(out), str(tmp_path / "hf")]) == 0
    exported, _ = heron.load(tmp_path / "hf")
    ids = torch.arange(20).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, model(ids).logits)


def test_two_four_and_mlp_channels(folders, tmp_path, capsys):
    ckpt, shards = folders
    assert main(["compress", "prune", str(ckpt), str(tmp_path / "nm"), "--method", "magnitude", "--nm", "2:4"]) == 0
    assert main(["compress", "prune", str(ckpt), str(tmp_path / "ch"), "--mlp-channels", "0.25",
                 "--calib-shards", str(shards), "--calib-batches", "1", "--seq-len", "16"]) == 0
    model, _ = heron.load(tmp_path / "ch")
    assert model.config.d_ff == 96 and not (tmp_path / "ch" / SPARSITY_FILE).exists()


def test_structured_pruning_of_a_sparse_model_keeps_its_zeros_through_recovery(folders, tmp_path):
    """Known answer: recovery moves no zero, so the model pruned of MLP channels and recovered has the zeros
    of the one pruned the same way without recovery, exactly; both are stored packed, and the lineage
    states the sparsity of the model saved."""
    ckpt, shards = folders
    assert main(["compress", "prune", str(ckpt), str(tmp_path / "sparse"), "--method", "magnitude",
                 "--sparsity", "0.5"]) == 0
    channels = ["--mlp-channels", "0.25", "--calib-shards", str(shards), "--calib-batches", "2",
                "--calib-batch-size", "2", "--seq-len", "32"]
    assert main(["compress", "prune", str(tmp_path / "sparse"), str(tmp_path / "plain"), *channels]) == 0
    assert main(["compress", "prune", str(tmp_path / "sparse"), str(tmp_path / "recovered"), *channels,
                 "--recover-steps", "3", "--recover-lr", "1e-2"]) == 0
    (plain, _), (recovered, _) = heron.load(tmp_path / "plain"), heron.load(tmp_path / "recovered")
    assert recovered.config.d_ff == 96 and sparsity_of(recovered) > 0.45
    for (name, a), b in zip(prunable_weights(plain).items(), prunable_weights(recovered).values()):
        assert torch.equal(a == 0, b == 0), name
        assert not torch.equal(a, b), name  # recovery did train the weights it kept
    for out, model in (("plain", plain), ("recovered", recovered)):
        assert (tmp_path / out / SPARSITY_FILE).is_file()
        lineage = json.loads((tmp_path / out / "lineage.json").read_text())
        assert lineage["pruning"]["block_linear_sparsity"] == sparsity_of(model)


def test_a_dense_models_stray_exact_zero_neither_makes_it_sparse_nor_stays_zero(folders, tmp_path):
    """A dense source (a bf16 import may hold exact zeros) pruned of MLP channels and recovered is a dense
    model: stored plainly, with its one zero trained like any weight."""
    ckpt, shards = folders
    model, tokenizer = heron.load(ckpt)
    with torch.no_grad():
        next(iter(prunable_weights(model).values()))[0, 0] = 0.0
    save_model_folder(tmp_path / "dense", model, tokenizer=tokenizer)
    assert main(["compress", "prune", str(tmp_path / "dense"), str(tmp_path / "out"), "--mlp-channels", "0.25",
                 "--calib-shards", str(shards), "--calib-batches", "2", "--calib-batch-size", "2", "--seq-len", "32",
                 "--recover-steps", "3", "--recover-lr", "1e-2"]) == 0
    assert not (tmp_path / "out" / SPARSITY_FILE).exists()
    pruned, _ = heron.load(tmp_path / "out")
    assert sparsity_of(pruned) == 0 and next(iter(prunable_weights(pruned).values()))[0, 0] != 0


def test_bad_requests_exit_2_naming_the_problem(folders, tmp_path, capsys):
    ckpt, shards = folders
    assert main(["compress", "prune", str(ckpt), str(tmp_path / "x"), "--heads", "0.1", "--calib-shards", str(shards),
                 "--calib-batches", "1", "--seq-len", "16"]) == 2  # 4 heads: 0.1 of them removes none
    assert "--heads: 0.1 of 4 rounds to none removed; the smallest step here is 0.25" in capsys.readouterr().err
    assert main(["compress", "prune", str(ckpt), str(tmp_path / "x"), "--method", "wanda", "--sparsity", "0.5"]) == 2
    assert "--calib-shards: a shard folder of calibration windows is needed for --method wanda\n" in \
        capsys.readouterr().err
    assert main(["compress", "prune", str(ckpt), str(tmp_path / "x")]) == 2
    assert "nothing to prune; give --sparsity, --nm, --mlp-channels, --heads or --experts" in capsys.readouterr().err
    for flag in ("--heads", "--mlp-channels"):  # 0 would copy the model and call it pruned
        assert main(["compress", "prune", str(ckpt), str(tmp_path / "x"), flag, "0"]) == 2
        assert f"error: {flag}: expected a fraction in (0, 1), got 0\n" in capsys.readouterr().err
    assert main(["compress", "prune", str(ckpt), str(tmp_path / "x"), "--method", "magnitude", "--sparsity", "0.5",
                 "--recover-steps", "2", "--recover-lr", "-0.1", "--calib-shards", str(shards)]) == 2
    assert "error: --recover-lr: expected a positive learning rate, got -0.1\n" in capsys.readouterr().err
    weights = (ckpt / "model.safetensors").read_bytes()
    assert main(["compress", "prune", str(ckpt), str(ckpt), "--method", "magnitude", "--sparsity", "0.5"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (ckpt / "model.safetensors").read_bytes() == weights  # the source is never replaced
    with pytest.raises(SystemExit):
        main(["compress", "prune", str(ckpt), str(tmp_path / "x"), "--nm", "2-4"])


def test_asking_for_what_the_source_already_has_is_refused_before_writing(folders, tmp_path, capsys):
    ckpt, shards = folders
    half = tmp_path / "half"
    assert main(["compress", "prune", str(ckpt), str(half), "--method", "magnitude", "--sparsity", "0.5"]) == 0
    capsys.readouterr()
    assert main(["compress", "prune", str(half), str(tmp_path / "lower"), "--method", "magnitude",
                 "--sparsity", "0.3"]) == 2
    assert f"--sparsity: {half} is already 50.0% zeros; 0.3 would prune nothing" in capsys.readouterr().err
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_seq_len=64, feed_forward=("moe",),
                         moe=MoEConfig(n_experts=4, top_k=2))
    moe = save_model_folder(tmp_path / "moe", Transformer(config))
    assert main(["compress", "prune", str(moe), str(tmp_path / "same"), "--experts", "4",
                 "--calib-shards", str(shards), "--calib-batches", "1", "--seq-len", "16"]) == 2
    assert f"--experts: {moe} already has 4 experts per MoE layer; keeping 4 would remove none" in \
        capsys.readouterr().err
    assert not (tmp_path / "lower").exists() and not (tmp_path / "same").exists()


def test_a_method_without_sparsity_or_nm_is_refused(folders, tmp_path, capsys):
    ckpt, shards = folders
    assert main(["compress", "prune", str(ckpt), str(tmp_path / "x"), "--method", "sparsegpt", "--mlp-channels",
                 "0.25", "--calib-shards", str(shards)]) == 2
    assert "--method: 'sparsegpt' scores unstructured and N:M pruning; it applies only with --sparsity or --nm" in \
        capsys.readouterr().err


def test_a_target_inside_the_source_or_a_file_is_refused(folders, tmp_path, capsys):
    ckpt, _ = folders
    files = sorted(p.name for p in ckpt.iterdir())
    assert main(["compress", "prune", str(ckpt), str(ckpt / "sub"), "--method", "magnitude", "--sparsity", "0.5"]) == 2
    assert "inside the source" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.iterdir()) == files
    (tmp_path / "empty_file").touch()
    assert main(["compress", "prune", str(ckpt), str(tmp_path / "empty_file"), "--method", "magnitude",
                 "--sparsity", "0.5"]) == 2
    assert "empty_file: is a file; give a folder path" in capsys.readouterr().err
    assert main(["convert", "to-hf", str(ckpt), str(ckpt / "hf")]) == 2
    assert "inside the source" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.iterdir()) == files
