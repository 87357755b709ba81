"""Two processes (DDP, FSDP2 over gloo) against one process on the same global batch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heron.core.head_loss import IGNORE_INDEX
from heron.train import load_checkpoint, load_model_folder, train
from heron.train.loop import rank_rows
from heron.train.checkpoint import latest_checkpoint, list_checkpoints, remove_folder
from heron.train.report import read_metrics
from train_helpers import small_recipe
from train_workers import DISTILL_SETTINGS, DISTRIBUTED_SETTINGS, MOE_SETTINGS, UNEVEN_SETTINGS, distillation

HERE = Path(__file__).parent
IDS = torch.arange(16).view(2, 8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One torchrun launch with 2 processes does the DDP run, then the FSDP run."""
    root = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), str(HERE)]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "train_workers.py"), "distributed", str(root)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train(small_recipe(root / "single", **DISTRIBUTED_SETTINGS))
    train(small_recipe(root / "moe-single", **MOE_SETTINGS))
    distill_single = small_recipe(root / "distill-single", **DISTILL_SETTINGS)
    train(distill_single, token_loss=distillation(distill_single))
    train(small_recipe(root / "accum4-single", **{"train": {**UNEVEN_SETTINGS["train"], "parallel": "none"}}))
    return root


def curve(out_dir: Path, key: str) -> torch.Tensor:
    return torch.tensor([row[key] for row in read_metrics(out_dir) if key in row], dtype=torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_curve(runs: Path, parallel: str) -> None:
    single, multi = runs / "single", runs / parallel
    for key in ("loss", "val_loss", "grad_norm"):
        torch.testing.assert_close(curve(multi, key), curve(single, key), rtol=1e-5, atol=0, msg=key)
    assert len(curve(multi, "loss")) == DISTRIBUTED_SETTINGS["train"]["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_only_rank_0_speaks_for_the_run(runs: Path, parallel: str) -> None:
    assert [(runs / f"{parallel}-rank{r}-is-main").read_text() for r in (0, 1)] == ["True", "False"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_moe_trained_by_two_processes_follows_the_one_process_curve(runs: Path, parallel: str) -> None:
    """Router centring and the balancing loss see the global batch, not each process's half."""
    single, multi = runs / "moe-single", runs / f"moe-{parallel}"
    for key in ("loss", "val_loss", "grad_norm", "moe_balance_loss", "moe_z_loss", "moe_max_load_over_fair"):
        torch.testing.assert_close(curve(multi, key), curve(single, key), rtol=1e-5, atol=0, msg=key)
    model, _ = load_model_folder(multi)
    reference, _ = load_model_folder(single)
    torch.testing.assert_close(model.blocks[0].mlp.router_center, reference.blocks[0].mlp.router_center)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_distillation_by_two_processes_follows_the_one_process_curve(runs: Path, parallel: str) -> None:
    """The fused loss runs inside the wrapped student's forward, its head gathered; the
    hidden term's projection is averaged over processes as the model's gradients are."""
    single, multi = runs / "distill-single", runs / f"distill-{parallel}"
    for key in ("loss", "val_loss", "grad_norm"):
        torch.testing.assert_close(curve(multi, key), curve(single, key), rtol=1e-5, atol=0, msg=key)
    projection = load_checkpoint(multi).trainer_state["objective"]["params"]["weight"]
    reference = load_checkpoint(single).trainer_state["objective"]["params"]["weight"]
    torch.testing.assert_close(projection, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_multi_process_checkpoint_loads_into_one_process(runs: Path, parallel: str) -> None:
    model, _ = load_model_folder(runs / parallel)
    reference, _ = load_model_folder(runs / "single")
    assert model.lm_head.weight is model.embed.weight
    lineage = load_checkpoint(runs / parallel).lineage
    assert (lineage["world_size"], lineage["parallel"]) == (2, parallel)
    assert lineage["energy"]["source"].endswith("summed over 2 processes")  # not rank 0's part alone
    torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_resume_equals_the_unbroken_fsdp_run(runs: Path) -> None:
    resumed, unbroken = read_metrics(runs / "fsdp-resumed"), read_metrics(runs / "fsdp")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(unbroken)


@pytest.mark.slow
def test_one_process_resumes_an_fsdp_run(runs: Path, tmp_path: Path) -> None:
    """Optimizer state is saved whole and keyed by name, so the layout may change on resume."""
    copy = tmp_path / "fsdp"
    shutil.copytree(runs / "fsdp", copy, symlinks=True)
    remove_folder(latest_checkpoint(copy))  # back to the step-3 checkpoint written by FSDP
    assert [p.name for p in list_checkpoints(copy)] == ["step_00000003"]
    resumed = train(small_recipe(copy, **DISTRIBUTED_SETTINGS))
    torch.testing.assert_close(torch.tensor(resumed.losses, dtype=torch.float64), curve(runs / "single", "loss"),
                               rtol=1e-5, atol=0)


@pytest.mark.slow
def test_an_uneven_validation_batch_is_scored_as_one_process_scores_it(runs: Path) -> None:
    """A 7-row validation batch over 2 FSDP processes in micro-batches of one row: 4 forwards on
    one rank and 3 on the other hung at the gathers; evened out, the loss is one process's."""
    torch.testing.assert_close(curve(runs / "fsdp-accum4", "val_loss"), curve(runs / "accum4-single", "val_loss"),
                               rtol=1e-5, atol=0)


def test_every_window_of_a_validation_batch_is_scored_once_whatever_the_processes() -> None:
    x, y = torch.arange(3 * 4).view(3, 4), torch.arange(3 * 4).view(3, 4) + 100
    for world in (1, 2, 3, 4, 5):
        shares = [rank_rows(x, y, rank, world) for rank in range(world)]
        assert len({share[0].shape[0] for share in shares}) == 1  # as many forwards on every rank
        scored = torch.cat([ys[ys[:, 0] != IGNORE_INDEX] for _, ys in shares])
        assert torch.equal(scored, y), world
