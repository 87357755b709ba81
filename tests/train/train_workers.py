"""Programs the training tests run in subprocesses.

    python train_workers.py kill-mid-save OUT_DIR
        train the small recipe; SIGKILL ourselves in the middle of writing the
        second checkpoint (everything but lineage.json already in the temp folder).
    torchrun --nproc_per_node 2 train_workers.py distributed OUT_ROOT
        train the small recipe with DDP into OUT_ROOT/ddp, then FSDP into OUT_ROOT/fsdp;
        then FSDP again into OUT_ROOT/fsdp-resumed, crashing after step 4 and resuming;
        then a MoE with DDP and FSDP into OUT_ROOT/moe-ddp and OUT_ROOT/moe-fsdp;
        then distillation (fused loss and hidden term) into OUT_ROOT/distill-ddp and -fsdp;
        then FSDP with micro-batches of one row into OUT_ROOT/fsdp-accum4.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from heron.compress.distill import distillation_objective
from heron.core import Transformer
from heron.train import checkpoint, train
from heron.train.loop import Objective
from heron.train.recipe import TrainRecipe, model_config
from train_helpers import SMALL_MODEL, small_recipe

torch.set_num_threads(1)
DISTRIBUTED_SETTINGS = {"train": {"steps": 6, "ckpt_every": 3, "eval_every": 3, "batch_size": 8, "grad_accum": 2}}
# A MoE with router centring: each process routes on the global batch's mean and balances on its
# loads, so the runs match one process exactly only without accumulation (core/moe.py).
MOE_SETTINGS = {
    "model": {"preset": "test", "overrides": {**SMALL_MODEL, "feed_forward": ["moe"],
                                              "moe": {"n_experts": 4, "top_k": 2, "router_centering": True}}},
    "train": {**DISTRIBUTED_SETTINGS["train"], "grad_accum": 1},
}


DISTILL_SETTINGS = {"train": {**DISTRIBUTED_SETTINGS["train"], "grad_accum": 1}}
UNEVEN_SETTINGS = {"train": {**DISTRIBUTED_SETTINGS["train"], "grad_accum": 4, "parallel": "fsdp"}}


def distillation(recipe: TrainRecipe) -> Objective:
    """Distillation from a fixed random teacher of the recipe's shape: the fused logit
    loss inside the student's forward, and the hidden term with its projection."""
    config = model_config(recipe, recipe.data.synthetic.vocab_size)
    torch.manual_seed(1234)
    teacher = Transformer(config.replace(d_model=48, n_heads=3, n_kv_heads=1))
    return distillation_objective(teacher, config, {0: 0, 1: 1}, temperature=2.0, alpha=0.5, hidden_weight=0.5,
                                  seed=recipe.train.seed)


def kill_mid_save(out_dir: Path) -> None:
    real_manifest = checkpoint._manifest
    calls = []

    def manifest_then_die(folder: Path):
        calls.append(folder)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_manifest(folder)

    checkpoint._manifest = manifest_then_die
    train(small_recipe(out_dir, train={"steps": 8, "ckpt_every": 3, "eval_every": 2}))


def distributed(out_root: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")  # owned here, so train() reuses it for both runs
    world = dist.get_world_size()
    for parallel in ("ddp", "fsdp"):
        settings = {"train": {**DISTRIBUTED_SETTINGS["train"], "parallel": parallel}}
        result = train(small_recipe(out_root / parallel, world_size=world, **settings))
        (out_root / f"{parallel}-rank{dist.get_rank()}-is-main").write_text(str(result.is_main))
    resumed = small_recipe(out_root / "fsdp-resumed", world_size=world, **settings)
    try:
        train(resumed, callbacks=[crash_after(4)])  # every rank stops after step 4; checkpoint at 3
    except Crash:
        pass
    train(resumed)
    for parallel in ("ddp", "fsdp"):
        settings = {**MOE_SETTINGS, "train": {**MOE_SETTINGS["train"], "parallel": parallel}}
        train(small_recipe(out_root / f"moe-{parallel}", world_size=world, **settings))
    for parallel in ("ddp", "fsdp"):
        recipe = small_recipe(out_root / f"distill-{parallel}", world_size=world,
                              train={**DISTILL_SETTINGS["train"], "parallel": parallel})
        train(recipe, token_loss=distillation(recipe))
    # micro-batches of 1 row: the 7-row validation batch gives ranks 4 and 3 forwards unless evened out
    train(small_recipe(out_root / "fsdp-accum4", world_size=world, **UNEVEN_SETTINGS))
    dist.destroy_process_group()


class Crash(Exception):
    """Stands in for the process dying between two steps."""


def crash_after(step: int):
    def callback(row: dict) -> None:
        if row["step"] == step:
            raise Crash(f"killed after step {step}")
    return callback


if __name__ == "__main__":
    command, target = sys.argv[1], Path(sys.argv[2])
    {"kill-mid-save": kill_mid_save, "distributed": distributed}[command](target)
