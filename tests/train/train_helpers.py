"""Helpers for the training tests (a module with a unique name, so that worker
subprocesses and test modules import the same thing): a very small model on
synthetic data."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

from heron.train.recipe import TrainRecipe, recipe_from_dict

# ~35k parameters: big enough to learn a 32-token cycle, small enough for seconds per run.
SMALL_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 32}


def small_recipe(out_dir: Path, world_size: int = 1, **changes: Any) -> TrainRecipe:
    """A recipe for SMALL_MODEL on a repeated random permutation of 32 tokens.

    `changes` maps section names to dicts merged into the defaults, e.g.
    small_recipe(tmp, train={"steps": 4}).
    """
    raw: dict[str, Any] = {
        "name": "test",
        "out_dir": str(out_dir),
        "model": {"preset": "test", "overrides": dict(SMALL_MODEL)},
        "data": {"synthetic": {"vocab_size": 32, "n_tokens": 2048, "seed": 0}, "seq_len": 16},
        "optim": {"lr": 1e-2, "weight_decay": 0.1},
        "schedule": {"warmup_steps": 2, "min_lr_ratio": 0.1},
        "train": {"steps": 8, "batch_size": 8, "eval_every": 4, "eval_batches": 2,
                  "ckpt_every": 4, "log_every": 1, "progress": False},
    }
    for section, values in changes.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**copy.deepcopy(raw[section]), **values}
        else:
            raw[section] = values
    return recipe_from_dict(raw, world_size=world_size)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): what a killed writer's names carry."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid
