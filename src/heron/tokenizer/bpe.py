"""Byte-level BPE tokenizer with Heron's special tokens and chat template.

A thin wrapper around a Hugging Face `tokenizers.Tokenizer`, so the saved
`tokenizer.json` loads in any tool that reads that format. Byte-level means
every string round-trips exactly: the ByteLevel pre-tokenizer maps each byte to
a printable symbol before BPE (GPT-2, Radford et al. 2019), and no normalizer
runs, so whitespace, indentation and unicode survive untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Encoding, Tokenizer, decoders, models, pre_tokenizers, trainers

from heron.govern.digest import CONFIG_FILE, LINEAGE_FILE, TOKENIZER_FILE
from heron.store.atomic import write_text_atomic
from heron.store.records import CHAT_ROLES

# Short name -> token text. The order fixes the ids of a trained tokenizer:
# BpeTrainer gives special tokens the first ids, so bos=0, eos=1, pad=2, ...
SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "pad": "<|pad|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
}

# Where GPT-2's byte-level pre-tokenizer always splits, whatever the text around: before the last
# whitespace character of a run that a non-space character follows. Its pattern
# ('s|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) takes such a run less its last
# character as one pre-token (\s+(?!\S)), in the whole text and at the end of the text before the
# cut alike, and starts the next pre-token with that last character; no pre-token reaches back
# across it, and BPE never merges across pre-tokens, so pieces cut there encode to the whole text's
# ids. _SPACE is the pattern's \s (Unicode White_Space); Python's \S is never whitespace there.
_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_EXACT_CUT = re.compile(f"(?=[{_SPACE}]\\S)")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_TRAIN_PIECE_CHARS = 1 << 16

# The same template as `apply_chat_template`, in the Jinja form that Hugging
# Face `transformers` reads from `tokenizer_config.json["chat_template"]`, for
# the interop layer to write next to an exported tokenizer.json.
CHAT_TEMPLATE_JINJA = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def validate_messages(messages: object) -> list[dict[str, str]]:
    """Check a chat: a non-empty list of {"role", "content"} dicts.

    Roles are system/user/assistant; a system turn may only come first.
    Raises ValueError naming the message index and field at fault.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        unknown = sorted(set(message) - {"role", "content"})
        if unknown:
            raise ValueError(f"messages[{i}] has unknown key(s) {unknown}; expected 'role' and 'content'")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{i}] is missing '{key}'")
            if not isinstance(message[key], str):
                raise ValueError(f"messages[{i}]['{key}'] must be a string, got {type(message[key]).__name__}")
        role = message["role"]
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}]['role'] is {role!r}; expected one of {list(CHAT_ROLES)}")
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}]['role'] is 'system'; a system message may only come first")
    return messages


def checked_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    """Token ids for the Rust decoder: Python ints (int() accepts the tensor and numpy elements it
    would reject), none negative (it would overflow). An id past the vocabulary decodes to nothing,
    as in transformers: a model's embedding often has rows past its tokenizer's (padded, or
    Qwen2.5's 151936 for 151665 tokens) that sampling picks while the generator decodes."""
    ids = [int(i) for i in ids]
    if ids and min(ids) < 0:
        raise ValueError(f"token id {min(ids)} is not in the vocabulary of {vocab_size} tokens")
    return ids


_SURROGATE = re.compile("[\ud800-\udfff]")  # code points UTF-8 cannot encode (a JSON "\\ud800" without its pair)


def refuse_surrogates(texts: Sequence[object]) -> None:
    """Raise a ValueError naming the first surrogate code point in `texts`, if any: the Rust
    encoder takes only UTF-8, and says of such a text no more than 'TextInputSequence must be str'."""
    for i, text in enumerate(texts):
        found = _SURROGATE.search(text) if isinstance(text, str) else None
        if found is not None:
            where = "the text" if len(texts) == 1 else f"text {i}"
            raise ValueError(f"{where} holds the surrogate code point U+{ord(found.group()):04X} at character "
                             f"{found.start()}, which UTF-8 cannot encode (a lone half of a surrogate pair); "
                             "replace it first, e.g. text.encode('utf-8', 'replace').decode('utf-8')") from None


def encoding_of(backend: Tokenizer, text: str, add_special_tokens: bool = False) -> Encoding:
    """backend.encode(text), a text with a surrogate refused by name (`refuse_surrogates`)."""
    try:
        return backend.encode(text, add_special_tokens=add_special_tokens)
    except TypeError:
        refuse_surrogates([text])
        raise


def batch_ids(backend: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Many texts' ids at once, without added special tokens, on the Rust side, in parallel over
    all cores; a text with a surrogate refused by name (`refuse_surrogates`)."""
    try:
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
    except TypeError:
        refuse_surrogates(texts)
        raise


def plain_copy(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` that encodes special-token text ("<|eos|>") as plain characters (a
    copy, not a toggle of the shared one, which would not be thread-safe)."""
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.encode_special_tokens = True
    return plain


class HeronTokenizer:
    """Byte-level BPE with bos/eos/pad and chat-role special tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        missing = [t for t in SPECIAL_TOKENS.values() if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks Heron's special tokens {missing}")
        self._tok = tokenizer
        # Document text can never forge a control token (like tiktoken's disallowed_special).
        self._plain = plain_copy(tokenizer)
        self._special_ids = {name: tokenizer.token_to_id(t) for name, t in SPECIAL_TOKENS.items()}
        self._cuts_exact = cuts_exact(tokenizer)

    # ----- properties -------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        """Short name ("bos", "eos", "pad", "system", "user", "assistant", "end") -> id."""
        return dict(self._special_ids)

    @property
    def bos_id(self) -> int:
        return self._special_ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._special_ids["eos"]

    @property
    def pad_id(self) -> int:
        return self._special_ids["pad"]

    @property
    def end_id(self) -> int:
        """Closes every chat turn: generation of an assistant reply stops here."""
        return self._special_ids["end"]

    @property
    def backend(self) -> Tokenizer:
        """The underlying Hugging Face tokenizer (special tokens in text are parsed)."""
        return self._tok

    # ----- encode / decode --------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, allow_special: bool = True) -> list[int]:
        """Text -> ids. With allow_special=False, special-token text is encoded as plain bytes."""
        backend = self._tok if allow_special else self._plain
        ids = encoding_of(backend, text).ids
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True) -> list[list[int]]:
        """Many texts at once on the Rust side, in parallel over all cores."""
        return batch_ids(self._tok if allow_special else self._plain, texts)

    def plain_pieces(self, text: str, max_chars: int) -> list[tuple[int, int]]:
        """(start, stop) of consecutive pieces of `text`, each at least `max_chars` long where the
        text allows, whose plain-text encodings (`allow_special=False`) join to the whole text's.

        Encoding a long text at once takes ~150 bytes of memory per character on the Rust side;
        pieces bound that and spread one document over all cores. A tokenizer whose normalizer,
        pre-tokenizer or added tokens could act across a cut keeps the text whole.
        """
        return exact_pieces(text, max_chars if self._cuts_exact else len(text) + 1)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode(checked_ids(ids, self.vocab_size), skip_special_tokens=skip_special)

    # ----- chat -------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Render a chat as `<|bos|><|role|>\\ncontent<|end|>\\n...` (+ `<|assistant|>\\n`)."""
        validate_messages(messages)
        parts = [SPECIAL_TOKENS["bos"]]
        for m in messages:
            parts.append(f"{SPECIAL_TOKENS[m['role']]}\n{m['content']}{SPECIAL_TOKENS['end']}\n")
        if add_generation_prompt:
            parts.append(f"{SPECIAL_TOKENS['assistant']}\n")
        return "".join(parts)

    def encode_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Ids of the chat template plus a mask that is True on assistant content and its `<|end|>`.

        Each piece is encoded on its own (content as plain text), so the
        newline after `<|assistant|>` is always its own token, exactly as at the
        end of a generation prompt; use this, not `encode(apply_chat_template())`,
        for both training and prompting. The two agree unless content starts
        with whitespace (then BPE may merge it with the newline).
        """
        validate_messages(messages)
        newline = self.encode("\n", allow_special=False)
        ids, mask = [self.bos_id], [False]
        for m in messages:
            content = self.encode(m["content"], allow_special=False) + [self.end_id]
            head = [self._special_ids[m["role"]]] + newline
            ids += head + content + newline
            mask += [False] * len(head) + [m["role"] == "assistant"] * len(content) + [False] * len(newline)
        if add_generation_prompt:
            head = [self._special_ids["assistant"]] + newline
            ids += head
            mask += [False] * len(head)
        return ids, mask

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids of a chat up to and including the assistant's header: a prompt to generate the reply."""
        return self.encode_chat(messages, add_generation_prompt=True)[0]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end generation: `<|eos|>`."""
        return (self.eos_id,)

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn: `<|end|>`, and `<|eos|>` should a model emit it."""
        return self.end_id, self.eos_id

    def reply_ids(self, text: str) -> list[int]:
        """An assistant reply's ids as `encode_chat` trains them: the content as plain
        text, then `<|end|>`. Appended to `chat_prompt_ids`, they make the whole turn."""
        return self.encode(text, allow_special=False) + [self.end_id]

    def chat_turn_ids(self, messages: list[dict[str, str]], reply: str) -> tuple[list[int], list[int]]:
        """(prompt ids, reply ids) of `messages` answered by `reply`: `chat_prompt_ids` and
        `reply_ids`, which Heron's template puts side by side (`encode_chat`)."""
        return self.chat_prompt_ids(messages), self.reply_ids(reply)

    # ----- persistence ------------------------------------------------------

    def to_json(self) -> str:
        """The Hugging Face tokenizer.json text (special tokens included)."""
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> HeronTokenizer:
        return cls(Tokenizer.from_str(text))

    def fingerprint(self) -> str:
        """sha256 of the tokenizer.json text; recorded in shard metadata and lineage."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json atomically; `path` is a .json file or a folder. Returns the file."""
        target = tokenizer_file(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, self.to_json())
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HeronTokenizer:
        """Read a tokenizer.json, given the file or the folder that holds it."""
        file = Path(path)
        if file.is_dir():
            file = file / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {file}")
        try:
            text = file.read_text(encoding="utf-8")
            json.loads(text)  # a clearer message than the Rust parser's for broken JSON
            return cls.from_json(text)
        except Exception as exc:
            raise ValueError(f"{file} is not a valid Heron tokenizer.json: {exc}") from exc


def tokenizer_file(path: str | os.PathLike[str]) -> Path:
    """The file a tokenizer saved to `path` goes to: `path` if it ends in .json, else its tokenizer.json."""
    target = Path(path)
    return target if target.suffix == ".json" else target / TOKENIZER_FILE


def replaceable_tokenizer_file(path: str | os.PathLike[str]) -> Path:
    """`tokenizer_file(path)`, checked before a tokenizer is trained for it: nothing there yet, or
    a Heron tokenizer (replaced); never another file, nor the tokenizer of the checkpoint (or
    Hugging Face model) in its folder, which that model's ids are made with."""
    file = tokenizer_file(path)
    if file.parent.exists() and not file.parent.is_dir():
        raise FileExistsError(f"{file.parent}: exists and is not a folder; give a folder or a .json file")
    held = [name for name in (LINEAGE_FILE, CONFIG_FILE) if (file.parent / name).exists()]
    if held and file.name == TOKENIZER_FILE:  # another .json beside a model is no file of the model's
        raise FileExistsError(f"{file.parent}: holds a model ({held[0]}), whose {TOKENIZER_FILE} is its own; "
                              "write the tokenizer to another folder")
    if file.is_dir():
        raise IsADirectoryError(f"{file}: is a folder; give a .json file or a folder without that name")
    if file.exists():
        try:
            HeronTokenizer.load(file)
        except ValueError:
            raise FileExistsError(f"{file}: exists and is not a Heron tokenizer; write to a new file (only a "
                                  "Heron tokenizer is replaced)") from None
    return file


def exact_pieces(text: str, max_chars: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive pieces of `text` cut at `_EXACT_CUT`, each ending at the first
    cut past `max_chars` characters (text without one stays in one piece): what byte-level BPE
    with GPT-2's pattern encodes, or learns from, exactly as the whole text."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    bounds, start = [], 0
    while len(text) - start > max_chars:
        cut = _EXACT_CUT.search(text, start + max_chars)
        if cut is None:
            break
        bounds.append((start, cut.start()))
        start = cut.start()
    bounds.append((start, len(text)))
    return bounds


def cuts_exact(tokenizer: Tokenizer) -> bool:
    """Whether `_EXACT_CUT` splits `tokenizer`'s plain-text encodings exactly: GPT-2's byte-level
    pre-tokenizer and no normalizer (Heron's own tokenizers), and no added token that plain
    text could still match (every one is special)."""
    spec = json.loads(tokenizer.to_str())
    byte_level = {key: (spec.get("pre_tokenizer") or {}).get(key) for key in _BYTE_LEVEL}
    return (spec.get("normalizer") is None and byte_level == _BYTE_LEVEL
            and all(added["special"] for added in spec.get("added_tokens", [])))


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, progress: bool = True
) -> HeronTokenizer:
    """Learn a byte-level BPE vocabulary of `vocab_size` tokens (specials included) from texts."""
    floor = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(f"vocab_size must be at least {floor} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        # Every byte is in the vocabulary from the start, so no text is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # Off a terminal the Rust progress bar draws nothing yet prints a blank line per phase.
        show_progress=progress and sys.stdout.isatty() and sys.stderr.isatty(),
    )
    # Long texts go in pieces whose pre-tokens, hence word counts, are the whole text's: the
    # trainer holds ~90 bytes per character of every text in flight.
    pieces = (text[start:stop] for text in texts for start, stop in exact_pieces(text, _TRAIN_PIECE_CHARS))
    tok.train_from_iterator(pieces, trainer)
    return HeronTokenizer(tok)
