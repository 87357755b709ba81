"""Fixtures for the generation tests: tiny random models and trivial tokenizers.

Everything shared lives here and reaches the tests as fixtures, so the tests
import nothing from this folder (pytest runs with --import-mode=importlib).
"""
from collections.abc import Callable, Sequence

import pytest
import torch

from heron.core import ModelConfig, Transformer

# One thread: tiny models gain nothing from two, and on a busy two-core machine
# contending threads make each op many times slower.
torch.set_num_threads(1)

FIRST_CHAR = 32  # CharTokenizer: ids 2..96 are the printable ASCII characters 32..126


class CharTokenizer:
    """One token per printable ASCII character; pad=0 and eos=1 decode to nothing."""

    pad_id = 0
    eos_id = 1
    stop_ids = (1,)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:  # no special token has a spelling
        return [ord(c) - FIRST_CHAR + 2 for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i - 2 + FIRST_CHAR) for i in ids if i >= 2)


class ByteTokenizer:
    """One token per byte, decoded like a byte-level BPE: invalid UTF-8 shows as U+FFFD."""

    pad_id = 256
    eos_id = 257
    stop_ids = (257,)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:  # no special token has a spelling
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_config(**changes) -> ModelConfig:
    # A larger init_std than training's makes greedy text varied, not one repeated token.
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, init_std=0.3)
    return ModelConfig(**{**base, **changes})


@pytest.fixture
def make_model() -> Callable[..., Transformer]:
    """A seeded random tiny model; keyword arguments change its config."""

    def make(**changes) -> Transformer:
        torch.manual_seed(0)
        return Transformer(tiny_config(**changes)).eval()

    return make


@pytest.fixture
def model(make_model) -> Transformer:
    return make_model()


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()
