"""GGUF export of SentencePiece BPE tokenizers (LLaMA 1/2, Mistral), as llama.cpp's "llama" model.

The tokenizer is built the way Hugging Face's SentencePiece converter builds
LLaMA 2's tokenizer.json: <unk>, <s>, </s>, the 256 <0xXX> byte tokens, then
pieces by score, and merges for every split of a piece into two pieces,
ordered by the piece's score. llama.cpp must then give Hugging Face's ids for
every text, special tokens included, and decode them alike.
"""
import ctypes

import gguf
import pytest
from gguf_layout import CONFIGS, CORPUS, HARD_TEXTS, fields, spec_of
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from heron.core import Transformer
from heron.interop import save_gguf
from heron.interop.gguf_tokenizer import SPACE, gguf_tokenizer_style, spm_scores
from heron.tokenizer.pretrained import PretrainedTokenizer

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
PIECES = 360  # trained pieces (characters and merged), after the specials and bytes
CONFIG = CONFIGS["base"].replace(vocab_size=len(SPECIALS) + len(BYTES) + PIECES + 8)  # room to pad


def trained_pieces() -> list[str]:
    """SentencePiece-like pieces in score order: characters, then merged pieces by merge order."""
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=PIECES, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS * 4, trainer)
    vocab = trainer_tok.get_vocab()
    return sorted(vocab, key=vocab.get)


def converter_merges(vocab: dict[str, int], pieces: list[str]) -> list[tuple[str, str]]:
    """Every split of a piece into two vocabulary pieces, ordered by the piece's score (its place)."""
    merges = []
    for piece in pieces:
        splits = [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))]
        merges += sorted(((left, right) for left, right in splits if left in vocab and right in vocab),
                         key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    return merges


def spm_tokenizer(style: str = "normalizer", drop_merge: int | None = None,
                  split_merges: bool = False) -> PretrainedTokenizer:
    """LLaMA 2's kind of tokenizer.json (or the newer Metaspace spelling, with `style` its
    prepend_scheme); `drop_merge` and `split_merges` spoil the merges the way llama.cpp
    cannot follow: one left out, or one of a piece's two merges moved to the end."""
    pieces = trained_pieces()
    vocab = {text: i for i, text in enumerate(SPECIALS + BYTES + pieces)}
    merges = converter_merges(vocab, pieces)
    if drop_merge is not None:
        del merges[drop_merge]
    if split_merges:
        second = next(i for i in range(1, len(merges)) if "".join(merges[i]) == "".join(merges[i - 1]))
        merges.append(merges.pop(second))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if style == "normalizer":  # LLaMA 2's tokenizer.json
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    else:  # newer files: a Metaspace pre-tokenizer that does not split
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=style, split=False)
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PretrainedTokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


@pytest.fixture(scope="module")
def tokenizer() -> PretrainedTokenizer:
    return spm_tokenizer()


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    return save_gguf(Transformer(CONFIG), tokenizer, tmp_path_factory.mktemp("spm") / "model.gguf")


def test_the_tokenizer_goes_in_as_llama_cpp_sentencepiece_model(tokenizer, exported):
    got = fields(exported)
    assert got["tokenizer.ggml.model"] == "llama"
    assert "tokenizer.ggml.merges" not in got and "tokenizer.ggml.pre" not in got
    assert (got["tokenizer.ggml.bos_token_id"], got["tokenizer.ggml.eos_token_id"],
            got["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert got["tokenizer.ggml.add_bos_token"] is True and got["tokenizer.ggml.add_space_prefix"] is True
    tokens, types = got["tokenizer.ggml.tokens"], got["tokenizer.ggml.token_type"]
    T = gguf.TokenType
    assert types[:3] == [T.UNKNOWN, T.CONTROL, T.CONTROL]
    assert tokens[3:259] == BYTES and set(types[3:259]) == {T.BYTE}
    assert set(types[259:tokenizer.vocab_size]) == {T.NORMAL} and set(types[tokenizer.vocab_size:]) == {T.UNUSED}


def test_scores_rank_each_token_by_its_first_merge(tokenizer, exported):
    scores = fields(exported)["tokenizer.ggml.scores"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in spec_of(tokenizer)["model"]["merges"]]
    made = [tokenizer.backend.token_to_id("".join(pair)) for pair in merges]
    assert scores[made[0]] == 0.0 and scores[made[1]] in (0.0, -1.0)
    assert [scores[i] for i in made] == sorted((scores[i] for i in made), reverse=True)  # rank order
    assert min(scores) <= -len(set(made)) + 1
    assert spm_scores(["ab", "abc", "a"], [("a", "b"), ("ab", "c")]) == [0.0, -1.0, 0.0]


SPECIAL_TEXTS = ["<s>Hello</s> world", "one</s>two <s> three"]


def llama_cpp_decode(llama_cpp, llm, ids: list[int]) -> str:
    """llama.cpp's own detokenizer, special tokens rendered: it drops the space
    prefix, as Hugging Face's Strip decoder does (llama-cpp-python's
    `detokenize` drops it only after <s>)."""
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    buffer = ctypes.create_string_buffer(4096)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buffer, len(buffer), False, True)
    return buffer.raw[:n].decode()


def test_llama_cpp_tokenizes_and_decodes_like_hugging_face(tokenizer, exported):
    llama_cpp = pytest.importorskip("llama_cpp")
    assert gguf_tokenizer_style(spec_of(tokenizer)) == "sentencepiece"
    llm = llama_cpp.Llama(model_path=str(exported), vocab_only=True, verbose=False)
    try:
        for text in HARD_TEXTS + SPECIAL_TEXTS:
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
            assert llama_cpp_decode(llama_cpp, llm, ids) == tokenizer.decode(ids, skip_special=False), text
        assert [tokenizer.backend.id_to_token(i) for i in tokenizer.encode("€", add_special_tokens=False)] == \
            [SPACE, "<0xE2>", "<0x82>", "<0xAC>"]  # a character outside the vocabulary: its bytes
        bos = tokenizer.encode("Hi")  # add_bos_token: both put <s> first
        assert llm.tokenize(b"Hi", add_bos=True) == bos and bos[0] == 1
    finally:
        llm.close()


@pytest.mark.parametrize("scheme", ["always", "first"])
def test_a_metaspace_pre_tokenizer_is_refused(scheme):
    """It adds no space before a text that starts with one ("always"), or after special tokens
    ("first"), where llama.cpp does: "  x" would become other ids."""
    with pytest.raises(ValueError, match=r"^tokenizer.json pre_tokenizer: .*the closest, sentencepiece, needs None "
                                         r"\(a Metaspace pre-tokenizer puts no"):
        gguf_tokenizer_style(spec_of(spm_tokenizer(scheme)))


def test_a_missing_merge_is_refused_naming_it():
    """llama.cpp would join two pieces that make a vocabulary piece whether or not they are a merge."""
    with pytest.raises(ValueError, match=r"model.merges: .* \+ .* make the vocabulary token .* not a merge"):
        gguf_tokenizer_style(spec_of(spm_tokenizer(drop_merge=40)))


def test_a_pieces_merges_apart_in_the_list_are_refused():
    """llama.cpp scores a piece once, so all of its merges rank together."""
    with pytest.raises(ValueError, match=r"model.merges: the merges making .* are not together"):
        gguf_tokenizer_style(spec_of(spm_tokenizer(split_merges=True)))


ADDED_TEXTS = ["Hi <|end|> there", "Hi<|end|>\nthere", "<|end|>\n\nx", "say <tool> now", "ab<tool>cd"]


@pytest.mark.parametrize("flag", ["lstrip", "rstrip", "single_word", "normalized"])
def test_an_added_token_with_a_flag_llama_cpp_lacks_is_refused(flag, tmp_path):
    """Hugging Face strips the whitespace beside such a token (Phi-3's chat tokens carry rstrip), matches
    it only as a whole word, or in the normalized text ("▁" for spaces); llama.cpp matches it in the raw
    text as it is, so "Hi <|end|> there" would become other ids."""
    tokenizer = spm_tokenizer()
    tokenizer.backend.add_special_tokens([AddedToken("<|end|>", special=True, **{"normalized": False, flag: True})])
    with pytest.raises(ValueError, match=rf"^tokenizer.json added_tokens: '<\|end\|>' \(id \d+\) has {flag} true; "
                                         rf".* set {flag} to false in tokenizer.json"):
        save_gguf(Transformer(CONFIG), tokenizer, tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


def test_added_tokens_without_those_flags_tokenize_alike(tmp_path):
    """A special (control) and a plain (user-defined) added token, matched as they are by both."""
    tokenizer = spm_tokenizer()
    tokenizer.backend.add_special_tokens([AddedToken("<|end|>", special=True, normalized=False)])
    tokenizer.backend.add_tokens([AddedToken("<tool>", normalized=False)])
    path = save_gguf(Transformer(CONFIG), tokenizer, tmp_path / "model.gguf")
    T = gguf.TokenType
    types = fields(path)["tokenizer.ggml.token_type"]
    assert [types[tokenizer.backend.token_to_id(t)] for t in ("<|end|>", "<tool>")] == [T.CONTROL, T.USER_DEFINED]
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in ADDED_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tokenizer.encode(text, add_special_tokens=False), text
    finally:
        llm.close()
