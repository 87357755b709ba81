"""Model formats in and out: Hugging Face folders (name tables, both ways).

`transformers` is never needed to convert: folders are read and written
directly. It is imported only by `bridge`, which puts a live `transformers`
model beside a Heron one for parity tests and benchmarks.
"""
from heron.interop.bridge import from_transformers, to_transformers
from heron.interop.families import FAMILIES, Family, family_config, family_of, hf_config
from heron.interop.files import WeightFileError, WeightFiles
from heron.interop.gguf import save_gguf
from heron.interop.hf_folder import (
    export_family,
    is_hf_folder,
    load_hf_config,
    load_hf_folder,
    load_hf_model,
    load_hf_tokenizer,
    save_hf_folder,
)
from heron.interop.tables import WeightRow, heron_to_hf, load_into

__all__ = [
    "FAMILIES", "Family", "WeightFileError", "WeightFiles", "WeightRow", "export_family", "family_config",
    "family_of", "from_transformers", "heron_to_hf", "hf_config", "is_hf_folder", "load_hf_config",
    "load_hf_folder", "load_hf_model", "load_hf_tokenizer", "load_into", "save_gguf", "save_hf_folder",
    "to_transformers",
]
