"""The training loop on an NVIDIA GPU: bf16 autocast learns, its checkpoint loads on
the CPU, and a resumed run continues the unbroken one. Skipped without a CUDA GPU;
the model core's GPU tests are in tests/test_cuda.py.

    python -m pytest -m cuda
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import heron
from heron.train import train
from train_helpers import small_recipe
from train_workers import Crash, crash_after

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_learns_and_its_checkpoint_loads_on_the_cpu(tmp_path: Path) -> None:
    result = train(small_recipe(tmp_path, train={"steps": 60, "device": "cuda", "precision": "bf16"}))
    assert result.losses[0] > 3.0 and result.losses[-1] < 0.5  # ln 32 = 3.47 to nearly learned
    model, _ = heron.load(result.checkpoint)
    assert next(model.parameters()).device.type == "cpu"
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        got = copy.deepcopy(model).cuda()(ids.cuda()).logits
    assert (got.cpu() - want).abs().max().item() <= 1e-4  # TF32 is off by default for matmuls


def test_resume_on_the_gpu_continues_the_unbroken_run(recipe_factory) -> None:
    """Bit for bit on the CPU; here to rounding, since CUDA's backward kernels may sum in any order."""
    settings = {"train": {"steps": 30, "ckpt_every": 10, "device": "cuda"}}
    unbroken = train(recipe_factory("unbroken", **settings))
    broken = recipe_factory("broken", **settings)
    with pytest.raises(Crash):
        train(broken, callbacks=[crash_after(15)])  # checkpoint at 10; steps 11 to 15 are lost
    resumed = train(broken)
    assert resumed.step == 30 and len(resumed.losses) == 30
    assert resumed.losses == pytest.approx(unbroken.losses, rel=1e-4)
