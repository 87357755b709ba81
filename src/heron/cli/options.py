"""What the CLI's parser needs before any verb runs: shipped recipes and argument types.

Standard library only, so that building the parser (`heron --help`, and the
verbs that need no model: consent, audit, feedback) loads neither torch nor
the model code; the verbs' handlers import those when they run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
ALIGN_RECIPES_DIR = RECIPES_DIR / "align"
DEMO_RECIPE = "tiny-moe-sparse"


def shipped_recipes(folder: Path = RECIPES_DIR) -> list[str]:
    """The names of the recipes shipped in `folder`."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


def recipe_path(name_or_path: str, shipped_in: Path = RECIPES_DIR) -> Path:
    """A recipe file, or the name of one shipped with Heron (`tiny`; `task-dpo` in recipes/align)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_in / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(shipped_recipes(shipped_in))
    raise FileNotFoundError(f"no recipe file {name_or_path!r} and no shipped recipe of that name ({names})")


def n_of_m(text: str) -> tuple[int, int]:
    """"2:4" -> (2, 4)."""
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:M such as 2:4, got {text!r}") from None
    return n, m
