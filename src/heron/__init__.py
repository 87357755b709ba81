"""Heron: an open workbench for language models.

    import heron
    model, tokenizer = heron.load("runs/demo/checkpoints/latest")
    model, tokenizer = heron.load("/models/Mistral-7B-v0.1")  # a Hugging Face folder
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from heron.core.transformer import Transformer
    from heron.tokenizer import Tokenizer

__version__ = "0.1.0"


def load(path: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """The model (in eval mode) and tokenizer (None if the folder has none) of
    a Heron checkpoint or run folder, or of a Hugging Face model folder."""
    from heron.interop.hf_folder import is_hf_folder, load_hf_folder
    from heron.train.checkpoint import load_model_folder

    return load_hf_folder(path) if is_hf_folder(path) else load_model_folder(path)


__all__ = ["__version__", "load"]
