import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models

from heron.generate.text import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopStringFilter,
    first_stop,
    held_back_length,
    trim_at_stop,
)
from heron.tokenizer import SPECIAL_TOKENS, HeronTokenizer, PretrainedTokenizer, train_tokenizer


def test_detokenizer_never_splits_a_multibyte_character(byte_tokenizer):
    text = "naïve → café 日本語 ok"
    tok = byte_tokenizer
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in tok.encode(text)]
    assert "".join(pieces) + detok.flush() == text
    assert not any(REPLACEMENT_CHAR in p for p in pieces)
    assert pieces[tok.encode(text).index(0xC3)] == ""  # first byte of "ï": wait for the second


def test_detokenizer_skips_special_tokens_and_flush_completes_the_text(tokenizer):
    tok = tokenizer
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode("ab") + [tok.pad_id] + tok.encode("c")
    assert [detok.push(i) for i in ids] == ["a", "b", "", "c"]
    assert detok.flush() == ""


def test_flush_returns_a_dangling_partial_character(byte_tokenizer):
    tok = byte_tokenizer
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in b"a\xe2\x86"]  # "a" then 2 of the 3 bytes of "→"
    assert pieces == ["a", "", ""]
    assert detok.flush() == REPLACEMENT_CHAR  # what a full decode shows


def test_stop_filter_holds_back_a_possible_stop_and_releases_it_when_it_is_not():
    f = StopStringFilter(["END"])
    assert [f.feed(p) for p in ["ab", "E", "N", "x"]] == ["ab", "", "", "ENx"]
    assert not f.stopped


def test_stop_filter_cuts_at_the_stop_string():
    f = StopStringFilter(["END", "\n\n"])
    assert [f.feed(p) for p in ["ab", "EN", "Dzz", "more"]] == ["ab", "", "", ""]
    assert f.stopped and f.finish() == ""


def test_stop_filter_cuts_at_the_earliest_of_two_stops_completing_together():
    f = StopStringFilter(["abcd", "bc"])
    assert f.feed("xab") == "x"  # "ab" may start "abcd"
    assert f.feed("cd") == ""  # both complete; "abcd" starts first
    assert f.stopped


def test_finish_releases_a_held_tail():
    f = StopStringFilter(["END"])
    assert f.feed("xEN") == "x" and f.finish() == "EN"


def test_stop_helpers():
    assert first_stop("hello world", ["o", "ll"]) == 2
    assert first_stop("hello", ["z"]) is None
    assert held_back_length("abcE", ["END"]) == 1
    assert held_back_length("abEN", ["END", "NX"]) == 2
    assert held_back_length("abc", ["END"]) == 0
    assert trim_at_stop("one\ntwo", ["\n"]) == "one"


# ----- streamed text equals the whole decode, and each push decodes a bounded window -----

MULTIBYTE_TEXTS = ["naïve café → 日本語の文章 ελληνικά 🎉🐍 ok\n" * 4, "plain words, and more plain words\n" * 4]
SPACE = "▁"  # SentencePiece's word boundary
SPM_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2; byte <0xXX> is id 3 + XX
SPM_PIECES = [SPACE, "a", "b", SPACE + "a", SPACE + "ab", "é", SPACE + "日本", "語", "hello", SPACE + "hello"]


@pytest.fixture(scope="module")
def heron_tokenizer() -> HeronTokenizer:
    """Heron's byte-level BPE, with merges inside multi-byte characters (tokens of partial UTF-8)."""
    return train_tokenizer(MULTIBYTE_TEXTS * 5, vocab_size=400, progress=False)


@pytest.fixture(scope="module")
def spm_tokenizer() -> PretrainedTokenizer:
    """An imported LLaMA-2-style tokenizer: SentencePiece pieces, <0xXX> byte fallback, its
    leading space stripped. Decoding needs no merges."""
    vocab = {text: i for i, text in enumerate(SPM_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPM_SPECIALS])
    return PretrainedTokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def streamed(tokenizer, ids: list[int]) -> str:
    detok = IncrementalDetokenizer(tokenizer)
    return "".join(detok.push(i) for i in ids) + detok.flush()


def id_runs(*pools: list[int]) -> st.SearchStrategy[list[int]]:
    """Ids in runs, each one id from one of the pools said 1 to 8 times."""
    run = st.tuples(st.one_of(*(st.sampled_from(pool) for pool in pools)), st.integers(1, 8))
    return st.lists(run, max_size=30).map(lambda runs: [i for i, times in runs for _ in range(times)])


@pytest.fixture(scope="module")
def heron_ids(heron_tokenizer) -> st.SearchStrategy[list[int]]:
    """Runs of Heron's special tokens, of its tokens of partial UTF-8, and of any of its tokens."""
    alone = [heron_tokenizer.decode([i]) for i in range(heron_tokenizer.vocab_size)]
    specials = [i for i, text in enumerate(alone) if text == ""]
    partial = [i for i, text in enumerate(alone) if REPLACEMENT_CHAR in text]  # bytes of no whole character
    assert len(specials) == len(SPECIAL_TOKENS) and len(partial) > 128  # the 128 bytes >= 0x80, and merges
    return id_runs(specials, partial, list(range(len(alone))))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_heron_tokenizer_streams_the_whole_decode(heron_tokenizer, heron_ids, data):
    ids = data.draw(heron_ids)
    assert streamed(heron_tokenizer, ids) == heron_tokenizer.decode(ids)


def spm_byte_ids(data: bytes) -> list[int]:
    return [len(SPM_SPECIALS) + b for b in data]


def spm_piece_id(piece: str) -> int:
    return len(SPM_SPECIALS) + 256 + SPM_PIECES.index(piece)


# A byte fallback decodes a run of <0xXX> tokens as a whole, every byte U+FFFD if any is invalid:
# a run that has shown a character and then turns invalid changes text already streamed, which
# the prefix-offset scheme cannot take back. So the runs here are invalid from their first byte
# (a continuation byte), or are whole characters or the first bytes of one, then a piece.
spm_units = st.one_of(
    st.sampled_from(SPM_PIECES).map(lambda piece: [spm_piece_id(piece)]),
    st.tuples(st.integers(0, 2), st.integers(1, 4)).map(lambda t: [t[0]] * t[1]),  # special tokens
    st.binary(min_size=1, max_size=12).map(lambda b: spm_byte_ids(bytes(0x80 | (x & 0x3F) for x in b))),
    st.tuples(st.text("aé中🎉", min_size=1, max_size=3), st.sampled_from(SPM_PIECES)).map(
        lambda t: spm_byte_ids(t[0].encode()) + [spm_piece_id(t[1])]),
    st.tuples(st.sampled_from(["é", "中", "🎉"]), st.integers(1, 3), st.sampled_from(SPM_PIECES)).map(
        lambda t: spm_byte_ids(t[0].encode()[: min(t[1], len(t[0].encode()) - 1)]) + [spm_piece_id(t[2])]),
)


@settings(max_examples=300, deadline=None)
@given(units=st.lists(spm_units, max_size=20))
def test_an_imported_sentencepiece_tokenizer_streams_the_whole_decode(spm_tokenizer, units):
    ids = [i for unit in units for i in unit]
    assert streamed(spm_tokenizer, ids) == spm_tokenizer.decode(ids)


class DecodeCounter:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids_decoded = tokenizer, 0

    def decode(self, ids) -> str:
        ids = list(ids)
        self.ids_decoded += len(ids)
        return self.tokenizer.decode(ids)


@pytest.mark.parametrize("tokenizer, token", [
    ("heron_tokenizer", "<|pad|>"),
    ("heron_tokenizer", "\u0122"),  # byte 0x80 in GPT-2's byte-to-character map: a lone continuation byte
    ("heron_tokenizer", "\u00e4"),  # byte 0xE4: a 3-byte character's first byte, again and again
    ("spm_tokenizer", "</s>"),
    ("spm_tokenizer", "<0x80>"),
])
def test_each_push_decodes_a_bounded_window_in_a_run_that_shows_no_character(request, tokenizer, token):
    tok = request.getfixturevalue(tokenizer)
    token_id = tok.backend.token_to_id(token)
    counter = DecodeCounter(tok)
    detok = IncrementalDetokenizer(counter)
    per_push = []
    for _ in range(2_000):
        before = counter.ids_decoded
        detok.push(token_id)
        per_push.append(counter.ids_decoded - before)
    # a window of a few ids, decoded a few times; decoding the whole run would be ~2 x 2,000 ids at the end
    assert max(per_push) <= 32
    assert "".join(detok.emitted) + detok.flush() == tok.decode([token_id] * 2_000)


# ----- a byte run that turns invalid after part of it was streamed -----

NEWLINE_THEN_INVALID = spm_byte_ids(b"\n\x80")  # LLaMA-2's "\n" is <0x0A>; the stray 0x80 makes the run "\ufffd\ufffd"


def test_a_byte_run_turned_invalid_resynchronises_and_streams_the_text_after_it(spm_tokenizer):
    ids = NEWLINE_THEN_INVALID + [spm_piece_id(SPACE + "hello")] * 4
    assert spm_tokenizer.decode(ids) == "\ufffd\ufffd hello hello hello hello"  # rewrites the streamed "\n"
    detok = IncrementalDetokenizer(spm_tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert pieces[0] == "\n"  # streamed before the 0x80 came, and cannot be taken back
    assert "".join(pieces) + detok.flush() == "\n hello hello hello hello"


@pytest.mark.parametrize("then", [SPACE + "hello", "<0x80>"])
def test_each_push_decodes_a_bounded_window_after_a_byte_run_turned_invalid(spm_tokenizer, then):
    token_id = spm_tokenizer.backend.token_to_id(then)
    counter = DecodeCounter(spm_tokenizer)
    detok = IncrementalDetokenizer(counter)
    per_push, pieces = [], []
    for i in NEWLINE_THEN_INVALID + [token_id] * 2_000:
        before = counter.ids_decoded
        pieces.append(detok.push(i))
        per_push.append(counter.ids_decoded - before)
    assert max(per_push) <= 32  # no stall: the window moves on past the rewritten run
    streamed_text = "".join(pieces) + detok.flush()
    whole = spm_tokenizer.decode(NEWLINE_THEN_INVALID + [token_id] * 2_000)
    assert streamed_text[1:] == whole[2:]  # all the text after the run comes out ("\n" stood for two bytes)
    assert len("".join(pieces)) > len(streamed_text) - 10  # and comes out while streaming, not at flush


def test_a_stop_string_after_a_byte_run_turned_invalid_stops_the_row(model, spm_tokenizer, monkeypatch):
    from heron.generate import FINISH_STOP, Generator, SamplingParams
    from heron.generate import engine

    a, hello = spm_piece_id(SPACE + "a"), spm_piece_id(SPACE + "hello")
    script = NEWLINE_THEN_INVALID + [a] * 3 + [hello] * 3 + [a] * 30

    def scripted_steps(decoder, n_tokens):
        for token in script[:n_tokens]:
            yield torch.tensor([token] * decoder.batch_size)

    monkeypatch.setattr(engine, "decode_steps", scripted_steps)
    gen = Generator(model, spm_tokenizer)
    params = SamplingParams(max_new_tokens=len(script), stop=["hello"], ignore_eos=True)
    [completion] = gen.complete([[5]], params)
    assert completion.finish_reason == FINISH_STOP and len(completion.ids) < len(script)
    assert completion.text == trim_at_stop(spm_tokenizer.decode(completion.ids), ["hello"]) == "\ufffd\ufffd a a a "
    assert gen.generate([[5]], params) == [completion.text]
    assert "".join(gen.stream([5], params)) == "\n a a a "  # the stream stops too; its "\n" was sent before the 0x80
