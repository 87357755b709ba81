"""Chat conversations for supervised fine-tuning: JSONL in, padded (x, y) tensors out.

Tensors follow the same convention as PackedBatches: y is already shifted
(y[:, t] is the target for x[:, t]), and y is -100 (cross-entropy's default
ignore_index) wherever the target is not assistant content, so one
`F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)`
serves pre-training and SFT alike.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from heron.data.batches import epoch_rows, rank_slice
from heron.store.jsonl import read_jsonl_objects
from heron.tokenizer.bpe import HeronTokenizer, validate_messages

IGNORE_INDEX = -100


def load_chat_jsonl(path: str | os.PathLike[str]) -> list[list[dict[str, str]]]:
    """Read `{"messages": [{"role": ..., "content": ...}, ...]}` per line; blank lines are skipped.

    Errors name the file, the 1-based line number and the problem.
    """
    return [messages for _, messages in read_chat_jsonl(path)]


def read_chat_jsonl(path: str | os.PathLike[str]) -> list[tuple[int, list[dict[str, str]]]]:
    """load_chat_jsonl with each chat's 1-based line number, for later errors to name it."""
    chats = []
    for lineno, record in read_jsonl_objects(path):
        where = f"{Path(path)}:{lineno}"
        if "messages" not in record:
            raise ValueError(f"{where}: expected an object with a 'messages' list")
        try:
            chats.append((lineno, validate_messages(record["messages"])))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return chats


def chat_examples_to_tensors(
    examples: list[list[dict[str, str]]], tokenizer: HeronTokenizer, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chats -> (x, y), each (N, seq_len) int64: x padded with pad_id, y = next token or -100.

    A chat longer than seq_len + 1 tokens is cut at the end. A chat left with
    no assistant target (all of it cut) is dropped with a warning, since it
    would add nothing to the loss but padding.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    rows_x, rows_y, dropped = [], [], []
    for i, messages in enumerate(examples):
        ids, mask = tokenizer.encode_chat(messages)
        ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
        x = np.full(seq_len, tokenizer.pad_id, dtype=np.int64)
        y = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
        x[: len(ids) - 1] = ids[:-1]
        y[: len(ids) - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
        if (y == IGNORE_INDEX).all():
            dropped.append(i)
            continue
        rows_x.append(x)
        rows_y.append(y)
    if dropped:
        warnings.warn(
            f"dropped {len(dropped)} chat(s) with no assistant tokens within seq_len={seq_len} "
            f"(first indices {dropped[:5]})",
            stacklevel=2,
        )
    if not rows_x:
        raise ValueError(f"no chat example has an assistant token within seq_len={seq_len} to learn from; "
                         "raise seq_len or shorten the chats")
    return torch.from_numpy(np.stack(rows_x)), torch.from_numpy(np.stack(rows_y))


class ChatBatches:
    """Random-access SFT batches: each epoch visits every chat once, in an order fixed by (seed, epoch).

    `batch(step, rank, world_size)` depends on (seed, step) alone and splits
    the global batch across ranks exactly like PackedBatches.
    """

    def __init__(
        self,
        examples: list[list[dict[str, str]]],
        tokenizer: HeronTokenizer,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.y = chat_examples_to_tensors(examples, tokenizer, seq_len)  # (N, T) each
        self.batch_size, self.seed = batch_size, seed

    def __len__(self) -> int:
        return len(self.x)

    def indices(self, step: int) -> np.ndarray:
        """Rows of the global batch of `step`, shape (batch_size,)."""
        return epoch_rows(len(self.x), self.batch_size, step, self.seed)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (batch_size // world_size, seq_len), int64."""
        rows = torch.from_numpy(self.indices(step)[rank_slice(self.batch_size, rank, world_size)])
        return self.x[rows], self.y[rows]
