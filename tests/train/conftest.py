"""Fixtures for the training tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from heron.train.recipe import TrainRecipe
from train_helpers import small_recipe

# One thread: on a small shared CPU, two threads contending for two busy cores are
# ~10x slower than one for models this size, and bit-for-bit comparisons need
# the same thread count in every run of a test anyway.
torch.set_num_threads(1)


@pytest.fixture
def recipe_factory(tmp_path: Path):
    def make(name: str = "run", **changes: Any) -> TrainRecipe:
        return small_recipe(tmp_path / name, **changes)

    return make
