from heron.generate.text import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopStringFilter,
    first_stop,
    held_back_length,
    trim_at_stop,
)


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
