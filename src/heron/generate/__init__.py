"""Generation: sampling, the batching engine, streaming, perplexity.

    from heron.generate import Generator, SamplingParams
    gen = Generator(model, tokenizer)
    gen.generate("def add(a, b):", SamplingParams(max_new_tokens=64, temperature=0))
    for piece in gen.stream("import os\\n", SamplingParams(stop=["\\n\\n"])):
        print(piece, end="", flush=True)
"""
from heron.generate.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    Decoder,
    Generator,
    decode_steps,
    left_pad,
)
from heron.generate.perplexity import perplexity
from heron.generate.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    presence_mask,
    sample_next,
)
from heron.generate.text import IncrementalDetokenizer, StopStringFilter, TokenizerLike

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "Completion",
    "Decoder",
    "Generator",
    "IncrementalDetokenizer",
    "SamplingParams",
    "StopStringFilter",
    "TokenizerLike",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "decode_steps",
    "left_pad",
    "perplexity",
    "presence_mask",
    "sample_next",
]
