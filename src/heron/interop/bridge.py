"""Heron models to and from live `transformers` models, through a folder.

The only way across is the production converter: a model is written as a
Hugging Face folder (`save_hf_folder`, or `save_pretrained`) in a temporary
directory and read back (`from_pretrained`, or `load_hf_model`). Tests and
benchmarks use these to put both implementations side by side on the same
weights. `transformers` is imported only here, when called.
"""
from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING

from heron.core.transformer import Transformer
from heron.interop.hf_folder import load_hf_model, save_hf_folder

if TYPE_CHECKING:  # transformers is an optional dependency of Heron
    from transformers import PreTrainedModel


def to_transformers(model: Transformer, attn_implementation: str = "sdpa", family: str | None = None) -> PreTrainedModel:
    """The `transformers` model (eval mode, same dtype) computing the same function as `model`."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="heron-to-hf-") as tmp:
        save_hf_folder(model, f"{tmp}/model", family=family)
        hf = AutoModelForCausalLM.from_pretrained(f"{tmp}/model", attn_implementation=attn_implementation,
                                                  dtype=next(model.parameters()).dtype)
    return hf.eval()


def from_transformers(hf_model: PreTrainedModel) -> Transformer:
    """The Heron Transformer (eval mode, the `transformers` model's dtype, as `to_transformers` keeps
    Heron's) computing the same function as a `transformers` model."""
    with tempfile.TemporaryDirectory(prefix="heron-from-hf-") as tmp:
        hf_model.save_pretrained(tmp)
        return load_hf_model(tmp, dtype=next(hf_model.parameters()).dtype)


__all__ = ["from_transformers", "to_transformers"]
