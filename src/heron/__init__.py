"""Heron: an open workbench for language models.

    import heron
    model, tokenizer = heron.load("runs/demo/checkpoints/latest")
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from heron.core.transformer import Transformer
    from heron.tokenizer import HeronTokenizer

__version__ = "0.1.0"


def load(path: str | Path) -> tuple[Transformer, HeronTokenizer]:
    """The model (in eval mode) and tokenizer of a checkpoint folder."""
    from heron.train.checkpoint import load_model_folder

    return load_model_folder(path)


__all__ = ["__version__", "load"]
