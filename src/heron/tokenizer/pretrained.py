"""The tokenizer of an imported model: `tokenizer.json` plus `tokenizer_config.json`.

Special tokens (bos, eos, pad) and the chat template come from
`tokenizer_config.json` (or `chat_template.jinja` beside it), as in Hugging
Face `transformers`. The template is Jinja, rendered in a sandbox within
limits (`heron/tokenizer/chat_template.py`). `encode` adds special tokens the
way the tokenizer's own post-processor says (LLaMA's leading `<s>`), as
`transformers` does by default.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from heron.store.atomic import write_text_atomic
from heron.tokenizer.bpe import (TOKENIZER_FILE, HeronTokenizer, batch_ids, checked_ids, cuts_exact, encoding_of,
                                 exact_pieces, plain_copy)
from heron.tokenizer.chat_template import ChatTemplateError, TemplateLimit, compiled

CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"  # a Hugging Face folder's; its eos_token_id stands in for generation_config.json's
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
EXTRA_TEMPLATES_DIR = "additional_chat_templates"  # transformers writes named templates here, <name>.jinja
SPECIAL_KEYS: tuple[str, ...] = ("bos_token", "eos_token", "pad_token", "unk_token")  # those whose ids Heron uses
# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES): one of these must hold a token. Other
# `*_token` keys hold a token or a setting (Llama's "add_bos_token": true), which is no token.
NAMED_TOKEN_KEYS: tuple[str, ...] = SPECIAL_KEYS + ("sep_token", "cls_token", "mask_token")
REPLY_PROBE = "Heron probes where a reply ends"  # assistant content that no template changes
ADDED_TOKEN_FLAGS: tuple[str, ...] = ("single_word", "lstrip", "rstrip", "normalized", "special")  # AddedToken's


class PretrainedTokenizer:
    """A Hugging Face fast tokenizer with its special tokens and chat template."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any] | None = None,
                 chat_template: str | None = None, generation_eos_ids: Sequence[int] = (),
                 generation_config: dict[str, Any] | None = None) -> None:
        self._tok = tokenizer
        self.config = dict(config or {})
        self.files: tuple[Path, ...] = ()  # the files `load` read, for a lineage to hash
        # generation_config.json's eos_token_id (config.json's without that file): the ids that end
        # a reply, where a model lists more than its tokenizer's eos_token (Llama 3 Instruct's <|eot_id|>).
        self.generation_eos_ids = tuple(int(i) for i in generation_eos_ids)
        # the rest of generation_config.json (a model's sampling defaults), written back as it came
        self.generation_config = dict(generation_config or {})
        # Named templates ("default", "tool_use", ...); chat_template.jinja, given here, is the default.
        self.chat_templates = _named_templates(self.config.get("chat_template"))
        if chat_template is not None:
            self.chat_templates["default"] = chat_template
        self.chat_template = self.chat_templates.get("default")
        self.special_tokens = _special_tokens(self.config)
        for key in SPECIAL_KEYS:
            text = self.special_tokens[key]
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
    def generation_stop_ids(self) -> tuple[int, ...]:
        """generation_config.json's eos_token_id as `save` writes it: the model's list, then the other stop ids."""
        return tuple(dict.fromkeys(self.generation_eos_ids + self.stop_ids))

    @property
    def pad_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    # ----- text -------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, allow_special: bool = True) -> list[int]:
        """Text -> ids, special tokens added as the tokenizer's post-processor says. With
        allow_special=False, special-token text ("<|eot_id|>") is encoded as plain characters."""
        return encoding_of(self._tok if allow_special else self._plain, text, add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True) -> list[list[int]]:
        """Many texts at once on the Rust side, without the post-processor's special tokens (a
        document's ids, as shards hold them)."""
        return batch_ids(self._tok if allow_special else self._plain, texts)

    def plain_pieces(self, text: str, max_chars: int) -> list[tuple[int, int]]:
        """As HeronTokenizer.plain_pieces: pieces whose plain encodings join to the whole text's,
        cut only for a byte-level pipeline like Heron's own (else the text stays whole)."""
        return exact_pieces(text, max_chars if self._cuts_exact else len(text) + 1)

    @cached_property
    def _cuts_exact(self) -> bool:
        # Asked once, as HeronTokenizer asks it in __init__: cuts_exact parses the whole
        # tokenizer.json, about 0.15 s for a 150k vocabulary, which per document dominated preparation.
        return cuts_exact(self._tok)

    def fingerprint(self) -> str:
        """sha256 of the tokenizer.json text, as HeronTokenizer's: shards and lineage record it."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @cached_property
    def _plain(self) -> Tokenizer:
        return plain_copy(self._tok)  # made on first use: a 150k vocabulary takes about a second

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode(checked_ids(ids, self.vocab_size), skip_special_tokens=skip_special)

    # ----- chat -------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: object = None) -> str:
        """The template to render, picked as transformers' `get_chat_template` picks it:
        `chat_template` names one of the tokenizer's templates (or is a template itself); without
        it, "tool_use" when tools are given and there is one, else "default"."""
        return self._picked_template(chat_template, tools)[1]

    def _picked_template(self, chat_template: str | None, tools: object) -> tuple[str, str]:
        """(how errors name it, the template) for get_chat_template."""
        if chat_template is not None:
            if chat_template in self.chat_templates:
                return repr(chat_template), self.chat_templates[chat_template]
            return "(passed as chat_template)", chat_template
        if tools is not None and "tool_use" in self.chat_templates:
            return "'tool_use'", self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return "'default'", self.chat_templates["default"]
        if self.chat_templates:
            raise ChatTemplateError(f"{CONFIG_FILE} has several chat templates {sorted(self.chat_templates)} and "
                                    "none is named 'default'; pass chat_template=<name> to choose one")
        raise ChatTemplateError("this tokenizer has no chat template (tokenizer_config.json 'chat_template')")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, *,
                            chat_template: str | None = None, **variables: Any) -> str:
        """The chat rendered as text by the model's own template. The template sees every special
        token (`eos_token`, `sep_token`, ...) and `variables`, which win over them, as in transformers."""
        name, text = self._picked_template(chat_template, variables.get("tools"))
        try:
            template = compiled(text)
        except ChatTemplateError as err:  # a tokenizer may hold several: every error names the one at fault
            raise ChatTemplateError(f"chat template {name} does not parse: {err.__cause__}") from err
        _check_messages(messages)
        context = ({"tools": None, "documents": None}  # defined, as transformers passes them: `is not none` tests
                   | {key: text for key, text in self.special_tokens.items() if text is not None} | variables)
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except TemplateLimit as err:
            raise ChatTemplateError(f"chat template {name} hit a limit: {err}") from err
        except ChatTemplateError as err:  # its raise_exception(message)
            raise ChatTemplateError(f"chat template {name} refused the chat: {err}") from err
        except Exception as err:  # noqa: BLE001 - a template is foreign code: whatever it raises is its failure
            raise ChatTemplateError(f"chat template failed: template {name} raised {type(err).__name__}: {err}") from err

    def chat_prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Ids of a chat rendered up to the assistant's turn (the template writes
        its own special tokens, so none are added). The rendered text is encoded whole,
        as transformers encodes it, so no text of a message may spell a special token: it would
        become that control token (a user's "<|im_end|>" ending their turn). Not its content only:
        templates render a message's name, reasoning and tool calls too."""
        _check_messages(messages)
        for where, text in _message_texts(messages, "messages"):
            spelled = self._special_spelled(text)
            if spelled is not None:
                raise ValueError(f"{where} spells the special token {spelled!r}, which the "
                                 "chat template's text would turn into that control token; remove it")
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)

    def _special_spelled(self, content: Any) -> str | None:
        """The first special token whose text occurs in a message's content (a string, or
        content parts with "text"), or None."""
        parts = [content] if isinstance(content, str) else [p.get("text") for p in content or [] if isinstance(p, dict)]
        texts = [t for t in parts if isinstance(t, str)]
        return next((token for token in self._special_texts for text in texts if token in text), None)

    @cached_property
    def _special_texts(self) -> tuple[str, ...]:
        return tuple(t.content for t in self._tok.get_added_tokens_decoder().values() if t.special)

    @cached_property
    def _reply_end_id(self) -> int | None:
        """The token that ends an assistant turn: the special token the chat template writes right
        after a reply, a stop id first (Heron's exported <|end|>, Llama 3's <|eot_id|>, while eos_token
        may be <|end_of_text|>), else any (a base model's ChatML <|im_end|> beside eos <|endoftext|>);
        eos_token where the template writes none or there is no template."""
        if not self.chat_template:
            return self.eos_id
        turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": REPLY_PROBE}]
        for chat in (turns, [{"role": "system", "content": "."}, *turns]):  # some templates want a system turn
            try:
                after = self.apply_chat_template(chat).partition(REPLY_PROBE)[2].lstrip()  # ChatML: '\n<|im_end|>'
            except ValueError:
                continue
            ends = [i for i in self.stop_ids if after.startswith(self._tok.id_to_token(i))]
            specials = [t for t in self._special_texts if after.startswith(t)]
            if ends or specials:
                return ends[0] if ends else self._tok.token_to_id(max(specials, key=len))
            return self.eos_id
        return self.eos_id  # a template that renders neither chat: no better guess than eos

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn: the one its template writes (usually eos_token: chat
        models name their end-of-turn token so), then every other stop id."""
        first = [] if self._reply_end_id is None else [self._reply_end_id]
        return tuple(dict.fromkeys(first + list(self.stop_ids)))

    def reply_ids(self, text: str) -> list[int]:
        """An assistant reply's ids on their own: the content without added special tokens, then
        the end-of-turn token. `chat_turn_ids` gives them as the template renders them after a prompt."""
        return self.encode(text, add_special_tokens=False, allow_special=False) + [self._turn_end()]

    def _turn_end(self) -> int:
        if self._reply_end_id is None:
            raise ValueError(f"{CONFIG_FILE}: eos_token is not set, so a reply cannot be ended")
        return self._reply_end_id

    def chat_turn_ids(self, messages: list[dict[str, Any]], reply: str) -> tuple[list[int], list[int]]:
        """(prompt ids, reply ids) of `messages` answered by `reply`, as the chat template renders the
        whole chat and transformers encodes it: the reply's ids run from the first token that reaches
        past the rendered prompt up to and including the end-of-turn token. So what a template writes
        around a reply is trained as it renders (Llama 2's ' ' before it, ChatML's '\\n' before
        <|im_end|>, a `| trim`, SentencePiece's word boundary, a newline the prompt's last one merges
        with), not the content encoded alone. Where the generation prompt is not how the whole chat
        starts (one that opens a `<think>` a finished reply lacks), or the reply spells a special
        token (plain text, never that control token), the reply is the content encoded on its own
        after `chat_prompt_ids`, as `reply_ids` makes it."""
        head = self.chat_prompt_ids(messages)
        if not self.chat_template or self._special_spelled(reply) is not None:
            return head, self.reply_ids(reply)
        prompt = self.apply_chat_template(messages, add_generation_prompt=True)
        whole = self.apply_chat_template([*messages, {"role": "assistant", "content": reply}])
        if not whole.startswith(prompt):
            return head, self.reply_ids(reply)
        encoding = encoding_of(self._tok, whole)
        ids = encoding.ids
        cut = next((i for i, (_, stop) in enumerate(encoding.offsets) if stop > len(prompt)), len(ids))
        end, tail = self._turn_end(), ids[cut:]
        return ids[:cut], tail[:tail.index(end) + 1] if end in tail else tail + [end]  # a template that writes none

    # ----- persistence ------------------------------------------------------

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, folder: str | os.PathLike[str]) -> None:
        """tokenizer.json, tokenizer_config.json (with the chat templates) and, where stop ids go
        beyond eos_token, generation_config.json, each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        if list(self.chat_templates) == ["default"]:
            config["chat_template"] = self.chat_template
        elif self.chat_templates:  # several: the list of named templates transformers writes
            config["chat_template"] = [{"name": name, "template": t} for name, t in self.chat_templates.items()]
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        write_text_atomic(folder / TOKENIZER_FILE, self.to_json())
        write_text_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False))
        if self.generation_eos_ids or self.generation_config:
            # transformers' generate stops at every id of the list and pads with pad_token_id.
            ids = {"bos_token_id": self.bos_id, "eos_token_id": list(self.generation_stop_ids),
                   "pad_token_id": self.pad_id}
            generation = self.generation_config | {key: value for key, value in ids.items() if value is not None}
            write_text_atomic(folder / GENERATION_CONFIG_FILE, json.dumps(generation, indent=2))

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> PretrainedTokenizer:
        """From a folder holding tokenizer.json (and usually tokenizer_config.json). `files` of the
        result lists every file read, for a lineage to hash."""
        folder = Path(folder)
        file = folder_file(folder, TOKENIZER_FILE)
        if file is None:
            raise FileNotFoundError(f"{folder / TOKENIZER_FILE}: no tokenizer.json (Heron reads fast tokenizers only)")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # noqa: BLE001 - the Rust side raises plain Exception
            raise ValueError(f"{file}: not a readable tokenizer.json ({err})") from err
        read = [file]
        config: dict[str, Any] = {}
        if (config_file := folder_file(folder, CONFIG_FILE)) is not None:
            read.append(config_file)
            config = _json_object(config_file, "settings")
        if (map_file := folder_file(folder, SPECIAL_TOKENS_MAP_FILE)) is not None:  # older folders' special tokens
            read.append(map_file)
            config = _with_special_tokens_map(config, _json_object(map_file, "special tokens"))
        tokenizer.add_tokens(_added_tokens(tokenizer, config))  # their flags win over tokenizer.json's
        template = None
        if (template_file := folder_file(folder, TEMPLATE_FILE)) is not None:
            read.append(template_file)
            template = _read_text(template_file)
        named_files = sorted((folder / EXTRA_TEMPLATES_DIR).glob("*.jinja"))  # transformers' named templates
        if extra := [f for f in named_files if folder_file(folder, f.relative_to(folder))]:
            read += extra
            named = _named_templates(config.get("chat_template"))
            named.update({f.stem: _read_text(f) for f in extra})
            config = {**config, "chat_template": [{"name": n, "template": t} for n, t in named.items()]}
        if (generation_file := folder_file(folder, GENERATION_CONFIG_FILE)) is not None:
            read.append(generation_file)
        generation, eos_ids = _generation_config(generation_file, tokenizer.get_vocab_size(True))
        if generation_file is None and (model_file := folder_file(folder, MODEL_CONFIG_FILE)) is not None:
            # transformers builds the generation config from config.json then, its eos_token_id list included
            eos_ids = _model_config_eos_ids(model_file, tokenizer.get_vocab_size(True))
            read += [model_file] if eos_ids else []
        loaded = cls(tokenizer, config, template, eos_ids, generation)
        loaded.files = tuple(read)
        return loaded


def folder_file(folder: Path, name: str | os.PathLike[str]) -> Path | None:
    """`folder / name` if it is a file there, else None; ValueError if it is a link to a file outside
    the folder, which would copy whatever file it names (a key, a password file) into every checkpoint
    made from the folder. A Hugging Face cache snapshot (<repo>/snapshots/<revision>/) links its files
    to <repo>/blobs/, so there links within the repo are the folder's own."""
    path = folder / name
    if not path.is_file():
        return None
    home, target = folder.resolve(), path.resolve()
    repo = home.parent.parent  # <repo>, where home is <repo>/snapshots/<revision>
    roots = [home, repo] if home.parent.name == "snapshots" and (repo / "blobs").is_dir() else [home]
    if not any(target.is_relative_to(root) for root in roots):
        raise ValueError(f"{path}: a link to {target}, outside the folder {home}; copy the file into the folder "
                         "if it belongs to the model")
    return path


def _generation_config(file: Path | None, vocab_size: int) -> tuple[dict[str, Any], list[int]]:
    """generation_config.json as it is, and its eos_token_id (one id or a list) checked against
    the vocabulary; ({}, []) without the file."""
    if file is None:
        return {}, []
    raw = _json_object(file, "generation settings")
    return raw, _eos_ids(file, raw, vocab_size)


def _eos_ids(file: Path, settings: dict[str, Any], vocab_size: int) -> list[int]:
    """The eos_token_id of `settings` read from `file` (one id, a list, or none), checked against the vocabulary."""
    value = settings.get("eos_token_id")
    ids = [] if value is None else [value] if isinstance(value, int) else value
    # bool is an int to Python, yet `true` is no token id
    if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < vocab_size for i in ids):
        raise ValueError(f"{file}: eos_token_id {value!r} is not token ids below {vocab_size}")
    return ids


def _model_config_eos_ids(file: Path, vocab_size: int) -> list[int]:
    """config.json's eos_token_id, standing in for a missing generation_config.json. Not the
    tokenizer's own file: ids it does not hold are a warning, and only the tokenizer's eos stops."""
    try:
        return _eos_ids(file, _json_object(file, "settings"), vocab_size)
    except ValueError as err:
        warnings.warn(f"{err}; generation stops at the tokenizer's eos token only", RuntimeWarning, stacklevel=4)
        return []


def load_tokenizer(folder: str | os.PathLike[str]) -> HeronTokenizer | PretrainedTokenizer:
    """A folder's tokenizer: an imported one when tokenizer_config.json or chat_template.jinja
    is there (Heron's own tokenizers write neither), else Heron's."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file() or (folder / TEMPLATE_FILE).is_file():
        return PretrainedTokenizer.load(folder)
    return HeronTokenizer.load(folder)


def _read_text(file: Path) -> str:
    """`file`'s text; a ValueError naming the file where it is not UTF-8 (Python's names only the byte)."""
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text ({err}); save it as UTF-8") from err


def _json_object(file: Path, holding: str) -> dict[str, Any]:
    """The JSON object in `file` (of `holding`, for the error); a ValueError naming the file else."""
    try:
        value = json.loads(_read_text(file))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{file}: must be a JSON object of {holding}, got {type(value).__name__}")
    return value


def _with_special_tokens_map(config: dict[str, Any], mapped: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json's settings with the special tokens special_tokens_map.json names, which
    win, as transformers reads an older folder (bos and eos there only: a template's {{ bos_token }}
    rendered empty)."""
    return {**config, **{key: value for key, value in mapped.items() if key.endswith("_token")}}


def _added_tokens(tokenizer: Tokenizer, config: dict[str, Any]) -> list[AddedToken]:
    """The added tokens transformers' fast tokenizer adds again when it loads a folder
    (TokenizersBackend.__init__, `tokens_to_add`), so that their flags win over tokenizer.json's:
    tokenizer_config.json's added_tokens_decoder in id order (tokenizer.json's own added tokens
    where the key is missing; none where it is {}), each made special where a named special
    token (eos_token, ...) spells it. `tokenizers` never unmarks a special token (decode still
    skips one re-added as not special), so such a token is written special too: a saved folder
    then decodes as this one does."""
    entries = (_added_tokens_decoder(config) if "added_tokens_decoder" in config
               else sorted(tokenizer.get_added_tokens_decoder().items()))
    named = {text for text in _special_tokens(config).values() if text is not None}
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    tokens = []
    for _, token in entries:
        if not token.special and token.content in named:
            token.special = True  # as transformers does; its `normalized` default follows (not special)
        if not token.special and token.content in special:
            token = AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip,
                               rstrip=token.rstrip, normalized=token.normalized, special=True)
        tokens.append(token)
    return tokens


def _added_tokens_decoder(config: dict[str, Any]) -> list[tuple[int, AddedToken]]:
    """tokenizer_config.json's added_tokens_decoder ({"<id>": {"content": ..., <flag>: bool}}) as
    (id, AddedToken) in id order; a flag left out takes AddedToken's default, as in transformers."""
    value = config["added_tokens_decoder"]
    if not isinstance(value, dict):
        raise ValueError(f"{CONFIG_FILE}: added_tokens_decoder must be an object of token id -> added token, "
                         f"got {type(value).__name__}")
    tokens = []
    for key, entry in value.items():
        where = f"{CONFIG_FILE}: added_tokens_decoder[{key!r}]"
        if not (isinstance(key, str) and key.isdigit()):
            raise ValueError(f"{where}: the key must be a token id")
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise ValueError(f"{where} must be an added token with its 'content', got {entry!r:.80}")
        flags = {flag: entry[flag] for flag in ADDED_TOKEN_FLAGS if flag in entry}
        if unknown := sorted(set(entry) - set(flags) - {"content"}):
            raise ValueError(f"{where} ({entry['content']!r}): unknown key {unknown[0]!r}; an added token "
                             f"has 'content' and the flags {', '.join(ADDED_TOKEN_FLAGS)}")
        if bad := next((flag for flag, on in flags.items() if not isinstance(on, bool)), None):
            raise ValueError(f"{where} ({entry['content']!r}): {bad} must be true or false, got {flags[bad]!r}")
        tokens.append((int(key), AddedToken(entry["content"], **flags)))
    return sorted(tokens, key=lambda pair: pair[0])


def _special_tokens(config: dict[str, Any]) -> dict[str, str | None]:
    """Every special token tokenizer_config.json names, as transformers hands them all to the chat
    template: bos/eos/pad/unk always (None when unset), then any other `*_token` key holding a token."""
    tokens: dict[str, str | None] = dict.fromkeys(SPECIAL_KEYS)
    for key, value in config.items():
        text = _token_text(key, value) if key.endswith("_token") else None
        if text is not None:
            tokens[key] = text
    return tokens


def _token_text(key: str, value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if key in NAMED_TOKEN_KEYS:
        raise ValueError(f"{CONFIG_FILE}: {key} must be a token string or an AddedToken dict with its "
                         f"'content', got {value!r:.80}")
    return None  # a setting such as "add_bos_token": true


def _named_templates(value: Any) -> dict[str, str]:
    """tokenizer_config.json's chat_template: one template (the default), or the list of
    {"name", "template"} entries transformers writes for several."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if not isinstance(value, list):
        raise ValueError(f"{CONFIG_FILE}: chat_template must be a template or a list of named templates, "
                         f"got {type(value).__name__}")
    named = {}
    for i, entry in enumerate(value):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)):
            raise ValueError(f"{CONFIG_FILE}: chat_template[{i}] must be a {{'name': ..., 'template': ...}} "
                             f"of strings, got {entry!r:.80}")
        named[entry["name"]] = entry["template"]
    return named


def _message_texts(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(where, text) of every string in `value`, a chat's messages or part of one, found
    through its dicts and lists; where as `messages[0]['content'][1]['text']`."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _message_texts(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _message_texts(item, f"{where}[{i}]")


def _check_messages(messages: object) -> None:
    """What every template assumes: a list of message dicts whose content is text, a list of
    content parts, or None (a tool call's). Roles and other keys are the template's business."""
    if not isinstance(messages, list | tuple):
        raise ValueError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        content = message.get("content")
        if not (content is None or isinstance(content, str | list)):
            raise ValueError(f"messages[{i}]['content'] must be a string or a list of content parts, "
                             f"got {type(content).__name__}")


__all__ = ["ChatTemplateError", "PretrainedTokenizer", "folder_file", "load_tokenizer"]
