"""Heron: an open workbench for language models.

    import heron
    model, tokenizer = heron.load("runs/demo/tiny-moe-sparse/checkpoints/latest")
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
    a Heron checkpoint or run folder (quantised ones too: see
    heron.compress.checkpoint; sparse ones: heron.compress.sparse_store),
    or of a Hugging Face model folder."""
    from heron.compress.checkpoint import is_quantized_folder, load_quantized_folder
    from heron.compress.sparse_store import is_sparse_folder, load_sparse_folder  # pruned: packed sparse weights
    from heron.interop.hf_folder import is_hf_folder, load_hf_folder
    from heron.train.checkpoint import load_model_folder

    if is_hf_folder(path):
        return load_hf_folder(path)
    if is_sparse_folder(path):
        return load_sparse_folder(path)
    return load_quantized_folder(path) if is_quantized_folder(path) else load_model_folder(path)


__all__ = ["__version__", "load"]
