"""From token ids to text, one token at a time.

Two small pieces that the engine runs per generated token, each doing work
proportional to the new token rather than to everything generated so far:

- `IncrementalDetokenizer` turns ids into text pieces whose concatenation is
  the decoding of all the ids, never emitting half a multi-byte character.
- `StopStringFilter` cuts the text at the first stop string and holds back
  any tail that might still turn into one, so streamed text never shows a
  stop string or part of it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# What a byte-level decoder shows for bytes that do not (yet) form a character.
REPLACEMENT_CHAR = "\ufffd"


class TokenizerLike(Protocol):
    """What generation needs from a tokenizer (`heron.tokenizer.HeronTokenizer` fits)."""

    @property
    def eos_id(self) -> int | None: ...

    @property
    def stop_ids(self) -> tuple[int, ...]: ...  # the ids that end generation (the eos token, and more)

    @property
    def pad_id(self) -> int | None: ...

    def encode(self, text: str, allow_special: bool = True) -> list[int]: ...  # False: special-token text is plain

    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDetokenizer:
    """Decodes a growing id list piece by piece.

    Each step decodes a short window, the ids since the last emitted piece plus
    the token before them as context, and emits what the new ids added: the
    prefix-offset scheme of Hugging Face text-generation-inference
    (`decode_token`). Context matters for tokenizers whose decoding of a token
    depends on its neighbour (SentencePiece's leading space); holding back text
    that ends in U+FFFD waits for the rest of a character split across tokens.
    `flush` reconciles with one full decode at the end.
    """

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: one emitted token of context
        self.read_offset = 0  # ids before this are emitted
        self.emitted: list[str] = []

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ('' while undecidable)."""
        self.ids.append(token_id)
        window = self.ids[self.prefix_offset :]
        context = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(window)
        if len(text) <= len(context) or text.endswith(REPLACEMENT_CHAR) or not text.startswith(context):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        piece = text[len(context) :]
        self.emitted.append(piece)
        return piece

    def flush(self) -> str:
        """The rest of the text: the full decoding minus what was emitted."""
        full = self.tokenizer.decode(self.ids)
        so_far = "".join(self.emitted)
        if not full.startswith(so_far):
            return ""  # a tokenizer whose pieces do not concatenate; nothing can be taken back
        rest = full[len(so_far) :]
        self.emitted = [full]
        self.prefix_offset = self.read_offset = len(self.ids)
        return rest


class StopStringFilter:
    """Releases text up to, never into, the first occurrence of a stop string.

    Text that ends with a proper prefix of some stop string is held back until
    the next piece shows whether the stop string completes. Only that held-back
    tail is searched, so each piece costs time proportional to its own length
    and the stop strings', never to the text so far.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add a piece; return the text now safe to show."""
        if self.stopped:
            return ""
        self.pending += piece
        cut = first_stop(self.pending, self.stops)
        if cut is not None:
            self.stopped = True
            released, self.pending = self.pending[:cut], ""
            return released
        keep = held_back_length(self.pending, self.stops)
        released = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return released

    def finish(self) -> str:
        """The held-back tail, once no more text will come."""
        released, self.pending = self.pending, ""
        return released


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string in text begins, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def trim_at_stop(text: str, stops: Sequence[str]) -> str:
    """Text before the earliest stop string (all of it when none occurs)."""
    cut = first_stop(text, stops)
    return text if cut is None else text[:cut]


__all__ = [
    "IncrementalDetokenizer",
    "StopStringFilter",
    "TokenizerLike",
    "first_stop",
    "held_back_length",
    "trim_at_stop",
]
