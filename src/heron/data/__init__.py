"""Corpora, token shards and batches for pre-training and chat fine-tuning."""

from heron.data.batches import PackedBatches, eval_batches
from heron.data.chat import ChatBatches, chat_examples_to_tensors, load_chat_jsonl
from heron.data.corpus import Corpus, default_corpus
from heron.data.shards import (ShardedTokens, ShardSet, check_shards_fit, check_val_scorable, load_shards,
                               prepare_shards)

__all__ = [
    "ChatBatches",
    "Corpus",
    "PackedBatches",
    "ShardSet",
    "ShardedTokens",
    "chat_examples_to_tensors",
    "check_shards_fit",
    "check_val_scorable",
    "default_corpus",
    "eval_batches",
    "load_chat_jsonl",
    "load_shards",
    "prepare_shards",
]
