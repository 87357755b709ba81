"""Checkpoint folders: round trips, atomic writes, and clear failures on damage."""
from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from heron.models import build_model
from heron.tokenizer.bpe import train_tokenizer
from heron.train import checkpoint as ckpt
from heron.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_folder,
    resolve_checkpoint,
    save_checkpoint,
    save_model_folder,
    verify_checkpoint,
)
from train_helpers import dead_pid

SMALL = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32)
IDS = torch.tensor([[1, 5, 9, 200, 7, 3]])


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300, progress=False)


def small_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model("test", **{**SMALL, **overrides})


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_the_same_logits(tmp_path: Path, tokenizer, tied: bool) -> None:
    model = small_model(tie_embeddings=tied)
    folder = save_model_folder(tmp_path / "m", model, tokenizer=tokenizer, lineage={"step": 3})
    loaded, loaded_tok = load_model_folder(folder)
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(IDS).logits, model.eval()(IDS).logits, rtol=0, atol=0)
    assert (loaded.lm_head.weight is loaded.embed.weight) == tied  # re-tied, not two copies
    assert loaded_tok.encode("def f(x):") == tokenizer.encode("def f(x):")
    lineage = verify_checkpoint(folder)
    assert lineage["step"] == 3 and lineage["torch_version"] == torch.__version__
    assert lineage["files"]["model.safetensors"]["sha256"] == ckpt.sha256_file(folder / "model.safetensors")


def test_folder_layout(tmp_path: Path, tokenizer) -> None:
    folder = save_model_folder(tmp_path / "m", small_model(), tokenizer=tokenizer, trainer_state={"step": 1})
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "lineage.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"]
    assert json.loads((folder / "config.json").read_text())["d_model"] == 32
    assert load_checkpoint(folder).trainer_state == {"step": 1}


def damage_truncate(folder: Path) -> None:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])


def damage_flip(folder: Path) -> None:
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-10] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (damage_truncate, r"model\.safetensors: \d+ bytes, but lineage\.json records \d+ \(truncated"),
    (damage_flip, r"model\.safetensors: sha256 does not match lineage\.json \(corrupted\)"),
    (lambda f: (f / "config.json").unlink(), r"config\.json: missing"),
    (lambda f: (f / "lineage.json").unlink(), r"lineage\.json: missing"),
    (lambda f: (f / "lineage.json").write_text("{"), r"lineage\.json: not readable JSON"),
    (lambda f: (f / "tokenizer.json").unlink(), r"tokenizer\.json: missing, but listed in lineage\.json"),
])
def test_damaged_checkpoint_fails_naming_the_file(tmp_path: Path, tokenizer, damage, message: str) -> None:
    folder = save_model_folder(tmp_path / "m", small_model(), tokenizer=tokenizer)
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        load_model_folder(folder)


def edit_manifest(folder: Path, edit) -> None:
    lineage = json.loads((folder / "lineage.json").read_text())
    edit(lineage["files"])
    (folder / "lineage.json").write_text(json.dumps(lineage))


@pytest.mark.parametrize("edit, message", [
    (lambda files: files.pop("config.json"), r"lists no hash for config\.json, which loading reads"),
    (lambda files: files.update({"../../secret": {"sha256": "x", "bytes": 1}}), r"files\['\.\./\.\./secret'\] is not"),
    (lambda files: files.update({"/etc/hostname": {"sha256": "x", "bytes": 1}}), r"files\['/etc/hostname'\] is not"),
    (lambda files: files.update({"config.json": "abc"}), r"files\['config\.json'\] is not a file of the folder"),
])
def test_a_manifest_that_vouches_for_less_or_for_files_elsewhere_is_refused(tmp_path: Path, tokenizer, edit,
                                                                             message: str) -> None:
    folder = save_model_folder(tmp_path / "m", small_model(), tokenizer=tokenizer)
    edit_manifest(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(folder)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"n_layers": 10**7}, r"asks for 10000000 layers, but the weights number their parts up to 2"),
    ({"vocab_size": 10**10}, r"embed\.weight has shape \(300, 32\), model expects \(10000000000, 32\)"),
])
def test_a_config_its_weights_cannot_fill_is_refused_before_the_model_is_made(tmp_path: Path, overrides,
                                                                             message: str) -> None:
    folder = save_model_folder(tmp_path / "m", small_model())
    config = json.loads((folder / "config.json").read_text()) | overrides
    (folder / "config.json").write_text(json.dumps(config))
    edit_manifest(folder, lambda files: files.update(config_json_record(folder)))  # rewritten with it
    with pytest.raises(CheckpointError, match=message):
        load_model_folder(folder)


def test_a_config_without_a_required_field_names_it(tmp_path: Path) -> None:
    folder = save_model_folder(tmp_path / "m", small_model())
    config = json.loads((folder / "config.json").read_text())
    del config["d_model"]
    (folder / "config.json").write_text(json.dumps(config))
    edit_manifest(folder, lambda files: files.update(config_json_record(folder)))
    with pytest.raises(CheckpointError, match=r"config\.json: d_model: missing; ModelConfig needs d_model"):
        load_model_folder(folder)


def test_a_path_below_a_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    target = tmp_path / "notes.txt" / "sub" / "model"
    message = rf"{re.escape(str(target))}: {re.escape(str(tmp_path / 'notes.txt'))} is a file, so no folder"
    with pytest.raises(FileExistsError, match=message):
        ckpt.require_new_folder(target)  # what converters and compressors check before their work
    with pytest.raises(FileExistsError, match=message):
        save_model_folder(target, small_model())
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def config_json_record(folder: Path) -> dict:
    file = folder / "config.json"
    return {"config.json": {"sha256": ckpt.sha256_file(file), "bytes": file.stat().st_size}}


def test_a_card_written_into_the_folder_later_needs_no_hash(tmp_path: Path, tokenizer) -> None:
    folder = save_model_folder(tmp_path / "m", small_model(), tokenizer=tokenizer)
    (folder / "README.md").write_text("# a model card\n")
    verify_checkpoint(folder)


def test_a_template_added_to_the_folder_later_is_refused(tmp_path: Path, tokenizer) -> None:
    """Loading reads additional_chat_templates/*.jinja: one the manifest does not vouch for is refused."""
    folder = save_model_folder(tmp_path / "m", small_model(), tokenizer=tokenizer)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "rag.jinja").write_text("{{ messages }}")
    with pytest.raises(CheckpointError, match=r"lists no hash for additional_chat_templates/rag\.jinja"):
        verify_checkpoint(folder)


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    model = small_model()
    first = save_checkpoint(tmp_path, 1, model, keep_last=3)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing weights")

    monkeypatch.setattr(ckpt.safetensors.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, small_model(seed=1), keep_last=3)
    assert list_checkpoints(tmp_path) == [first] and latest_checkpoint(tmp_path) == first
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    verify_checkpoint(first)


def test_folder_left_by_a_killed_save_is_ignored_then_swept(tmp_path: Path) -> None:
    first = save_checkpoint(tmp_path, 1, small_model(), keep_last=3)
    # What SIGKILL mid-save leaves: a hidden temp folder with some of the files.
    partial = tmp_path / "checkpoints" / ".tmp-step_00000002-deadbeef"
    partial.mkdir()
    shutil.copy(first / "config.json", partial / "config.json")
    (partial / "model.safetensors").write_bytes((first / "model.safetensors").read_bytes()[:50])
    assert latest_checkpoint(tmp_path) == first
    second = save_checkpoint(tmp_path, 2, small_model(), keep_last=3)
    assert not partial.exists() and latest_checkpoint(tmp_path) == second


def test_keep_last_and_latest_pointer(tmp_path: Path) -> None:
    model = small_model()
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, model, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006", "step_00000008"]
    latest = tmp_path / "checkpoints" / "latest"
    assert latest.is_symlink() and latest.resolve().name == "step_00000008"
    assert load_checkpoint(latest).path == latest  # usable as a folder path
    assert load_checkpoint(tmp_path).path.name == "step_00000008"  # a run folder resolves to its latest
    loaded, tokenizer = load_model_folder(tmp_path)
    assert tokenizer is None
    torch.testing.assert_close(loaded(IDS).logits, model.eval()(IDS).logits, rtol=0, atol=0)


def test_weights_that_do_not_fit_the_config_fail(tmp_path: Path) -> None:
    folder = save_model_folder(tmp_path / "m", small_model())
    lineage = json.loads((folder / "lineage.json").read_text())
    config = json.loads((folder / "config.json").read_text()) | {"d_model": 64, "n_heads": 4}
    (folder / "config.json").write_text(json.dumps(config))
    lineage["files"]["config.json"] = {"sha256": ckpt.sha256_file(folder / "config.json"),
                                       "bytes": (folder / "config.json").stat().st_size}
    (folder / "lineage.json").write_text(json.dumps(lineage))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*weight has shape \(32, 32\), model expects \(64, 64\)"):
        load_model_folder(folder)


def rewrite_weights(folder: Path, edit) -> None:
    """Change model.safetensors with `edit` and record its new hash, as a writer of another model would."""
    file = folder / "model.safetensors"
    weights = safetensors.torch.load_file(file)
    edit(weights)
    safetensors.torch.save_file(weights, file, metadata={"format": "pt"})
    edit_manifest(folder, lambda files: files.update({"model.safetensors": {
        "sha256": ckpt.sha256_file(file), "bytes": file.stat().st_size}}))


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_a_tensor_of_another_kind_of_number_is_refused_naming_it(tmp_path: Path, dtype: torch.dtype) -> None:
    """load_state_dict would copy int32 bits or booleans into float weights: a model of garbage, silently."""
    folder = save_model_folder(tmp_path / "m", small_model())
    rewrite_weights(folder, lambda w: w.update({"embed.weight": (w["embed.weight"].view(torch.int32) if
                                                                dtype == torch.int32 else w["embed.weight"] > 0)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: embed\.weight holds {dtype}, but the model's "
                                              r"is torch\.float32 \(floating-point numbers\)"):
        load_model_folder(folder)


def test_weights_stored_in_half_precision_load_converted(tmp_path: Path) -> None:
    folder = save_model_folder(tmp_path / "m", small_model())
    rewrite_weights(folder, lambda w: w.update({name: value.bfloat16() for name, value in w.items()}))
    loaded, _ = load_model_folder(folder)
    expected = small_model().embed.weight.detach().bfloat16().float()
    assert loaded.embed.weight.dtype == torch.float32 and torch.equal(loaded.embed.weight, expected)


def damage_state(folder: Path) -> None:
    (folder / "trainer_state.pt").write_bytes(b"not a pickle")


def damage_state_and_its_hash(folder: Path) -> None:
    damage_state(folder)
    file = folder / "trainer_state.pt"
    edit_manifest(folder, lambda files: files.update({file.name: {"sha256": ckpt.sha256_file(file),
                                                                   "bytes": file.stat().st_size}}))


@pytest.mark.parametrize("damage, message", [
    (damage_state, r"trainer_state\.pt: \d+ bytes, but lineage\.json records"),
    (damage_state_and_its_hash, r"trainer_state\.pt: unreadable"),
])
def test_a_damaged_checkpoint_to_resume_from_says_how_to_go_on(tmp_path: Path, damage, message: str) -> None:
    """Resuming reads the newest checkpoint: while it is damaged every restart fails, so the error says the ways out."""
    save_checkpoint(tmp_path, 1, small_model(), keep_last=2, trainer_state={"step": 1})
    newest = save_checkpoint(tmp_path, 2, small_model(), keep_last=2, trainer_state={"step": 2})
    damage(newest)
    ways_out = r".*; to resume from the checkpoint before it, move .*step_00000002 out of .*--no-resume \(resume=False\)"
    with pytest.raises(CheckpointError, match="(?s)" + message + ways_out):  # (?s): torch's message spans lines
        load_checkpoint(latest_checkpoint(tmp_path))
    shutil.move(newest, tmp_path / "damaged")  # as the error says: the run goes on from step 1
    assert load_checkpoint(latest_checkpoint(tmp_path)).trainer_state == {"step": 1}


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        load_model_folder(tmp_path)


def test_a_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    exported = tmp_path / "model.gguf"
    exported.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"model\.gguf: a file, not a checkpoint folder"):
        load_checkpoint(exported)


def test_saving_over_a_folder_replaces_only_a_model_folder_it_wrote(tmp_path) -> None:
    """Replacing a folder deletes what it holds: only files a model folder's manifest lists may go."""
    model = build_model("test", **SMALL)
    save_model_folder(tmp_path / "model", model)
    save_model_folder(tmp_path / "model", model)  # an earlier save: replaced
    (tmp_path / "model" / "my_notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"model: holds files save_model_folder did not write \(my_notes.txt\)"):
        save_model_folder(tmp_path / "model", model)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "sub").mkdir()
    (tmp_path / "mine" / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match=r"sub/data.csv"):
        save_model_folder(tmp_path / "mine", model)
    assert (tmp_path / "model" / "my_notes.txt").is_file() and (tmp_path / "mine" / "sub" / "data.csv").is_file()


def test_what_a_killed_save_left_beside_its_target_is_swept_by_the_next(tmp_path) -> None:
    model = build_model("test", **SMALL)
    for leftover in (".tmp-model-deadbeef", ".trash-model-cafebabe"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / ".tmp-other-00000000").mkdir()  # another target's: not this save's to sweep
    save_model_folder(tmp_path / "model", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-other-00000000", "model"]


def test_build_on_meta_reads_only_ascii_numbers_in_weight_names() -> None:
    """'²' passes str.isdigit() but not int(): a crafted name must not crash the check."""
    config = small_model().config
    names = {f"blocks.{i}.w": (1,) for i in range(config.n_layers)} | {"blocks.².x": (1,)}
    assert ckpt.build_on_meta(config, names, "weights").config == config


@pytest.mark.parametrize("name", ["quantization.json", "sparsity.json"])
def test_a_compression_manifest_dropped_in_later_is_refused(tmp_path: Path, tokenizer, name: str) -> None:
    """Loading takes a folder holding one for a quantised or sparse checkpoint: its manifest must vouch for it."""
    folder = save_model_folder(tmp_path / "m", small_model(), tokenizer=tokenizer)
    (folder / name).write_text("{}")
    with pytest.raises(CheckpointError, match=f"lists no hash for {name}"):
        verify_checkpoint(folder)


KILLED_REPLACE = r'''
import os, shutil, signal, sys
from pathlib import Path
from heron.train.checkpoint import atomic_folder

target, where = Path(sys.argv[1]), sys.argv[2]
with atomic_folder(target) as tmp:
    (tmp / "v").write_text("old")
rename, rmtree = os.replace, shutil.rmtree

def replace(src, dst):
    if where == "renaming in" and Path(src).name.startswith(".tmp-"):
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst)

def remove(path, *args, **kwargs):
    if where == "deleting the old" and Path(path).name.startswith(".trash-"):
        os.kill(os.getpid(), signal.SIGKILL)
    return rmtree(path, *args, **kwargs)

os.replace, shutil.rmtree = replace, remove
with atomic_folder(target) as tmp:
    (tmp / "v").write_text("new")
'''


@pytest.mark.parametrize("where", ["renaming in", "deleting the old"])
def test_a_replacement_killed_midway_loses_neither_copy(tmp_path: Path, where: str) -> None:
    """SIGKILL while replacing a folder: the new one is at the path, or comes there at the next
    save, which sweeps the rest (here that save fails, so only the sweep can have put it there)."""
    target = tmp_path / "sae"
    killed = subprocess.run([sys.executable, "-c", KILLED_REPLACE, str(target), where])
    assert killed.returncode == -9
    with pytest.raises(RuntimeError, match="a save that fails"), ckpt.atomic_folder(target):
        raise RuntimeError("a save that fails")
    assert (target / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_a_live_writers_temp_folders_are_not_swept(tmp_path: Path) -> None:
    """Two processes saving to one place: each sweep takes only what a process no longer running left."""
    live, dead = os.getpid(), dead_pid()
    for name in (f".tmp-model-{live}-0123abcd", f".trash-model-{live}-0123abcd-0", f".tmp-model-{dead}-0123abcd",
                 f".trash-model-{dead}-4567abcd"):
        (tmp_path / name).mkdir()
    save_model_folder(tmp_path / "model", small_model())
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-model-{live}-0123abcd",
                                                          f".trash-model-{live}-0123abcd-0", "model"]
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in (f".tmp-step_00000002-{live}-0123abcd", f".tmp-latest-{live}-0123abcd",
                 f".tmp-step_00000002-{dead}-0123abcd"):
        (checkpoints / name).mkdir()
    save_checkpoint(tmp_path / "run", 1, small_model(), keep_last=1)
    assert sorted(p.name for p in checkpoints.iterdir()) == [f".tmp-latest-{live}-0123abcd",
                                                             f".tmp-step_00000002-{live}-0123abcd",
                                                             "latest", "step_00000001"]


@pytest.mark.parametrize("as_file", [False, True])
def test_a_latest_pointer_left_naming_a_deleted_step_falls_back_to_the_newest_there(tmp_path: Path,
                                                                                   as_file: bool) -> None:
    for step in (1, 2):
        save_checkpoint(tmp_path, step, small_model(step), keep_last=2, lineage={"step": step})
    checkpoints = tmp_path / "checkpoints"
    if as_file:  # where symlinks are not allowed the pointer is a file naming the step
        (checkpoints / "latest").unlink()
        (checkpoints / "latest").write_text("step_00000002\n")
    shutil.rmtree(checkpoints / "step_00000002")  # the newest, deleted by hand
    for path in (tmp_path, checkpoints, checkpoints / "latest"):
        assert resolve_checkpoint(path) == checkpoints / "step_00000001"
        assert load_checkpoint(path).lineage["step"] == 1
    shutil.rmtree(checkpoints / "step_00000001")
    with pytest.raises(CheckpointError, match=r"latest/config\.json: missing, and .*latest holds no checkpoints"):
        load_checkpoint(checkpoints / "latest")


def test_the_latest_checkpoint_deleted_while_it_is_read_is_read_again(tmp_path: Path, monkeypatch) -> None:
    """A reader of a run that is still training: keep_last deletes the checkpoint it resolved."""
    save_checkpoint(tmp_path, 1, small_model(), keep_last=1)
    verify, step = ckpt.verify_checkpoint, iter(range(2, 100))

    def newer_save_first(folder):  # between resolving and reading, the run saves the next step
        save_checkpoint(tmp_path, next(step), small_model(), keep_last=1)
        return verify(folder)

    monkeypatch.setattr(ckpt, "verify_checkpoint", newer_save_first)
    with pytest.raises(CheckpointError, match=r"step_00000002: removed by a newer save while it was read"):
        load_checkpoint(tmp_path)  # every read overtaken: said as it is, not as damage
    saves = iter([True])
    monkeypatch.setattr(ckpt, "verify_checkpoint", lambda folder: newer_save_first(folder) if next(saves, False)
                        else verify(folder))
    assert load_checkpoint(tmp_path).path.name == "step_00000004"  # once: the newer one is read
    assert load_checkpoint(tmp_path / "checkpoints" / "latest").lineage is not None


def test_a_checkpoint_read_through_latest_is_one_steps_throughout(tmp_path: Path, monkeypatch) -> None:
    """A save that repoints `latest` after the read verified step 1 must not hand out step 1's
    lineage with step 2's weights: the read goes on in the folder it resolved (here deleted,
    so it is read again, whole, from step 2)."""
    save_checkpoint(tmp_path, 1, small_model(1), keep_last=1, lineage={"step": 1})
    verify, saves = ckpt.verify_checkpoint, iter([2])

    def newer_save_after(folder):
        lineage = verify(folder)
        for step in saves:
            save_checkpoint(tmp_path, step, small_model(step), keep_last=1, lineage={"step": step})
        return lineage

    monkeypatch.setattr(ckpt, "verify_checkpoint", newer_save_after)
    latest = tmp_path / "checkpoints" / "latest"
    loaded = load_checkpoint(latest)
    assert loaded.path == latest and loaded.lineage["step"] == 2
    expected = small_model(2).state_dict()
    assert all(torch.equal(loaded.state_dict[name], w) for name, w in expected.items() if name in loaded.state_dict)
