"""Hugging Face model folders in and out.

Import reads `config.json`, picks the family by its `model_type`, builds the
Heron model on the meta device (no memory, no random init), allocates it
once, and copies the weights in tensor by tensor from `WeightFiles`: peak
memory stays near one copy of the model. Export writes the family's
`config.json`, `model.safetensors` in the names the Hub uses, and the
tokenizer files, into a temporary folder renamed into place at the end; a
weight that is NaN or inf is refused before, as the GGUF writer refuses it
(interop/finite.py).
`transformers` is not needed for either direction.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from heron.core.config import ModelConfig
from heron.core.transformer import Transformer
from heron.govern.digest import CONFIG_FILE, LINEAGE_FILE, MODEL_FILE
from heron.interop.families import EXPORT_ORDER, FAMILIES, Family, family_config, family_of, hf_config
from heron.interop.files import WeightFiles
from heron.interop.finite import check_finite
from heron.interop.tables import expand, heron_to_hf, load_into
from heron.tokenizer.bpe import HeronTokenizer
from heron.tokenizer.pretrained import PretrainedTokenizer
from heron.train.checkpoint import (atomic_folder, build_on_meta, check_parameter_count, load_tokenizer_if_present,
                                   require_new_folder)


def is_hf_folder(path: str | Path) -> bool:
    """A folder with a config.json and no Heron lineage (lineage.json), whose config is not Heron's (it has a
    `model_type`, or no `d_model`). One that does not parse counts too, so that the reader of
    Hugging Face folders names what is wrong with it."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file() or (folder / LINEAGE_FILE).is_file():
        return False
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True
    return not isinstance(config, dict) or "model_type" in config or "d_model" not in config


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    file = folder / CONFIG_FILE
    if not folder.is_dir():
        raise (NotADirectoryError if folder.exists() else FileNotFoundError)(f"{folder}: no such folder")
    if (folder / LINEAGE_FILE).is_file():  # its config.json is Heron's, which names no model_type
        raise ValueError(f"{folder}: a Heron checkpoint ({LINEAGE_FILE}), not a Hugging Face folder; Heron loads it "
                         "as it is (`heron convert to-hf` writes a Hugging Face folder from it)")
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json; not a Hugging Face model folder")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{file}: a JSON object of settings expected, got {type(config).__name__}")
    return config


def load_hf_config(folder: str | Path) -> tuple[Family, ModelConfig]:
    """The family and Heron config of a folder; errors are prefixed with the file."""
    hf = read_hf_config(folder)
    try:
        family = family_of(hf)
        return family, family_config(family, hf)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{Path(folder) / CONFIG_FILE}: {err}") from err


def load_hf_model(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> Transformer:
    """The Heron Transformer (eval mode, `dtype`) of a Hugging Face folder."""
    folder = Path(folder)
    family, config = load_hf_config(folder)
    files = WeightFiles(folder)
    stored = {name: files.shape(name) for name in files}
    model = build_on_meta(config, stored, folder)
    check_parameter_count(model, stored, folder)
    model.to_empty(device="cpu").to(dtype)
    model.tie_weights()
    model.reset_buffers()
    ignored = family.ignored + ((r"lm_head\.weight",) if config.tie_embeddings else ())
    load_into(files, dict(model.named_parameters()), family.weights, config, ignored)  # tied: embed.weight once
    return model.eval()


def load_hf_tokenizer(folder: str | Path) -> PretrainedTokenizer | None:
    """The folder's tokenizer, or None when it has no tokenizer.json."""
    return load_tokenizer_if_present(Path(folder), PretrainedTokenizer.load)


def load_hf_folder(folder: str | Path) -> tuple[Transformer, PretrainedTokenizer | None]:
    """(model, tokenizer or None) of a Hugging Face folder."""
    return load_hf_model(folder), load_hf_tokenizer(folder)


def export_family(config: ModelConfig) -> Family:
    """The first family (EXPORT_ORDER) that expresses `config`; the ValueError
    lists why each family refused."""
    reasons = []
    for family in EXPORT_ORDER:
        try:
            hf_config(family, config)
            return family
        except ValueError as err:
            reasons.append(f"{family.name}: {err}")
    raise ValueError("no Hugging Face family expresses this model:\n  " + "\n  ".join(reasons))


def save_hf_folder(
    model: Transformer,
    folder: str | Path,
    tokenizer: HeronTokenizer | PretrainedTokenizer | None = None,
    *,
    family: str | None = None,
) -> Family:
    """Write `model` (and its tokenizer) as a Hugging Face folder that
    `from_pretrained` loads; returns the family used. The folder appears whole or not at all.
    A ValueError names a tensor that holds NaN or inf, before anything is written."""
    config = model.config
    chosen = _family_named(family) if family else export_family(config)
    hf = hf_config(chosen, config)
    hf.update(_token_ids(tokenizer))
    hf["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    weights = dict(model.named_parameters())
    tensors = dict(heron_to_hf(weights, chosen.weights, config))
    _check_finite_tensors(tensors, chosen, config)
    target = require_new_folder(folder)
    with atomic_folder(target) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2), encoding="utf-8")
        safetensors.torch.save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        _readable_as_usual(tmp / MODEL_FILE)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
    return chosen


def _check_finite_tensors(tensors: dict[str, torch.Tensor], family: Family, config: ModelConfig) -> None:
    """Refuse a folder's tensor holding NaN or inf (`check_finite`), named as save_gguf names one:
    the Heron tensor it comes from, then its name in the folder."""
    n_experts = 0 if config.moe is None else config.moe.n_experts
    origin = {hf: heron for heron, _, parts in expand(family.weights, config.n_layers, n_experts)
              for part in parts for hf in part.names}
    for hf_name, tensor in tensors.items():
        check_finite(f"{origin[hf_name]} ({hf_name} in the folder)", tensor,
                     "a model loaded from the folder would compute NaN logits: fix the model's weights")


def _readable_as_usual(file: Path) -> None:
    """safetensors writes its file owner-only (0600); give it the mode every other file
    gets here (0666 less the umask), so the folder can be shared like the rest."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)


def _family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"family: {name!r} is not one of {', '.join(f.name for f in FAMILIES)}")


def _token_ids(tokenizer: HeronTokenizer | PretrainedTokenizer | None) -> dict[str, int | list[int] | None]:
    """config.json's special-token ids. An imported tokenizer's eos_token_id lists every id its model
    stops at (transformers reads it there where generation_config.json is missing); a Heron tokenizer's
    is its `<|eos|>` (the generation_config.json written beside it lists `<|end|>` too). Without a
    tokenizer the ids are null, not left out: a missing key reads as the family's default (LLaMA's
    eos 2, Phi-3's pad 32000)."""
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    stop = tokenizer.generation_stop_ids if isinstance(tokenizer, PretrainedTokenizer) else tokenizer.stop_ids
    eos = list(stop) if len(stop) > 1 else stop[0] if stop else None
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_id}


def _save_tokenizer(tokenizer: HeronTokenizer | PretrainedTokenizer, folder: Path) -> None:
    if isinstance(tokenizer, PretrainedTokenizer):
        tokenizer.save(folder)
        return
    # A Heron tokenizer: its special tokens and chat template in transformers' terms. A reply ends
    # at <|end|>, not eos: generation_config.json's eos_token_id lists both, which is where
    # transformers' generate and Heron's PretrainedTokenizer learn it.
    from heron.tokenizer.bpe import CHAT_TEMPLATE_JINJA, SPECIAL_TOKENS

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS["bos"],
              "eos_token": SPECIAL_TOKENS["eos"], "pad_token": SPECIAL_TOKENS["pad"],
              "chat_template": CHAT_TEMPLATE_JINJA, "model_max_length": 10**9}
    PretrainedTokenizer(tokenizer.backend, config, generation_eos_ids=tokenizer.chat_stop_ids).save(folder)


__all__ = [
    "export_family", "is_hf_folder", "load_hf_config", "load_hf_folder", "load_hf_model", "load_hf_tokenizer",
    "read_hf_config", "save_hf_folder",
]
