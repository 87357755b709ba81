"""Byte-level BPE tokenizer with Heron's special tokens and chat template."""

from heron.tokenizer.bpe import (
    CHAT_ROLES,
    CHAT_TEMPLATE_JINJA,
    SPECIAL_TOKENS,
    HeronTokenizer,
    train_tokenizer,
    validate_messages,
)

__all__ = [
    "CHAT_ROLES",
    "CHAT_TEMPLATE_JINJA",
    "SPECIAL_TOKENS",
    "HeronTokenizer",
    "train_tokenizer",
    "validate_messages",
]
