"""Training: recipes, the one loop, optimisers and schedules, checkpoints, distributed.

    from heron.train import load_recipe, train
    result = train(load_recipe("src/heron/recipes/tiny.yaml", ["train.steps=100"]))
"""
from heron.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_model_folder,
    save_model_folder,
    verify_checkpoint,
)
from heron.train.loop import TrainResult, train
from heron.train.optim import build_optimizer, lr_at
from heron.train.recipe import RecipeError, TrainRecipe, load_recipe, recipe_from_dict
from heron.train.sources import TrainData, resolve_data, synthetic_data

__all__ = [
    "Checkpoint", "CheckpointError", "RecipeError", "TrainData", "TrainRecipe", "TrainResult",
    "build_optimizer", "load_checkpoint", "load_model_folder", "load_recipe", "lr_at",
    "recipe_from_dict", "resolve_data", "save_model_folder", "synthetic_data", "train", "verify_checkpoint",
]
