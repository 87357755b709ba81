"""Model formats in and out: Hugging Face name tables and converters.

`transformers` is imported only when a conversion to or from its models runs,
so this package imports without it.
"""
from heron.interop.llama import *  # noqa: F403  (the public names are llama.__all__)
from heron.interop.llama import __all__
