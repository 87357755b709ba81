"""A killed alignment run goes on from its last saved state exactly as the unbroken run
would have: the same metrics rows and, bit for bit, the same weights; a rerun under
another recipe is refused, naming what changed."""
import json

import pytest
import safetensors.torch
import yaml

from heron.align import resume as resume_module
from heron.align.recipe import load_align_recipe
from heron.align.run import STATE_FILE, run_alignment
from heron.cli.main import main
from heron.train.checkpoint import CheckpointError

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


@pytest.mark.parametrize("method", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_a_killed_run_resumes_exactly(base, tmp_path, monkeypatch, method):
    whole = run_alignment(method, align_recipe(tmp_path, base, "whole", method)).parent
    with monkeypatch.context() as patch:
        killed_after(patch, 3)  # saved at step 2: step 3 is lost and done again
        with pytest.raises(KeyboardInterrupt):
            run_alignment(method, align_recipe(tmp_path, base, "killed", method))
    killed = tmp_path / "killed"
    assert (killed / STATE_FILE).is_file() and not (killed / "model").exists()
    assert len(rows(killed)) == 3
    run_alignment(method, align_recipe(tmp_path, base, "killed", method))
    assert rows(killed) == rows(whole) and len(rows(whole)) == 5
    resumed, unbroken = weights(killed), weights(whole)
    assert resumed.keys() == unbroken.keys()
    assert all(resumed[k].equal(unbroken[k]) for k in unbroken), method
    assert not (killed / STATE_FILE).exists()  # the finished model holds all there is


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
    leftover = out / f".{STATE_FILE}.0123abcd.tmp"  # a write killed before its rename
    leftover.write_bytes(b"half")
    run_alignment("sft", recipe)
    assert not leftover.exists() and (out / "model").is_dir()


def test_save_every_zero_saves_nothing(base, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        killed_after(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            run_alignment("sft", align_recipe(tmp_path, base, "run", "sft", save_every=0))
    assert not (tmp_path / "run" / STATE_FILE).exists()
