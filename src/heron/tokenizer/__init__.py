"""Byte-level BPE tokenizer with Heron's special tokens and chat template, and
the tokenizers of imported models."""

from heron.tokenizer.bpe import (
    CHAT_ROLES,
    CHAT_TEMPLATE_JINJA,
    SPECIAL_TOKENS,
    HeronTokenizer,
    train_tokenizer,
    validate_messages,
)
from heron.tokenizer.pretrained import ChatTemplateError, PretrainedTokenizer, load_tokenizer

Tokenizer = HeronTokenizer | PretrainedTokenizer

__all__ = [
    "CHAT_ROLES",
    "CHAT_TEMPLATE_JINJA",
    "SPECIAL_TOKENS",
    "ChatTemplateError",
    "HeronTokenizer",
    "PretrainedTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "train_tokenizer",
    "validate_messages",
]
