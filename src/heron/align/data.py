"""Chats with given replies as tensors: what SFT, reward models and the DPO family read.

Each row is a prompt rendered by the tokenizer's chat template up to the
assistant's turn, followed by the reply's ids and its end-of-turn token, as
the template renders the whole chat (`chat_turn_ids`), right-padded with PAD_ID. Padding after the real
tokens never changes their logits under causal attention, so no attention
mask is needed; `mask` marks the reply's tokens, the only ones any loss reads.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from heron.tokenizer import Tokenizer

Messages = list[dict[str, str]]

# Right padding (here and in rollouts): no loss, no real token's attention and no routing statistic
# reads it, so any id the model's embedding holds will do, and 0 is one every model's holds. Not the
# tokenizer's pad id: that may lie past the model's vocabulary (a Hugging Face tokenizer that gained
# <|pad|> without its model's embedding growing), and the rows are made knowing the tokenizer alone.
# generate/engine.py's left padding falls back to 0 for the same reason.
PAD_ID = 0


@dataclass(frozen=True)
class Replies:
    """N prompt + reply rows."""

    ids: torch.Tensor  # (N, T) long, right-padded
    mask: torch.Tensor  # (N, T) float, 1.0 on the reply's tokens (its end-of-turn token included)
    last: torch.Tensor  # (N,) long, the index of each row's last real token

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(self) -> torch.Tensor:
        """(N, T) bool: True on each row's tokens, False on its right padding."""
        return torch.arange(self.ids.shape[1], device=self.ids.device) <= self.last[:, None]

    def take(self, rows: torch.Tensor) -> Replies:
        return Replies(self.ids[rows], self.mask[rows], self.last[rows])

    def concat(self, other: Replies) -> Replies:
        """These rows, then `other`'s (both padded to one width, as `encode_pairs` gives them)."""
        return Replies(torch.cat([self.ids, other.ids]), torch.cat([self.mask, other.mask]),
                       torch.cat([self.last, other.last]))


class RowTooLong(ValueError):
    """A prompt and reply longer than max_len; the message names the row as the caller does."""


def encode_replies(tokenizer: Tokenizer, prompts: Sequence[Messages], replies: Sequence[str],
                   max_len: int, describe: Callable[[int], str] = lambda i: f"row {i + 1}",
                   vocab_size: int | None = None) -> Replies:
    """Tokenise prompt/reply rows; a row longer than max_len is a RowTooLong naming it
    (`describe(i)` for row i, 0-based), one holding an id past the model's `vocab_size`
    (where given) a ValueError naming it (`check_ids_fit`)."""
    if len(prompts) != len(replies):
        raise ValueError(f"replies: {len(replies)} for {len(prompts)} prompts")
    rows, masks = [], []
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        try:
            head, tail = tokenizer.chat_turn_ids(prompt, reply)
        except ValueError as err:  # a role or message the template refuses: say which row
            raise ValueError(f"{describe(i)}: {err}") from None
        if len(head) + len(tail) > max_len:
            raise RowTooLong(f"{describe(i)} is {len(head) + len(tail)} tokens, more than max_len {max_len}")
        if vocab_size is not None:
            check_ids_fit(tokenizer, head + tail, vocab_size, describe(i))
        rows.append(head + tail)
        masks.append([0.0] * len(head) + [1.0] * len(tail))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m)
    return Replies(ids, mask, torch.tensor([len(r) - 1 for r in rows]))


def check_ids_fit(tokenizer: Tokenizer, ids: Sequence[int], vocab_size: int, where: str) -> None:
    """A ValueError naming `where` and the token when an id lies past the model's vocabulary:
    a Hugging Face tokenizer can hold tokens (a chat template's markers, most often) that its
    model's embedding never grew for, and the embedding lookup would fail on them deep in
    training with "index out of range"."""
    past = max(ids, default=-1)
    if past >= vocab_size:
        raise ValueError(f"{where}: token {tokenizer.decode([past])!r} (id {past}) lies past the model's "
                         f"vocabulary of {vocab_size}: its tokenizer holds tokens its embedding lacks; leave that "
                         "text out, or align a model whose embedding covers its tokenizer")


def encode_chats(tokenizer: Tokenizer, chats: Sequence[Messages], max_len: int,
                 describe: Callable[[int], str] = lambda i: f"chat {i + 1}", vocab_size: int | None = None
                 ) -> Replies:
    """SFT rows: each chat whole, with every assistant turn's tokens (its end-of-turn included)
    in the mask, as data/chat.py trains chats, not only the last reply's.

    A row is the template up to the last reply plus that reply (`encode_replies`); an earlier
    reply lies where its own turn's prompt ends. That holds for Heron's template and for any
    template that renders a chat's start the same whatever follows; a ValueError names a chat
    where it does not."""
    rows = encode_replies(tokenizer, [c[:-1] for c in chats], [c[-1]["content"] for c in chats], max_len, describe,
                          vocab_size)
    mask = rows.mask.clone()
    for row, chat in enumerate(chats):
        ids = rows.ids[row].tolist()
        for turn, message in enumerate(chat[:-1]):
            if message["role"] != "assistant":
                continue
            span = _earlier_reply(tokenizer, chat[:turn], message["content"], ids)
            if span is None:
                raise ValueError(f"{describe(row)}: its assistant turn {turn + 1} is not where this tokenizer's "
                                 "chat template puts it; give chats with one assistant reply, last")
            mask[row, span[0]:span[1]] = 1.0
    return Replies(rows.ids, mask, rows.last)


def _earlier_reply(tokenizer: Tokenizer, before: Messages, reply: str, ids: list[int]) -> tuple[int, int] | None:
    """Where an earlier assistant turn's tokens lie in a whole chat's `ids`: as the template renders
    it when it ends a chat (`chat_turn_ids`), or as its content encoded on its own after the prompt
    before it (a template that renders a last turn otherwise, as Qwen3 gives it an empty <think>)."""
    head, tail = tokenizer.chat_turn_ids(before, reply)
    plain_head = tokenizer.chat_prompt_ids(before)
    for start, reply_ids in ((len(head), tail), (len(plain_head), tokenizer.reply_ids(reply))):
        if ids[start:start + len(reply_ids)] == reply_ids:
            return start, start + len(reply_ids)
    return None


def as_messages(prompt: str | Messages) -> Messages:
    """A prompt as chat messages: plain text is one user turn (the feedback store's exports
    and most preference datasets hold either form)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[dict], max_len: int,
                 names: Sequence[str] | None = None, vocab_size: int | None = None) -> tuple[Replies, Replies]:
    """(chosen, rejected) rows of prompt/chosen/rejected records (as `heron feedback export`
    writes them), row i of each from pair i. Extra keys (annotator, ids) are ignored. Errors
    name pair i as names[i] (a file's "pairs.jsonl:3"), else "pair i+1"."""
    names = list(names) if names is not None else [f"pair {i + 1}" for i in range(len(pairs))]
    replies: dict[str, list[str]] = {"chosen": [], "rejected": []}
    for name, pair in zip(names, pairs):
        missing = [key for key in ("prompt", "chosen", "rejected") if key not in pair]
        if missing:
            raise ValueError(f"{name}: {missing[0]!r} is missing")
        for key, texts in replies.items():
            texts.append(_reply_text(pair[key], f"{name}: {key!r}"))
        if replies["chosen"][-1] == replies["rejected"][-1]:
            raise ValueError(f"{name}: 'chosen' and 'rejected' are the same reply; a tie teaches no "
                             "preference (the feedback store does not record one either)")
    prompts = [as_messages(p["prompt"]) for p in pairs]
    n = len(pairs)  # one padded width for both sides, so a batch can stack them
    both = encode_replies(tokenizer, prompts * 2, replies["chosen"] + replies["rejected"], max_len,
                          describe=lambda i: f"{names[i % n]} with its {'chosen' if i < n else 'rejected'} reply",
                          vocab_size=vocab_size)
    return both.take(torch.arange(n)), both.take(torch.arange(n, 2 * n))


def _reply_text(value: object, where: str) -> str:
    """A reply as text, or as the one assistant message of the conversational form
    (`[{"role": "assistant", "content": ...}]`, TRL's, and `heron feedback export`'s for chats)."""
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise ValueError(f"{where}: the reply's text, or one assistant message, expected; got {value!r:.80}")


__all__ = ["PAD_ID", "Replies", "RowTooLong", "as_messages", "check_ids_fit", "encode_chats", "encode_pairs",
           "encode_replies"]
