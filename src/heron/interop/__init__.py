"""Model formats in and out: Hugging Face name tables and converters.

`transformers` is imported only when a conversion to or from its models runs,
so this package imports without it.
"""
from heron.interop.llama import (
    LLAMA_CONFIG,
    LLAMA_WEIGHTS,
    WeightRow,
    from_hf_llama,
    heron_config,
    heron_to_hf_weights,
    hf_to_heron_weights,
    llama_config,
    to_hf_llama,
)

__all__ = [
    "LLAMA_CONFIG",
    "LLAMA_WEIGHTS",
    "WeightRow",
    "from_hf_llama",
    "heron_config",
    "heron_to_hf_weights",
    "hf_to_heron_weights",
    "llama_config",
    "to_hf_llama",
]
