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

import os
from collections.abc import Sequence
from typing import Protocol

# What a byte-level decoder shows for bytes that do not (yet) form a character.
REPLACEMENT_CHAR = "\ufffd"
# Ids after which the text before them is settled: an unfinished UTF-8 character lacks at
# most 3 bytes, and every id that decodes to something brings at least one.
SETTLING_IDS = 3


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

    Ids that decode to nothing (skipped special tokens such as padding) never
    enter the window, and text ending in U+FFFD is emitted once the
    `SETTLING_IDS` ids after it show it settled (bytes no continuation can
    mend, which a whole decode shows as U+FFFD too). Otherwise every step would
    decode the whole undecided tail again: quadratic in a run of padding or of
    invalid bytes.

    A SentencePiece byte fallback (`<0xXX>` tokens, LLaMA-2 style) decodes a
    run of byte tokens as one unit, every byte U+FFFD if any is invalid, so a
    run that showed a character ("\\n" is `<0x0A>`) and then takes an invalid
    byte rewrites text already streamed. What was streamed cannot be taken
    back: once the rewritten text has settled, the window resynchronises past
    it, emitting nothing for it, and streaming goes on with the text after it.
    There the stream differs from a whole decode (the engine's returned
    `Completion.text` is a whole decode, so it is exact).
    """

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # those pushed, less any that decode to nothing
        self.prefix_offset = 0  # window start: one emitted token of context
        self.read_offset = 0  # ids before this are emitted
        self.emitted: list[str] = []
        self._silent: dict[int, bool] = {}  # id -> `_decodes_to_nothing`

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ('' while undecidable)."""
        if self._silent.get(token_id):
            return ""
        self.ids.append(token_id)
        context = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if _extends(context, text) and not text.endswith(REPLACEMENT_CHAR):
            return self._emit(text[len(context) :], len(self.ids))
        if self._decodes_to_nothing(token_id):
            self.ids.pop()  # it changes no decoding, so `ids` (and `flush`) can do without it
            return ""
        return self._settle(context, text)

    def _settle(self, context: str, text: str) -> str:
        """Emit the head of an undecided tail, once no id after it can change its text.

        Text ending in U+FFFD may be a character still arriving, or bytes no continuation
        can mend (a run of 0x80). An unfinished UTF-8 character lacks at most 3 bytes, and
        every id here brings at least one (a byte-level token; a SentencePiece piece or
        <0xXX> byte token), so the text of all but the last SETTLING_IDS ids is settled if
        the window's text after each of them starts with it. Where a character spans the
        cut it does not, and the head waits for a later push.

        A SentencePiece byte fallback decodes a run of <0xXX> tokens as a whole: every byte
        becomes U+FFFD if any is invalid. So the next window, which starts at read_offset,
        must decode the tail as this one does, after each of those ids too: one that starts
        past the invalid bytes of a run would not.
        """
        cut = len(self.ids) - SETTLING_IDS
        if cut <= self.read_offset:
            return ""
        decode = self.tokenizer.decode
        head = decode(self.ids[self.prefix_offset : cut])
        rewritten = not head.startswith(context)  # a byte-fallback run turned invalid (see the class)
        if not rewritten and not _extends(context, head):
            return ""
        next_context = decode(self.ids[self.read_offset : cut])
        for stop in range(cut + 1, len(self.ids) + 1):
            whole = text if stop == len(self.ids) else decode(self.ids[self.prefix_offset : stop])
            view = decode(self.ids[self.read_offset : stop])  # what the next window will see
            if not (whole.startswith(head) and view == next_context + whole[len(head) :]):
                return ""
        if rewritten:
            # Settled, so the streamed text is gone for good: emit nothing for ids up to cut and
            # stream on from there, in the window that starts at read_offset (checked above).
            self.prefix_offset, self.read_offset = self.read_offset, cut
            return self._stream_window()
        return self._emit(head[len(context) :], cut)

    def _stream_window(self) -> str:
        """What the window adds beyond its context, as `push` does for its new id."""
        context = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if _extends(context, text) and not text.endswith(REPLACEMENT_CHAR):
            return self._emit(text[len(context) :], len(self.ids))
        return self._settle(context, text)

    def _emit(self, piece: str, read: int) -> str:
        """Emit the text of ids[read_offset:read]; those ids become the next context."""
        self.prefix_offset, self.read_offset = self.read_offset, read
        self.emitted.append(piece)
        return piece

    def _decodes_to_nothing(self, token_id: int) -> bool:
        """Whether the id decodes to nothing, alone and twice over: a skipped special token,
        which changes no decoding wherever it stands. Twice, as SentencePiece's "▁" alone
        decodes to '' (a leading space is stripped) but twice to ' ': it is text."""
        if token_id not in self._silent:
            decode = self.tokenizer.decode
            self._silent[token_id] = decode([token_id]) == "" and decode([token_id, token_id]) == ""
        return self._silent[token_id]

    def flush(self) -> str:
        """The rest of the text: the full decoding minus what was emitted.

        Where the stream has diverged from the full decoding (a rewritten byte run, see the
        class), nothing can be taken back: the rest is what the window holds beyond its
        context, or beyond the longest common prefix of the two if the window's text was
        itself rewritten."""
        full = self.tokenizer.decode(self.ids)
        so_far = "".join(self.emitted)
        if full.startswith(so_far):
            rest = full[len(so_far) :]
            self.emitted = [full]
        else:
            context = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
            text = self.tokenizer.decode(self.ids[self.prefix_offset :])
            rest = text[len(os.path.commonprefix([context, text])) :]
            self.emitted.append(rest)
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


def _extends(context: str, text: str) -> bool:
    """Whether text is context followed by more."""
    return len(text) > len(context) and text.startswith(context)


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
