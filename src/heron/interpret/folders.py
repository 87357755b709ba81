"""Output folders Heron may replace: empty ones, and ones the same writer made.

`explain` and `save_sae` write a folder whole (train/checkpoint.atomic_folder),
and replacing a folder deletes what it holds. So a path that already exists
must be an empty folder, or a folder whose every file that writer made
earlier; anything else is refused before any work, naming the path and the
files that are not the writer's.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

# folder -> the relative paths of its files the writer did not write
Foreign = Callable[[Path], set[str]]


def folder_files(folder: Path) -> set[str]:
    """Relative posix paths of everything under `folder` but subfolders: files and links."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink() or not p.is_dir()}


def require_replaceable(path: str | Path, foreign: Foreign, writer: str) -> Path:
    """`path`, when nothing is there, or it is a folder in which `foreign` finds
    no file that `writer` did not write; else FileExistsError naming them."""
    target = Path(path)
    if not target.exists() and not target.is_symlink():
        return target
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a folder; give a new folder (or one {writer} wrote)")
    others = sorted(foreign(target))
    if others:
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise FileExistsError(f"{target}: holds files {writer} did not write ({listed}); replacing the folder would "
                              "delete them, so nothing was written: give a new or empty folder")
    return target


__all__ = ["Foreign", "folder_files", "require_replaceable"]
