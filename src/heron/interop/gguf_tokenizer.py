"""A tokenizer.json as GGUF tokenizer metadata that llama.cpp tokenizes alike.

llama.cpp has no tokenizer.json reader: it runs one of a few tokenizer
models, told by "tokenizer.ggml.model", on the vocabulary arrays in the
file. Two of them reproduce what Hugging Face tokenizers do, and each
tokenizer.json is matched field by field against the spellings known to
give the same ids (`STYLES`); any other is refused naming the field at fault.

- "gpt2": byte-level BPE (GPT-2, Llama 3, Qwen2, and Heron's own), the
  merges written as they are, and "tokenizer.ggml.pre" naming how text is
  split before merging: GPT-2's built-in regex ("gpt-2"), Llama 3's
  ("llama-bpe") or Qwen2's ("qwen2").
- "llama": SentencePiece BPE as LLaMA 1/2 and Mistral 7B v0.1 ship it
  (tokenizer.json converted from their tokenizer.model, `SPM_NORMALIZER`):
  spaces become "▁" and one is put before each stretch of text, characters
  merge with no split beforehand, and a character outside the vocabulary
  becomes its UTF-8 bytes' <0xXX> tokens.
  llama.cpp merges the adjacent pair whose joined text has the highest score,
  where Hugging Face merges the pair of lowest rank; the scores written are
  minus the rank of the first merge that makes each token. That is the same
  order when every split of a token into two vocabulary tokens is a merge,
  and a token's merges come together in the list, as Hugging Face's
  SentencePiece converter writes them; `_check_spm_merges` refuses others.
  Newer files spell the space prefix as a Metaspace pre-tokenizer, which
  places it otherwise (`SPM_NORMALIZER`), and are refused.

Added tokens go in as control (special) or user-defined tokens, which
llama.cpp matches in the raw text, as they are, and nothing more: a file has
no place for Hugging Face's lstrip, rstrip, single_word or (with a
normalizer) normalized flags, so a tokenizer with any of them set is refused
too (`ADDED_TOKEN_FLAGS`).
"""
from __future__ import annotations

import json
import re
from typing import Any

import gguf
from tokenizers import Tokenizer

from heron.tokenizer.bpe import CHAT_TEMPLATE_JINJA, HeronTokenizer
from heron.tokenizer.pretrained import PretrainedTokenizer

_W = gguf.GGUFWriter

# Fields every BPE style shares: plain merging of whole symbols. Empty, null and false
# agree; a digit in a path indexes a list.
_BPE = {
    "model.type": "BPE",
    "model.continuing_subword_prefix": None,
    "model.end_of_word_suffix": None,
    "model.dropout": None,
}
# Byte-level: no normalizer, the pre-tokenizer's regex split, then bytes to printable symbols.
_BYTE_LEVEL = {**_BPE, "normalizer": None, "model.byte_fallback": False}
GPT2_TOKENIZER: dict[str, Any] = {
    **_BYTE_LEVEL,
    "pre_tokenizer.type": "ByteLevel",  # GPT-2's regex built in
    "pre_tokenizer.add_prefix_space": False,
    "pre_tokenizer.use_regex": True,
    "model.ignore_merges": False,
}
# Llama 3 and Qwen2 split with a regex of their own (the strings in their tokenizer.json),
# then map bytes without GPT-2's regex. Llama 3 takes a whole word that is in the
# vocabulary as one token without merging (ignore_merges), as llama.cpp does for "llama-bpe".
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one


def _regex_then_bytes(regex: str, ignore_merges: bool) -> dict[str, Any]:
    return {
        **_BYTE_LEVEL,
        "pre_tokenizer.type": "Sequence",
        "pre_tokenizer.pretokenizers.0.type": "Split",
        "pre_tokenizer.pretokenizers.0.pattern.Regex": regex,
        "pre_tokenizer.pretokenizers.0.behavior": "Isolated",
        "pre_tokenizer.pretokenizers.0.invert": False,
        "pre_tokenizer.pretokenizers.1.type": "ByteLevel",
        "pre_tokenizer.pretokenizers.1.add_prefix_space": False,
        "pre_tokenizer.pretokenizers.1.use_regex": False,
        "pre_tokenizer.pretokenizers.2": None,  # nothing after
        "model.ignore_merges": ignore_merges,
    }


SPACE = "▁"  # SentencePiece's visible space
# SentencePiece BPE as LLaMA 2's tokenizer.json spells it: characters, with bytes for those
# outside the vocabulary; the normalizer, which runs on each stretch of text between special
# tokens, puts "▁" before it as llama.cpp's space prefix does (before the text and after every
# special token). The newer spelling, a Metaspace pre-tokenizer, differs: it adds no "▁" to a
# text that already starts with a space ("always"), or none after special tokens ("first").
METASPACE_WHY = (" (a Metaspace pre-tokenizer puts no '▁' before a text that starts with a space, or after "
                 "special tokens, where llama.cpp does)")
SPM_NORMALIZER = {
    **_BPE,
    "model.byte_fallback": True,
    "model.ignore_merges": False,
    "pre_tokenizer": None,
    "normalizer.type": "Sequence",
    "normalizer.normalizers.0.type": "Prepend",
    "normalizer.normalizers.0.prepend": SPACE,
    "normalizer.normalizers.1.type": "Replace",
    "normalizer.normalizers.1.pattern.String": " ",
    "normalizer.normalizers.1.content": SPACE,
    "normalizer.normalizers.2": None,  # nothing after
}

# style -> (tokenizer.ggml.model, tokenizer.json fields). A "gpt2" style's name is its
# tokenizer.ggml.pre.
STYLES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt-2": ("gpt2", GPT2_TOKENIZER),
    "llama-bpe": ("gpt2", _regex_then_bytes(LLAMA3_REGEX, ignore_merges=True)),
    "qwen2": ("gpt2", _regex_then_bytes(QWEN2_REGEX, ignore_merges=False)),
    "sentencepiece": ("llama", SPM_NORMALIZER),
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")

# An added token's flag -> what Hugging Face then does that llama.cpp, which matches every added
# token in the raw text as it is (llama-vocab.cpp: tokenizer_st_partition), does not: its ids for
# text beside the token would differ. llama.cpp strips whitespace only for a few tokens its own
# code names; "normalized" matters only where a normalizer changes the text (SentencePiece's "▁").
ADDED_TOKEN_FLAGS: dict[str, str] = {
    "lstrip": "Hugging Face drops the whitespace before it",
    "rstrip": "Hugging Face drops the whitespace after it",
    "single_word": "Hugging Face matches it only as a whole word",
    "normalized": "Hugging Face matches it in the normalized text, where its normalizer has put '▁' for spaces",
}


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: HeronTokenizer | PretrainedTokenizer, vocab_size: int) -> None:
    """The tokenizer's arrays, special tokens and chat template, padded to the
    model's `vocab_size` with unused tokens."""
    spec = json.loads(tokenizer.to_json())
    style = gguf_tokenizer_style(spec)
    ggml_model = STYLES[style][0]
    tokens, types = _vocab(tokenizer.backend, spec, vocab_size, sentencepiece=ggml_model == "llama")
    writer.add_tokenizer_model(ggml_model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    pairs = _pairs(spec["model"]["merges"])
    if ggml_model == "gpt2":
        writer.add_tokenizer_pre(style)
        writer.add_token_merges([" ".join(pair) for pair in pairs])
    else:
        writer.add_token_scores(spm_scores(tokens, pairs))
        writer.add_add_space_prefix(True)
        unk = spec["model"].get("unk_token")
        unk_id = tokenizer.backend.token_to_id(unk) if unk else None
        if unk_id is not None:
            writer.add_unk_token_id(unk_id)
    for add, token_id in ((_W.add_bos_token_id, tokenizer.bos_id), (_W.add_eos_token_id, tokenizer.eos_id),
                          (_W.add_pad_token_id, tokenizer.pad_id)):
        if token_id is not None:
            add(writer, token_id)
    add_bos, add_eos = _adds_bos_eos(tokenizer.backend, tokenizer.bos_id, tokenizer.eos_id)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = CHAT_TEMPLATE_JINJA if isinstance(tokenizer, HeronTokenizer) else tokenizer.chat_template
    if template:
        writer.add_chat_template(template)


def gguf_tokenizer_style(spec: dict[str, Any]) -> str:
    """The `STYLES` entry under which llama.cpp tokenizes as this tokenizer.json
    does; a ValueError naming the field at fault, on the known style with
    fewest differences, when none does (or, for SentencePiece, the merge; or
    the added token and its flag)."""
    misses = {name: [(path, want, _field(spec, path)) for path, want in fields.items()
                     if _field(spec, path) != want and (_field(spec, path) or want)]
              for name, (_, fields) in STYLES.items()}
    # Byte-level or SentencePiece as byte_fallback says; then fewest differences; on a tie, the
    # one whose split regex matches.
    name = min(misses, key=lambda n: (any(path == "model.byte_fallback" for path, *_ in misses[n]), len(misses[n]),
                                      any(".pattern." in path for path, *_ in misses[n])))
    if misses[name]:
        path, want, got = misses[name][0]
        raise ValueError(f"tokenizer.json {path}: {got!r}; GGUF export supports byte-level BPE split as "
                         f"{', '.join(n for n, (m, _) in STYLES.items() if m == 'gpt2')} split text, and "
                         f"SentencePiece BPE as LLaMA 2's tokenizer.json spells it; the closest, {name}, "
                         f"needs {want!r}{METASPACE_WHY if _field(spec, 'pre_tokenizer.type') == 'Metaspace' else ''}")
    if STYLES[name][0] == "llama":
        _check_spm_merges(spec)
    _check_added_tokens(spec)
    return name


def _field(spec: Any, path: str) -> Any:
    """spec's value at a dotted path ("pre_tokenizer.pretokenizers.0.type"); None where missing."""
    for key in path.split("."):
        if isinstance(spec, list) and key.isdigit():
            spec = spec[int(key)] if int(key) < len(spec) else None
        else:
            spec = spec.get(key) if isinstance(spec, dict) else None
    return spec


def _pairs(merges: list[Any]) -> list[tuple[str, str]]:
    """tokenizer.json's merges, in rank order, as (left, right): older files write "left right"."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _check_spm_merges(spec: dict[str, Any]) -> None:
    """Refuse SentencePiece merges that llama.cpp's score order would not
    follow (module docstring): a pair of vocabulary tokens that joins into a
    vocabulary token without being a merge, or a token whose merges are
    interleaved with another's."""
    vocab: dict[str, int] = spec["model"]["vocab"]
    pairs = _pairs(spec["model"]["merges"])
    ranks: dict[str, list[int]] = {}  # token -> the ranks of the merges making it, ascending
    for rank, (left, right) in enumerate(pairs):
        ranks.setdefault(left + right, []).append(rank)
    for made, found in ranks.items():
        if found[-1] - found[0] + 1 != len(found):
            raise ValueError(f"tokenizer.json model.merges: the merges making {made!r} are not together; "
                             "llama.cpp ranks a token's merges as one")
    known = set(pairs)
    for token in vocab:
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab and (left, right) not in known:
                raise ValueError(f"tokenizer.json model.merges: {left!r} + {right!r} make the vocabulary token "
                                 f"{token!r} but are not a merge; llama.cpp would merge them")


def _check_added_tokens(spec: dict[str, Any]) -> None:
    """Refuse an added token with a flag llama.cpp would not follow (`ADDED_TOKEN_FLAGS`)."""
    flags = [flag for flag in ADDED_TOKEN_FLAGS if flag != "normalized" or spec.get("normalizer") is not None]
    for added in spec.get("added_tokens", []):
        flag = next((flag for flag in flags if added.get(flag)), None)
        if flag is not None:
            raise ValueError(f"tokenizer.json added_tokens: {added['content']!r} (id {added['id']}) has {flag} true; "
                             f"{ADDED_TOKEN_FLAGS[flag]}, and llama.cpp, which reads no such flag from a GGUF file, "
                             f"would tokenize the text beside it otherwise; set {flag} to false in tokenizer.json "
                             "(Hugging Face then tokenizes as llama.cpp does) to export it")


def spm_scores(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    """Per token id: minus the rank of the first merge making it, 0 for the
    rest (characters, bytes, special tokens, which no merge makes)."""
    rank: dict[str, int] = {}
    for r, (left, right) in enumerate(merges):
        rank.setdefault(left + right, r)
    return [-float(rank[text]) if text in rank else 0.0 for text in tokens]


def _vocab(backend: Tokenizer, spec: dict[str, Any], vocab_size: int,
           sentencepiece: bool) -> tuple[list[str], list[int]]:
    """Token texts and types by id, padded to the model's vocab_size with unused
    tokens. Added tokens are control tokens when special, else user-defined;
    SentencePiece's <0xXX> tokens are bytes and its unk token unknown."""
    vocab = backend.get_vocab(with_added_tokens=True)  # text -> id
    largest = max(vocab.values())
    if largest >= vocab_size:
        raise ValueError(f"vocab_size: the model has {vocab_size} embeddings, the tokenizer has token id {largest}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in vocab.items():
        byte = sentencepiece and _BYTE_TOKEN.fullmatch(text)
        tokens[i], types[i] = text, int(gguf.TokenType.BYTE if byte else gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        types[added["id"]] = int(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    if sentencepiece and spec["model"].get("unk_token") in vocab:  # an added special token too, in LLaMA's files
        types[vocab[spec["model"]["unk_token"]]] = int(gguf.TokenType.UNKNOWN)
    return tokens, types


def _adds_bos_eos(backend: Tokenizer, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
    """Whether the tokenizer's post-processor puts bos before a text and eos
    after it (LLaMA's leading <s>): llama.cpp's add_bos_token and add_eos_token."""
    ids = backend.encode("a", add_special_tokens=True).ids
    return bos_id is not None and ids[0] == bos_id, eos_id is not None and ids[-1] == eos_id


__all__ = ["ADDED_TOKEN_FLAGS", "GPT2_TOKENIZER", "LLAMA3_REGEX", "QWEN2_REGEX", "SPM_NORMALIZER", "STYLES",
           "add_tokenizer", "gguf_tokenizer_style", "spm_scores"]
