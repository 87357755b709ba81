"""Programs the training tests run in subprocesses.

    python train_workers.py kill-mid-save OUT_DIR
        train the small recipe; SIGKILL ourselves in the middle of writing the
        second checkpoint (everything but lineage.json already in the temp folder).
    torchrun --nproc_per_node 2 train_workers.py distributed OUT_ROOT
        train the small recipe with DDP into OUT_ROOT/ddp, then FSDP into OUT_ROOT/fsdp;
        then FSDP again into OUT_ROOT/fsdp-resumed, crashing after step 4 and resuming.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from heron.train import checkpoint, train
from train_helpers import small_recipe

torch.set_num_threads(1)
DISTRIBUTED_SETTINGS = {"train": {"steps": 6, "ckpt_every": 3, "eval_every": 3, "batch_size": 8, "grad_accum": 2}}


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
        train(small_recipe(out_root / parallel, world_size=world, **settings))
    resumed = small_recipe(out_root / "fsdp-resumed", world_size=world, **settings)
    try:
        train(resumed, callbacks=[crash_after(4)])  # every rank stops after step 4; checkpoint at 3
    except Crash:
        pass
    train(resumed)
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
