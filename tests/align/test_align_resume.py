"""A killed alignment run goes on from its last saved state exactly as the unbroken run
would have: the same metrics rows and, bit for bit, the same weights; a rerun under
another recipe is refused, naming what changed."""
import functools
import json
import math
import shutil

import pytest
import safetensors.torch
import torch
import yaml

from heron.align import loop as loop_module
from heron.align import resume as resume_module
from heron.align.recipe import load_align_recipe
from heron.align.resume import read_state
from heron.align.run import PLOT_FILE, STATE_FILE, run_alignment
from heron.cli.main import main
from heron.core import ModelConfig, Transformer
from heron.store.atomic import partial_path
from heron.train.checkpoint import CheckpointError, save_model_folder
from heron.train.loop import DivergedError

TIMINGS = {"rollout_tokens_per_s"}  # measured, so they differ from run to run


def align_recipe(folder, base, name, method, **extra):
    settings = {"sft": {}, "rm": {}, "dpo": {},
                "ppo": {"ppo": {"steps": 5, "prompts_per_step": 8, "minibatch": 4}},
                "grpo": {"grpo": {"steps": 5, "prompts_per_step": 2, "group_size": 4}}}[method]
    raw = {"name": name, "out_dir": str(folder / name), "base": str(base), "save_every": 2,
           "data": {"task": {"n": 32}, "max_len": 64}, "fit": {"steps": 5, "batch_size": 4}, **settings, **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_align_recipe(path)


def rows(folder):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def weights(folder):
    return safetensors.torch.load_file(folder / "model" / "model.safetensors")


def killed_after(monkeypatch, step):
    """Make the run die (as Ctrl-C would) once step `step` is done and, where due, saved."""
    done = resume_module.Resumable.step_done

    def step_done(self, at, row, parts):
        done(self, at, row, parts)
        if at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(resume_module.Resumable, "step_done", step_done)


@pytest.fixture(scope="module")
def moe_base(base, tmp_path_factory):
    """The base's tokenizer under a MoE whose router centres its input on a running mean: a
    buffer that training forwards update, which a resumed run must restore too."""
    import heron

    _, tokenizer = heron.load(base)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                    max_seq_len=64, feed_forward=["moe"],
                                    moe={"n_experts": 4, "top_k": 2, "router_centering": True}))
    return save_model_folder(tmp_path_factory.mktemp("moe") / "ckpt", model, tokenizer=tokenizer)


@pytest.mark.parametrize("method, which", [("sft", "dense"), ("rm", "dense"), ("dpo", "dense"), ("ppo", "dense"),
                                           ("grpo", "dense"), ("sft", "moe"), ("dpo", "moe")])
def test_a_killed_run_resumes_exactly(base, moe_base, tmp_path, monkeypatch, method, which):
    start = {"dense": base, "moe": moe_base}[which]
    whole = run_alignment(method, align_recipe(tmp_path, start, "whole", method)).parent
    with monkeypatch.context() as patch:
        killed_after(patch, 3)  # saved at step 2: step 3 is lost and done again
        with pytest.raises(KeyboardInterrupt):
            run_alignment(method, align_recipe(tmp_path, start, "killed", method))
    killed = tmp_path / "killed"
    assert (killed / STATE_FILE).is_file() and not (killed / "model").exists()
    assert len(rows(killed)) == 3
    run_alignment(method, align_recipe(tmp_path, start, "killed", method))
    assert rows(killed) == rows(whole) and len(rows(whole)) == 5
    resumed, unbroken = weights(killed), weights(whole)
    assert resumed.keys() == unbroken.keys()
    assert all(resumed[k].equal(unbroken[k]) for k in unbroken), method  # router_center included
    assert not (killed / STATE_FILE).exists()  # the finished model holds all there is


def test_where_a_run_and_its_inputs_lie_does_not_matter_but_what_they_hold_does(base, tmp_path, monkeypatch,
                                                                                 capsys):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                      {"role": "assistant", "content": w}]}) + "\n"
                             for w in ("a", "b", "c", "d")))
    data = {"file": str(chats), "max_len": 64}
    with monkeypatch.context() as patch:
        killed_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            run_alignment("sft", align_recipe(tmp_path, base, "run", "sft", data=data))
    shutil.move(tmp_path / "run", tmp_path / "moved")  # the run folder moved, the base named by another path
    relative = align_recipe(tmp_path, base.parent / ".." / base.parent.name / base.name, "moved", "sft", data=data)
    chats.write_text(chats.read_text().replace("Say a.", "Say z."))  # the data file edited meanwhile
    with pytest.raises(ValueError, match="cannot continue") as refused:
        run_alignment("sft", relative)
    assert "(data_file: ..." in str(refused.value)  # the data alone: not the folder, not the base's path
    assert "recipe." not in str(refused.value) and "base_weights" not in str(refused.value)
    chats.write_text(chats.read_text().replace("Say z.", "Say a."))
    run_alignment("sft", relative)
    assert [row["step"] for row in rows(tmp_path / "moved")] == [1, 2, 3, 4, 5]


def test_the_demo_starts_a_stage_over_when_a_killed_one_came_from_another_base(base, moe_base, tmp_path,
                                                                                monkeypatch):
    with monkeypatch.context() as patch:
        killed_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            run_alignment("sft", align_recipe(tmp_path, base, "run", "sft"))
    other = align_recipe(tmp_path, moe_base, "run", "sft")
    with pytest.raises(ValueError, match="base_weights"):
        run_alignment("sft", other)
    run_alignment("sft", other, restart_other=True)
    assert [row["step"] for row in rows(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_a_state_left_beside_a_finished_model_is_removed(base, tmp_path):
    recipe = align_recipe(tmp_path, base, "run", "sft")
    run_alignment("sft", recipe)
    (tmp_path / "run" / STATE_FILE).write_bytes(b"left by a kill after the model was written")
    with pytest.raises(FileExistsError, match="model: exists"):
        run_alignment("sft", recipe)
    assert not (tmp_path / "run" / STATE_FILE).exists()


def failing_recipe(folder, base, out):
    """An sft run into `out` that loads its base, then fails before step 1: its data file holds no chats."""
    (folder / "empty.jsonl").write_text("\n\n")
    return align_recipe(folder, base, "run", "sft", out_dir=str(out),
                        data={"file": str(folder / "empty.jsonl"), "max_len": 64})


def test_a_run_that_fails_before_writing_anything_leaves_no_out_dir(base, tmp_path):
    """The folders the run made (out_dir, and a parent that was missing) and its empty metrics file go
    again: a folder left behind would look like a run."""
    out = tmp_path / "runs" / "run"
    with pytest.raises(ValueError, match="empty.jsonl holds no chats"):
        run_alignment("sft", failing_recipe(tmp_path, base, out))
    assert not (tmp_path / "runs").exists()


def test_a_failed_run_keeps_an_out_dir_that_was_there_or_holds_a_state(base, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(ValueError, match="empty.jsonl holds no chats"):
        run_alignment("sft", failing_recipe(tmp_path, base, out))
    assert out.is_dir() and list(out.iterdir()) == []  # the folder stays; the empty metrics file this run made goes
    out.rmdir()
    killed_after(monkeypatch, 2)  # a new folder, left holding a killed run's state: kept, to resume from
    with pytest.raises(KeyboardInterrupt):
        run_alignment("sft", align_recipe(tmp_path, base, "run", "sft"))
    assert (out / STATE_FILE).is_file() and [row["step"] for row in rows(out)] == [1, 2]


def test_a_run_under_another_recipe_is_refused_naming_the_change(base, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        killed_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            run_alignment("sft", align_recipe(tmp_path, base, "run", "sft"))
    path = tmp_path / "run.yaml"
    assert main(["align", "sft", str(path), "--set", "fit.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "recipe.fit.lr: 0.0003, now 0.01" in err and "--no-resume" in err
    assert main(["align", "dpo", str(path)]) == 2
    assert "method: 'sft', now 'dpo'" in capsys.readouterr().err
    assert main(["align", "sft", str(path), "--set", "fit.lr=0.01", "--no-resume"]) == 0
    assert [row["step"] for row in rows(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_a_damaged_state_is_named_and_a_killed_write_is_swept(base, tmp_path):
    recipe = align_recipe(tmp_path, base, "run", "sft")
    out = tmp_path / "run"
    out.mkdir()
    (out / STATE_FILE).write_bytes(b"not a state")
    with pytest.raises(CheckpointError, match=f"{STATE_FILE}: unreadable .*delete it to start the run over"):
        run_alignment("sft", recipe)
    (out / STATE_FILE).unlink()
    leftover = partial_path(out / STATE_FILE)  # a write killed before its rename
    leftover.write_bytes(b"half")
    plot = partial_path(out / PLOT_FILE)  # grpo's and ppo's plot, killed alike
    plot.write_bytes(b"half")
    model = out / ".tmp-model-0123abcd"  # the final model's write, killed before its rename
    model.mkdir()
    (model / "config.json").write_text("{")
    run_alignment("sft", recipe)
    assert not leftover.exists() and not plot.exists() and (out / "model").is_dir()


def test_a_rerun_writes_the_audit_record_a_kill_left_a_finished_model_without(base, tmp_path, monkeypatch):
    from heron.align import run as run_module
    from heron.govern.audit import LOG_ENV, AuditLog

    monkeypatch.setenv(LOG_ENV, str(tmp_path / "audit.db"))
    recipe = align_recipe(tmp_path, base, "run", "sft")
    with monkeypatch.context() as patch:
        def killed(*_args, **_kwargs):
            raise KeyboardInterrupt  # after the model, before its record

        patch.setattr(run_module, "record_event", killed)
        with pytest.raises(KeyboardInterrupt):
            run_alignment("sft", recipe)
    log = AuditLog.open(tmp_path / "audit.db")
    assert log.records(event="align") == []
    with pytest.raises(FileExistsError, match="model: exists .the audit record a kill left it without: now written"):
        run_alignment("sft", recipe)
    [record] = log.records(event="align")
    assert record.outputs["checkpoint"].path == str((tmp_path / "run" / "model").resolve())
    with pytest.raises(FileExistsError, match="model: exists; choose another out_dir"):  # no second record
        run_alignment("sft", recipe)
    assert len(log.records(event="align")) == 1


def test_the_record_a_rerun_writes_names_the_models_own_base_not_the_reruns(base, tmp_path, monkeypatch):
    """The rerun's recipe may name another base: the record names what the model's lineage says made it."""
    from heron.align import run as run_module
    from heron.govern.audit import LOG_ENV, AuditLog

    monkeypatch.setenv(LOG_ENV, str(tmp_path / "audit.db"))
    other = shutil.copytree(base, tmp_path / "other-base")
    with monkeypatch.context() as patch:
        def killed(*_args, **_kwargs):
            raise KeyboardInterrupt  # after the model, before its record

        patch.setattr(run_module, "record_event", killed)
        with pytest.raises(KeyboardInterrupt):
            run_alignment("sft", align_recipe(tmp_path, base, "run", "sft"))
    with pytest.raises(FileExistsError, match="now written"):
        run_alignment("sft", align_recipe(tmp_path, other, "run", "sft"))
    [record] = AuditLog.open(tmp_path / "audit.db").records(event="align")
    assert record.inputs["base"].path == str(base.resolve())


def test_a_model_folder_no_alignment_wrote_is_refused_and_gets_no_record(base, tmp_path, monkeypatch):
    from heron.govern.audit import LOG_ENV, AuditLog

    monkeypatch.setenv(LOG_ENV, str(tmp_path / "audit.db"))
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="model: exists; choose another out_dir"):
        run_alignment("sft", align_recipe(tmp_path, base, "run", "sft"))
    (tmp_path / "run" / "model" / "lineage.json").write_text('{"training": {}}')  # a copied training checkpoint's
    with pytest.raises(FileExistsError, match="model: exists; choose another out_dir"):
        run_alignment("sft", align_recipe(tmp_path, base, "run", "sft"))
    assert AuditLog.open(tmp_path / "audit.db").records(event="align") == []


def test_save_every_zero_saves_nothing(base, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        killed_after(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            run_alignment("sft", align_recipe(tmp_path, base, "run", "sft", save_every=0))
    assert not (tmp_path / "run" / STATE_FILE).exists()


def tensors(value):
    """Every floating tensor in a saved state's nested dicts and lists."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        yield value
    elif isinstance(value, dict | list | tuple):
        for item in value.values() if isinstance(value, dict) else value:
            yield from tensors(item)


def assert_all_kept_is_finite(out):
    """Every metrics row, and the saved state (weights, optimiser, rows) if any, holds finite numbers only;
    no model was written."""
    assert all(math.isfinite(v) for row in rows(out) for v in row.values() if isinstance(v, float))
    state = read_state(out / STATE_FILE)
    if state is not None:
        assert all(torch.isfinite(t).all() for t in tensors(state["parts"]))
        assert all(math.isfinite(v) for row in state["rows"] for v in row.values() if isinstance(v, float))
    assert not (out / "model").exists()


@pytest.mark.parametrize("method, section", [
    ("sft", {"fit": {"steps": 5, "batch_size": 4, "lr": 1e30}}),
    ("dpo", {"fit": {"steps": 5, "batch_size": 4, "lr": 1e30}}),
    ("ppo", {"ppo": {"steps": 5, "prompts_per_step": 4, "minibatch": 4, "epochs": 1, "lr": 1e30}})])
def test_a_diverging_run_stops_before_keeping_anything_of_it(base, tmp_path, method, section):
    """lr 1e30: step 1's update makes the weights ~1e30, still finite (and saved); the forward after it
    overflows, and the run stops before that step's update (PPO: of the policy and the value model)."""
    with pytest.raises(DivergedError, match=r"step 2: the (training loss|gradient norm) is (nan|inf)"):
        run_alignment(method, align_recipe(tmp_path, base, "run", method, save_every=1, **section))
    assert [row["step"] for row in rows(tmp_path / "run")] == [1]
    assert read_state(tmp_path / "run" / STATE_FILE)["step"] == 1
    assert_all_kept_is_finite(tmp_path / "run")


@pytest.mark.parametrize("save_every", [1, 0])
def test_an_update_that_overflows_the_weights_is_neither_saved_nor_written(base, tmp_path, monkeypatch, save_every):
    """lr 1e39 is past fp32's range: the settings refuse it (`check_learning_rate`, switched off here),
    and the fused kernel, train's, lets step 1's update make the weights infinite from a finite loss and
    gradient. Neither the saved state (save_every 1) nor, with none saved, the final model may keep them."""
    monkeypatch.setattr(loop_module, "check_learning_rate", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.optim, "AdamW", functools.partial(torch.optim.AdamW, fused=True))
    recipe = align_recipe(tmp_path, base, "run", "sft", save_every=save_every,
                          fit={"steps": 1, "batch_size": 4, "lr": 1e39})
    with pytest.raises(DivergedError, match=r"step 1: \d+ weight tensor\(s\) hold NaN or infinite values"):
        run_alignment("sft", recipe)
    assert [row["step"] for row in rows(tmp_path / "run")] == [1]
    assert not (tmp_path / "run" / STATE_FILE).exists()
    assert_all_kept_is_finite(tmp_path / "run")
