"""The tokenizer of an imported model: `tokenizer.json` plus `tokenizer_config.json`.

Special tokens (bos, eos, pad) and the chat template come from
`tokenizer_config.json` (or `chat_template.jinja` beside it), as in Hugging
Face `transformers`. The template is Jinja, rendered in an immutable sandbox
(`jinja2.sandbox.ImmutableSandboxedEnvironment`, the environment
`transformers` uses too): a template can only format its inputs, never reach
Python objects' internals or change them. `encode` adds special tokens the
way the tokenizer's own post-processor says (LLaMA's leading `<s>`), as
`transformers` does by default.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from heron.store.jsonl import write_text_atomic
from heron.tokenizer.bpe import TOKENIZER_FILE, HeronTokenizer

CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_KEYS: tuple[str, ...] = ("bos_token", "eos_token", "pad_token", "unk_token")


class ChatTemplateError(ValueError):
    """A chat template that does not parse, or that refused the messages."""


class PretrainedTokenizer:
    """A Hugging Face fast tokenizer with its special tokens and chat template."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any] | None = None,
                 chat_template: str | None = None, generation_eos_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self.config = dict(config or {})
        # generation_config.json's eos_token_id: the ids that end a reply, where a model lists
        # more than its tokenizer's eos_token (Llama 3 Instruct's <|eot_id|>).
        self.generation_eos_ids = tuple(int(i) for i in generation_eos_ids)
        self.chat_template = chat_template if chat_template is not None else self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # several named templates: the default one
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")
        self.special_tokens = {key: _token_text(self.config.get(key)) for key in SPECIAL_KEYS}
        for key, text in self.special_tokens.items():
            if text is not None and tokenizer.token_to_id(text) is None:
                raise ValueError(f"{CONFIG_FILE}: {key} {text!r} is not in the vocabulary")

    # ----- ids --------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _id(self, key: str) -> int | None:
        text = self.special_tokens[key]
        return None if text is None else self._tok.token_to_id(text)

    @property
    def bos_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end generation: the eos token, then those generation_config.json adds."""
        ids = ([] if self.eos_id is None else [self.eos_id]) + list(self.generation_eos_ids)
        return tuple(dict.fromkeys(ids))

    @property
    def pad_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    # ----- text -------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids, special tokens added as the tokenizer's post-processor says."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    # ----- chat -------------------------------------------------------------

    @cached_property
    def _template(self) -> Any:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template)
        except TemplateError as err:
            raise ChatTemplateError(f"chat template does not parse: {err}") from err

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            **variables: Any) -> str:
        """The chat rendered as text by the model's own template."""
        if not self.chat_template:
            raise ChatTemplateError("this tokenizer has no chat template (tokenizer_config.json 'chat_template')")
        from jinja2 import TemplateError

        context = {key: text for key, text in self.special_tokens.items() if text is not None}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **context, **variables)
        except TemplateError as err:
            raise ChatTemplateError(f"chat template failed: {err}") from err

    def chat_prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Ids of a chat rendered up to the assistant's turn (the template writes
        its own special tokens, so none are added)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn: the end-of-sequence token (chat models
        name their end-of-turn token as eos_token in tokenizer_config.json)."""
        return self.stop_ids

    def reply_ids(self, text: str) -> list[int]:
        """An assistant reply's ids: the content without added special tokens, then the
        end-of-turn (eos) token. Appended to `chat_prompt_ids`, they make the whole turn."""
        if self.eos_id is None:
            raise ValueError(f"{CONFIG_FILE}: eos_token is not set, so a reply cannot be ended")
        return self.encode(text, add_special_tokens=False) + [self.eos_id]

    # ----- persistence ------------------------------------------------------

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, folder: str | os.PathLike[str]) -> None:
        """tokenizer.json and tokenizer_config.json (with the chat template), each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        write_text_atomic(folder / TOKENIZER_FILE, self.to_json())
        write_text_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False))
        if self.generation_eos_ids:
            write_text_atomic(folder / GENERATION_CONFIG_FILE, json.dumps({"eos_token_id": list(self.stop_ids)}))

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> PretrainedTokenizer:
        """From a folder holding tokenizer.json (and usually tokenizer_config.json)."""
        folder = Path(folder)
        file = folder / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json (Heron reads fast tokenizers only)")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # noqa: BLE001 - the Rust side raises plain Exception
            raise ValueError(f"{file}: not a readable tokenizer.json ({err})") from err
        config: dict[str, Any] = {}
        if (folder / CONFIG_FILE).is_file():
            try:
                config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{folder / CONFIG_FILE}: not valid JSON ({err})") from err
        template = None
        if (folder / TEMPLATE_FILE).is_file():
            template = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
        return cls(tokenizer, config, template, _generation_eos_ids(folder, tokenizer.get_vocab_size(True)))


def _generation_eos_ids(folder: Path, vocab_size: int) -> list[int]:
    """generation_config.json's eos_token_id (one id or a list), checked against the vocabulary."""
    file = folder / GENERATION_CONFIG_FILE
    if not file.is_file():
        return []
    try:
        value = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{file}: not a JSON object ({err})") from None
    ids = [] if value is None else [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
        raise ValueError(f"{file}: eos_token_id {value!r} is not token ids below {vocab_size}")
    return ids


def load_tokenizer(folder: str | os.PathLike[str]) -> HeronTokenizer | PretrainedTokenizer:
    """A folder's tokenizer: an imported one when tokenizer_config.json is there
    (Heron's own tokenizers never write one), else Heron's."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        return PretrainedTokenizer.load(folder)
    return HeronTokenizer.load(folder)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


__all__ = ["ChatTemplateError", "PretrainedTokenizer", "load_tokenizer"]
