"""The training loop against its invariants and a known answer."""
from __future__ import annotations

import fcntl
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from heron.train import load_checkpoint, train
from heron.train.loop import LOCK_FILE, DivergedError, Objective, cross_entropy_sum
from heron.train.checkpoint import latest_checkpoint, list_checkpoints
from heron.train.recipe import RecipeError
from heron.train.report import read_metrics
from train_helpers import SMALL_MODEL, dead_pid
from train_workers import Crash, crash_after

HERE = Path(__file__).parent


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(out_dir)).state_dict


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def test_learns_a_repeated_permutation(recipe_factory) -> None:
    recipe = recipe_factory(train={"steps": 60, "eval_every": 30, "ckpt_every": 0, "log_every": 10})
    result = train(recipe)
    # Known answers: a fresh model is near uniform over 32 tokens; the cycle is fully predictable.
    assert result.losses[0] == pytest.approx(math.log(32), abs=0.3)
    assert result.losses[-1] < 0.05
    assert result.val_losses[-1][1] < 0.05
    out = Path(recipe.out_dir)
    assert (out / "loss.png").stat().st_size > 0
    assert [row["step"] for row in read_metrics(out)] == [10, 20, 30, 40, 50, 60]
    assert [p.name for p in list_checkpoints(out)] == ["step_00000060"]


def test_accumulation_1x8_equals_8x1(recipe_factory) -> None:
    one = train(recipe_factory("one", train={"steps": 4, "grad_accum": 1}))
    eight = train(recipe_factory("eight", train={"steps": 4, "grad_accum": 8}))
    assert torch.allclose(torch.tensor(one.losses), torch.tensor(eight.losses), rtol=1e-5, atol=0)
    assert one.val_losses[-1][1] == pytest.approx(eight.val_losses[-1][1], rel=1e-5)
    # Adam's update barely sees the gradient's scale, and clipping caps it: the norm shows it whole.
    norms = [torch.tensor([row["grad_norm"] for row in r.history]) for r in (one, eight)]
    assert torch.allclose(*norms, rtol=1e-4, atol=0), norms
    # Adam steps a weight by up to lr (1e-2) however small its gradient, so a gradient near zero that
    # the two batchings round differently moves it by a rounding of lr: one of 8,192 by 1.7e-6 after
    # 4 steps. atol 1e-5 is a thousandth of a step; a wrong accumulation moves many by ~lr.
    a, b = final_weights(one.out_dir), final_weights(eight.out_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_clipping_scales_the_gradient_and_the_logged_norm_is_the_one_before(recipe_factory) -> None:
    """On Adam's first step the update is lr * g / (|g| + eps); a gradient clipped by c = clip / (G + 1e-6)
    (torch's clip_grad_norm_) gives lr * g / (|g| + eps / c): the same step as no clipping with eps / c."""
    clip, eps, warm = 1e-4, 1e-6, {"warmup_steps": 0}
    clipped = train(recipe_factory("clipped", schedule=warm, optim={"eps": eps}, train={"steps": 1, "clip_norm": clip}))
    [norm] = [row["grad_norm"] for row in clipped.history]
    assert norm > 100 * clip  # so clipping is not a no-op
    unclipped = train(recipe_factory("unclipped", schedule=warm, optim={"eps": eps * (norm + 1e-6) / clip},
                                     train={"steps": 1, "clip_norm": None}))
    assert unclipped.history[0]["grad_norm"] == pytest.approx(norm, rel=1e-6)  # the norm before clipping
    a, b = final_weights(clipped.out_dir), final_weights(unclipped.out_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_fused_head_loss_trains_as_the_loss_over_the_logits(recipe_factory) -> None:
    """The default objective runs the model's own head loss (core/head_loss.py); the same
    cross-entropy handed in as an Objective goes through the logits. Same run, to fp32 rounding."""
    settings = {"train": {"steps": 6, "eval_every": 3}}
    fused = train(recipe_factory("fused", **settings))
    plain = train(recipe_factory("plain", **settings), token_loss=Objective.of(cross_entropy_sum))
    assert torch.allclose(torch.tensor(fused.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    assert [s for s, _ in fused.val_losses] == [s for s, _ in plain.val_losses] == [3, 6]
    for (_, a), (_, b) in zip(fused.val_losses, plain.val_losses):
        assert a == pytest.approx(b, rel=1e-5)
    # Adam steps every weight by up to lr (1e-2) whatever its gradient's size, so a gradient near
    # zero that rounds differently moves a weight by a rounding of lr: on an AVX-512 host, one of
    # 8,192 weights by 2e-6 after 6 steps. atol 1e-5 is a thousandth of a step; a wrong loss moves many by ~lr.
    a, b = final_weights(fused.out_dir), final_weights(plain.out_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_tokens_per_s_times_the_training_step_not_validation(recipe_factory, monkeypatch) -> None:
    """A fake clock: every reading advances it 1 s, a validation pass 1000 s. The
    speed logged at a validation step must be the step's own, as at any other."""
    from heron.train import loop

    now = [0.0]

    def perf_counter() -> float:
        now[0] += 1.0
        return now[0]

    def slow_evaluate(run) -> float:
        now[0] += 1000.0
        return real_evaluate(run)

    real_evaluate = loop.evaluate
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(loop, "evaluate", slow_evaluate)
    recipe = recipe_factory(train={"steps": 4, "eval_every": 2, "log_every": 1, "ckpt_every": 0})
    train(recipe)
    rows = read_metrics(Path(recipe.out_dir))
    tokens_per_step = recipe.train.batch_size * recipe.data.seq_len
    assert [("val_loss" in r, r["tokens_per_s"]) for r in rows] == [
        (False, tokens_per_step), (True, tokens_per_step), (False, tokens_per_step), (True, tokens_per_step)]


def test_resume_after_a_crash_equals_the_unbroken_run(recipe_factory) -> None:
    settings = {"train": {"steps": 8, "ckpt_every": 3, "eval_every": 2}}
    unbroken = train(recipe_factory("unbroken", **settings))
    recipe = recipe_factory("broken", **settings)
    with pytest.raises(Crash):
        train(recipe, callbacks=[crash_after(5)])  # checkpoint at 3; steps 4 and 5 are lost
    assert latest_checkpoint(recipe.out_dir).name == "step_00000003"
    resumed = train(recipe)
    assert resumed.history == unbroken.history  # every loss, lr, grad norm and val loss, bit for bit
    a, b = final_weights(unbroken.out_dir), final_weights(resumed.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(read_metrics(resumed.out_dir)) == without_timing(read_metrics(unbroken.out_dir))
    assert all("tokens_per_s" in row for row in read_metrics(resumed.out_dir))  # the kept rows keep their timing
    # A finished run resumed again does nothing and reports the same, its rows untouched.
    logged = read_metrics(resumed.out_dir)
    assert train(recipe).history == unbroken.history
    assert read_metrics(resumed.out_dir) == logged


def test_resume_after_sigkill_mid_save(recipe_factory, tmp_path: Path) -> None:
    settings = {"train": {"steps": 8, "ckpt_every": 3, "eval_every": 2}}
    unbroken = train(recipe_factory("unbroken", **settings))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), str(HERE)])}
    proc = subprocess.run([sys.executable, str(HERE / "train_workers.py"), "kill-mid-save", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # SIGKILL, during the second save (step 6)
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers and latest_checkpoint(out).name == "step_00000003"
    resumed = train(recipe_factory("killed", **settings))
    assert resumed.history == unbroken.history
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())


def test_resume_refuses_a_different_run(recipe_factory) -> None:
    train(recipe_factory("run", train={"steps": 2}))
    with pytest.raises(RecipeError, match=r"model: .* holds a run this recipe cannot continue \(model.overrides.d_model: "
                                          r"32, now 64; .*\); .* --no-resume .* to delete that run's checkpoints"):
        train(recipe_factory("run", train={"steps": 2}, model={"preset": "test", "overrides": {"d_model": 64}}))
    with pytest.raises(RecipeError, match="train.seed"):
        train(recipe_factory("run", train={"steps": 2, "seed": 1}))
    fresh = train(recipe_factory("run", train={"steps": 2, "seed": 1}), resume=False)
    assert fresh.step == 2 and [p.name for p in list_checkpoints(fresh.out_dir)] == ["step_00000002"]


def test_plain_training_refuses_to_resume_a_distillation(recipe_factory, tmp_path: Path) -> None:
    """A run whose lineage names a teacher goes on only under it: plain training would write checkpoints
    whose lineage had lost the teacher. Refused before anything in the folder changes."""
    teacher = {"distillation": {"teacher": "runs/teacher/checkpoints/step_00000060", "alpha": 0.5}}
    train(recipe_factory("run", train={"steps": 2}), lineage=teacher)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(RecipeError, match=r"^distillation: .*run holds a distillation run \(step_00000002's lineage "
                                          r"records it\).* resume it with `heron compress distill`"):
        train(recipe_factory("run", train={"steps": 4}))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]
    resumed = train(recipe_factory("run", train={"steps": 4}), lineage=teacher)  # under its teacher: resumed
    assert resumed.step == 4 and load_checkpoint(resumed.checkpoint).lineage["distillation"] == teacher["distillation"]


def test_lineage_records_the_run(recipe_factory) -> None:
    result = train(recipe_factory(train={"steps": 2}))
    lineage = load_checkpoint(result.checkpoint).lineage
    assert lineage["step"] == 2 and lineage["seed"] == 0
    assert lineage["tokens_seen"] == 2 * 8 * 16
    assert lineage["data"]["source"] == "synthetic" and len(lineage["data"]["sha256"]) == 64
    assert lineage["recipe"]["train"]["steps"] == 2
    assert lineage["metrics"]["train_loss"] == result.losses[-1]
    assert lineage["metrics"]["val_loss"] == result.val_losses[-1][1]


MOE_KEYS = {"moe_balance_loss", "moe_z_loss", "moe_max_load_over_fair", "moe_dropped_fraction", "moe_router_entropy"}


def test_moe_routing_is_logged_apart_from_the_loss_and_resumes_exactly(recipe_factory) -> None:
    # Centring's running mean is model state: evaluation routes on it, so a resume that lost it would differ.
    moe = {"feed_forward": ["dense", "moe"],
           "moe": {"n_experts": 4, "top_k": 2, "capacity_factor": 1.0, "router_centering": True}}
    settings = {"model": {"preset": "test", "overrides": {**SMALL_MODEL, **moe}},
                "train": {"steps": 6, "ckpt_every": 3, "eval_every": 3, "grad_accum": 2}}
    unbroken = train(recipe_factory("unbroken", **settings))
    for row in unbroken.history:
        assert MOE_KEYS <= set(row)
        assert row["moe_balance_loss"] > 0 and row["moe_z_loss"] > 0
        assert 1 <= row["moe_max_load_over_fair"] <= 4 and 0 <= row["moe_dropped_fraction"] < 1
        assert 0 < row["moe_router_entropy"] <= math.log(4)
    assert all(MOE_KEYS <= set(row) for row in read_metrics(unbroken.out_dir))
    recipe = recipe_factory("broken", **settings)
    with pytest.raises(Crash):
        train(recipe, callbacks=[crash_after(4)])
    assert train(recipe).history == unbroken.history  # routing statistics too, bit for bit
    dense = train(recipe_factory("dense", train={"steps": 1}))
    assert set(dense.history[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "val_loss"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_one_names_the_field_before_any_work(recipe_factory, tmp_path: Path) -> None:
    recipe = recipe_factory("cuda-run", train={"steps": 2, "device": "cuda"})
    with pytest.raises(RecipeError, match="train.device: 'cuda', but torch sees no CUDA device"):
        train(recipe)
    assert not (tmp_path / "cuda-run").exists()


def test_a_refused_resume_leaves_the_run_folder_as_it_was(recipe_factory, tmp_path: Path) -> None:
    train(recipe_factory("run", train={"steps": 4}))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(RecipeError, match="train.seed"):
        train(recipe_factory("run", train={"steps": 6, "seed": 1}))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before  # recipe.yaml too


def test_resuming_a_finished_run_or_under_another_length_is_said(recipe_factory) -> None:
    train(recipe_factory("run", train={"steps": 4}))
    with pytest.warns(UserWarning, match="already holds step 4, and train.steps is 4: nothing to train"):
        assert train(recipe_factory("run", train={"steps": 4})).step == 4
    with pytest.warns(UserWarning, match="at step 4 under another train.steps, schedule or optim than it began with"):
        assert train(recipe_factory("run", train={"steps": 6})).step == 6


def test_a_resumed_run_takes_its_recipes_optimizer_settings_not_the_checkpoints(recipe_factory, monkeypatch) -> None:
    """Loading the optimizer's state puts back the saved groups' settings too: the resumed run
    must follow the recipe it is given (and records), keeping only the moment estimates."""
    import heron.train.loop as loop
    from heron.train.optim import build_optimizer as loop_build

    built = []
    monkeypatch.setattr(loop, "build_optimizer", lambda *args: built.append(loop_build(*args)) or built[-1])
    train(recipe_factory("run", train={"steps": 2},
                         optim={"weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "fused": True}))
    new = {"weight_decay": 0.02, "betas": [0.5, 0.6], "eps": 1e-3, "fused": False}
    with pytest.warns(UserWarning, match=r"the new settings \(learning rate, weight decay, betas, eps\) apply"):
        train(recipe_factory("run", train={"steps": 4}, optim=new))
    decay, no_decay = built[-1].param_groups
    for group, weight_decay in ((decay, 0.02), (no_decay, 0.0)):
        assert (group["weight_decay"], tuple(group["betas"]), group["eps"]) == (weight_decay, (0.5, 0.6), 1e-3)
        assert not group["fused"]  # None: AdamW's own choice, never the fused kernel the first run asked for
    assert built[-1].state  # the moment estimates did carry over


@pytest.mark.parametrize("lr, caught", [(1e30, r"the (training loss|gradient norm) is (nan|inf)"),
                                        (1e39, r"\d+ weight tensor\(s\) hold NaN or infinite values")])
def test_a_diverging_run_stops_before_keeping_anything_of_it(recipe_factory, tmp_path: Path, lr, caught) -> None:
    """1e30 overflows the next forward (caught before the update); 1e39 overflows the update
    itself, past fp32's range (caught before the checkpoint). Either way every row and every
    checkpoint kept is finite, and the latest checkpoint is a step the run did finish."""
    with pytest.raises(DivergedError, match=rf"step \d+: {caught}"):
        train(recipe_factory("diverged", optim={"lr": lr}, train={"steps": 8, "ckpt_every": 1, "eval_every": 0}))
    rows = read_metrics(tmp_path / "diverged")
    assert rows and all(math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) for row in rows)
    kept = list_checkpoints(tmp_path / "diverged")
    assert {int(path.name.removeprefix("step_")) for path in kept} <= {row["step"] for row in rows}
    for path in kept:
        assert all(torch.isfinite(t).all() for t in load_checkpoint(path).state_dict.values())


def test_a_parallel_run_without_a_launcher_is_named(recipe_factory) -> None:
    with pytest.raises(RecipeError, match="train.parallel: 'ddp' needs a launcher: torchrun"):
        train(recipe_factory("no-launcher", train={"parallel": "ddp"}))


def test_a_warm_up_that_fills_the_run_is_warned_of(recipe_factory) -> None:
    with pytest.warns(UserWarning, match=r"schedule.warmup_steps 2 is not below train.steps 2: the learning rate "
                                         r"climbs for the whole run and never reaches optim.lr"):
        train(recipe_factory("short", train={"steps": 2}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(recipe_factory("long", train={"steps": 3}))
    assert not [w for w in caught if "warmup_steps" in str(w.message)]


def test_a_finished_run_whose_audit_record_was_lost_gets_it_on_a_rerun(recipe_factory, monkeypatch) -> None:
    """Killed between its last checkpoint and the audit record, the run is finished but unrecorded:
    a rerun (nothing left to train) writes the record, once."""
    import heron.train.loop as loop
    from heron.govern.audit import audit_log
    from heron.govern.digest import folder_sha256

    recipe = recipe_factory(train={"steps": 2, "ckpt_every": 2, "eval_every": 0})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(loop, "record_event", killed)
        with pytest.raises(KeyboardInterrupt):
            train(recipe)
    last = latest_checkpoint(recipe.out_dir)
    assert audit_log().produced(folder_sha256(last)) == []
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "nothing to train"
            train(recipe)
        records = audit_log().produced(folder_sha256(last))
        assert [r.event for r in records] == ["train"]


def test_a_second_run_into_a_folder_in_use_is_refused_at_once(recipe_factory, tmp_path: Path) -> None:
    """Another open of the lock file stands in for another process (flock locks belong to an
    open file description): held for the whole run, released at its end, and a refused run
    writes nothing."""
    run = tmp_path / "run"

    def lock(file) -> None:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def held_while_training(row: dict) -> None:
        with open(run / LOCK_FILE) as other, pytest.raises(BlockingIOError):
            lock(other)

    train(recipe_factory("run", train={"steps": 4}), callbacks=[held_while_training])  # a new folder: locked as made
    before = read_metrics(run)
    with open(run / LOCK_FILE, "a+") as other:
        lock(other)  # released when the run ended
        other.truncate(0)
        other.write("4242\n")
        other.flush()
        with pytest.raises(RecipeError, match=re.escape(f"out_dir: run folder {run} is in use by process 4242")):
            train(recipe_factory("run", train={"steps": 4}))
    assert read_metrics(run) == before and latest_checkpoint(run).name == "step_00000004"
    assert train(recipe_factory("run", train={"steps": 4}), resume=False).step == 4  # the file left: blocks nothing


def test_a_run_that_finds_its_new_folder_written_meanwhile_refuses_it(recipe_factory, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """A new folder is locked only when the run has built its model: another run may have made it,
    trained and ended there meanwhile. That run's checkpoints and metrics are kept, not wiped."""
    from heron.train import loop

    run, seed_everything = tmp_path / "run", loop._seed_everything

    def other_run_meanwhile(seed: int) -> None:  # after this run looked for a checkpoint, before its lock
        monkeypatch.setattr(loop, "_seed_everything", seed_everything)
        train(recipe_factory("run", train={"steps": 4}))
        seed_everything(seed)

    monkeypatch.setattr(loop, "_seed_everything", other_run_meanwhile)
    with pytest.raises(RecipeError, match=re.escape(f"out_dir: another run wrote into {run} meanwhile; rerun")):
        train(recipe_factory("run", train={"steps": 2}))
    assert len(read_metrics(run)) == 4 and latest_checkpoint(run).name == "step_00000004"


def test_what_killed_runs_left_in_the_run_folder_is_swept_at_start(recipe_factory, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(recipe_factory("run", train={"steps": 4}))
    shutil.copytree(run / "checkpoints", run / f".trash-checkpoints-{dead_pid()}-0123abcd")  # --no-resume, killed
    (run / ".loss.png.0123456789ab.partial").write_bytes(b"\x89PNG")  # killed while plotting
    (run / ".metrics.jsonl.0123456789ab.partial").write_text('{"step": 1')
    train(recipe_factory("run", train={"steps": 4}), resume=False)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [LOCK_FILE]


def test_under_its_lock_a_run_sweeps_leftovers_whose_pid_is_now_a_live_process(recipe_factory,
                                                                              tmp_path: Path) -> None:
    """A restarted container's run has the pid (1) the killed one had: its temps are swept all the same."""
    run = tmp_path / "run"
    train(recipe_factory("run", train={"steps": 4}))
    (run / "checkpoints" / f".tmp-step_00000008-{os.getpid()}-0123abcd").mkdir()  # killed mid-save
    shutil.copytree(run / "checkpoints", run / f".trash-checkpoints-{os.getpid()}-0123abcd")
    train(recipe_factory("run", train={"steps": 6}))
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [LOCK_FILE]


def test_hidden_files_in_checkpoints_do_not_stop_a_resume(recipe_factory, tmp_path: Path) -> None:
    """A pointer file's write killed midway (filesystems without symlinks), a file browser's .DS_Store."""
    run = tmp_path / "run"
    train(recipe_factory("run", train={"steps": 4}))
    (run / "checkpoints" / ".latest.0123456789ab.partial").write_text("step_00000004\n")
    (run / "checkpoints" / ".DS_Store").write_bytes(b"")
    assert train(recipe_factory("run", train={"steps": 6})).step == 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")) == [".DS_Store"]


def test_a_folder_that_is_not_a_run_is_refused_and_left_as_it_was(recipe_factory, tmp_path: Path) -> None:
    """A user's files with a run's names (metrics.jsonl, recipe.yaml, checkpoints/) are not a run's:
    refused before any work, with and without --no-resume, and nothing is written there. Other files
    may lie beside a run (the README's runs/mine/data shards): kept, and the run resumes beside them."""
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "metrics.jsonl").write_text('{"mine": 1}\n')
    (mine / "recipe.yaml").write_text("my recipe\n")
    (mine / "checkpoints" / "my_model.pt").write_text("my weights")

    def files(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    before = files(mine)
    for resume in (True, False):
        with pytest.raises(RecipeError, match=re.escape(f"out_dir: {mine} holds checkpoints/my_model.pt, not a "
                                                        "checkpoint of a training run; choose another out_dir")):
            train(recipe_factory("mine", train={"steps": 2}), resume=resume)
        assert files(mine) == before  # not even the lock file
    (mine / "checkpoints" / "my_model.pt").unlink()
    with pytest.raises(RecipeError, match=re.escape("holds checkpoints, metrics.jsonl, recipe.yaml but no "
                                                    "recipe.yaml that heron train wrote: not a run folder")):
        train(recipe_factory("mine", train={"steps": 2}), resume=False)
    assert (mine / "metrics.jsonl").read_text() == '{"mine": 1}\n'
    beside = tmp_path / "beside"
    (beside / "data").mkdir(parents=True)
    (beside / "notes.txt").write_text("mine")
    train(recipe_factory("beside", train={"steps": 2}))
    assert latest_checkpoint(train(recipe_factory("beside", train={"steps": 3})).out_dir).name == "step_00000003"
    assert (beside / "notes.txt").read_text() == "mine" and (beside / "data").is_dir()


def test_a_run_folder_in_the_shard_folder_is_refused(tmp_path: Path) -> None:
    from train_helpers import small_recipe

    shards = tmp_path / "shards"
    for out_dir in (shards, shards / "run"):
        recipe = small_recipe(out_dir, data={"synthetic": None, "shards": str(shards), "seq_len": 16})
        with pytest.raises(RecipeError, match=re.escape(f"out_dir: {out_dir} is in the shard folder data.shards")):
            train(recipe)
    assert not shards.exists()


def test_no_resume_never_deletes_a_file_heron_did_not_write_in_checkpoints(recipe_factory, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(recipe_factory("run", train={"steps": 2}))
    (run / "checkpoints" / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match=re.escape(f"out_dir: {run} holds checkpoints/notes.txt, not a checkpoint")):
        train(recipe_factory("run", train={"steps": 2}), resume=False)
    assert (run / "checkpoints" / "notes.txt").read_text() == "mine" and latest_checkpoint(run).name == "step_00000002"


def test_checkpoints_record_the_cpu_gemm_and_a_resume_under_another_warns(recipe_factory, monkeypatch) -> None:
    """Where the fp32 products go through other libraries (core/gemm.py) than when a run was saved, it
    rounds otherwise from the resume on: it goes on, but says that it will not repeat the unbroken run."""
    from heron.core import gemm
    from heron.train import loop
    from heron.train.checkpoint import load_checkpoint

    recipe = recipe_factory("run", train={"steps": 2})
    train(recipe)
    saved = load_checkpoint(latest_checkpoint(recipe.out_dir)).lineage["cpu_gemm"]
    assert saved == gemm.cpu_gemm_libraries() and set(saved.values()) <= set(gemm.BACKENDS)
    with warnings.catch_warnings(record=True) as caught:  # the same libraries: nothing said of them
        warnings.simplefilter("always")
        train(recipe_factory("run", train={"steps": 3}))  # (a longer run: that is said)
    assert caught and not [w for w in caught if "libraries" in str(w.message)]
    other = "mkl" if saved["products"] == "onednn" else "onednn"
    monkeypatch.setattr(loop, "cpu_gemm_libraries", lambda: {"products": other, "weight_gradients": other})
    with pytest.warns(UserWarning, match=rf"resuming .*run at step 3 on a CPU whose fp32 products go through other "
                                         rf"libraries .*products {saved['products']} -> {other}.* will not repeat an "
                                         rf"unbroken run bit for bit"):
        resumed = train(recipe_factory("run", train={"steps": 4}))
    assert resumed.step == 4
