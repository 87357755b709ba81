"""Input paths checked before any work, named by what asked for them."""
from __future__ import annotations

from pathlib import Path


def existing_input(path: Path, name: str, what: str = "file", *, folder: bool = False) -> Path:
    """`path`, an input that the argument or flag `name` names, when something is there to read:
    else refused before any work, naming both (`--eval: no evaluation results file at x.json`), not
    as open()'s bare `[Errno 2] No such file or directory`. Unless `folder`, a folder is refused too."""
    if not path.exists():
        raise FileNotFoundError(f"{name}: no {what} at {path}")
    if not folder and path.is_dir():
        raise IsADirectoryError(f"{name}: {path} is a folder; give the {what} itself")
    return path


__all__ = ["existing_input"]
