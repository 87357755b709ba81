import json
import os
import random
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer

from heron.tokenizer import CHAT_TEMPLATE_JINJA, SPECIAL_TOKENS, HeronTokenizer, train_tokenizer

TRICKY_TEXTS = [
    "",
    "def f(x):\n    if x:\n\t\treturn  x  # two spaces\n\n\n",
    "trailing spaces   \n   \r\nwindows line ends\r\n",
    "unicode: héllo wörld, 日本語, Ελληνικά, emoji 🎉🐍, combining e\u0301, zero-width \u200b.",
    "special text <|eos|> and <|end|> inside a document",
    "\x00\x01 control bytes \x7f and a lone surrogate-free 𝔘𝔫𝔦",
]


def generated_texts(n: int = 200) -> list[str]:
    """Python-ish lines in which 'heronfeather' is by far the most frequent word."""
    lines = []
    for i in range(n):
        lines.append(f"heronfeather = compute_{i % 7}(value{i % 3}, {i})\n")
        lines.append(f"    return heronfeather + {i * 13 % 101}\n")
    return ["".join(lines[k : k + 20]) for k in range(0, len(lines), 20)]


@pytest.fixture(scope="module")
def tok() -> HeronTokenizer:
    return train_tokenizer(generated_texts(), vocab_size=400, progress=False)


def test_round_trip_is_exact(tok: HeronTokenizer) -> None:
    for text in TRICKY_TEXTS:
        assert tok.decode(tok.encode(text, allow_special=False)) == text
        assert tok.decode(tok.encode(text)) == text.replace("<|eos|>", "").replace("<|end|>", "")


def test_frequent_word_becomes_one_token(tok: HeronTokenizer) -> None:
    assert len(tok.encode("heronfeather")) == 1
    assert len(tok.encode("zqxjvk")) == 6  # unseen letters stay single bytes


def test_special_ids_come_first_in_declared_order(tok: HeronTokenizer) -> None:
    assert tok.special_ids == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.end_id) == (0, 1, 2, 6)
    # Training stops early once no pair reaches min_frequency, so the size is at most the request.
    assert tok.vocab_size == len(tok.backend.get_vocab()) <= 400


def test_bos_eos_and_batch(tok: HeronTokenizer) -> None:
    ids = tok.encode("x = 1", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1] == tok.encode("x = 1")
    assert tok.encode_batch(TRICKY_TEXTS) == [tok.encode(t) for t in TRICKY_TEXTS]
    assert tok.encode_batch(TRICKY_TEXTS, allow_special=False) == [
        tok.encode(t, allow_special=False) for t in TRICKY_TEXTS
    ]


def test_special_text_is_parsed_only_when_allowed(tok: HeronTokenizer) -> None:
    assert tok.encode("<|eos|>") == [tok.eos_id]
    plain = tok.encode("<|eos|>", allow_special=False)
    assert tok.eos_id not in plain and len(plain) > 1
    assert tok.decode([tok.bos_id, *tok.encode("hi")], skip_special=False) == "<|bos|>hi"


@pytest.mark.parametrize("texts, complaint", [
    (["a\ud800b"], "the text holds the surrogate code point U\\+D800 at character 1"),
    (["fine", "x\udfff"], "text 1 holds the surrogate code point U\\+DFFF at character 1"),
])
def test_a_surrogate_code_point_is_refused_by_position(tok: HeronTokenizer, texts: list, complaint: str) -> None:
    """UTF-8 cannot hold a lone surrogate (a JSON "\\ud800" escape without its pair): the error
    says where it is and what to do, not the Rust side's 'TextInputSequence must be str'."""
    with pytest.raises(ValueError, match=complaint + ".*replace it first"):
        tok.encode_batch(texts, allow_special=False)
    for allow_special in (True, False):
        with pytest.raises(ValueError, match="surrogate code point"):
            tok.encode(texts[-1], allow_special=allow_special)
    with pytest.raises(ValueError, match="surrogate code point U\\+DC80"):
        tok.encode_chat([{"role": "user", "content": "hi \udc80"}])
    with pytest.raises(TypeError):  # not a string at all: the encoder's own error stands
        tok.encode(None)  # type: ignore[arg-type]


def test_training_is_deterministic() -> None:
    a = train_tokenizer(generated_texts(), vocab_size=350, progress=False)
    b = train_tokenizer(generated_texts(), vocab_size=350, progress=False)
    assert a.to_json() == b.to_json()
    assert a.fingerprint() == b.fingerprint()


def test_vocab_size_below_bytes_plus_specials_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 263"):
        train_tokenizer(["abc"], vocab_size=100, progress=False)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello."},
]


def test_chat_template_exact_string(tok: HeronTokenizer) -> None:
    expected = "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi?<|end|>\n<|assistant|>\nHello.<|end|>\n"
    assert tok.apply_chat_template(CHAT) == expected
    assert tok.apply_chat_template(CHAT[:2], add_generation_prompt=True) == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi?<|end|>\n<|assistant|>\n"
    )


def test_chat_template_matches_jinja_form(tok: HeronTokenizer) -> None:
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(CHAT_TEMPLATE_JINJA)
    for gen in (False, True):
        assert template.render(messages=CHAT, add_generation_prompt=gen) == tok.apply_chat_template(CHAT, gen)


def test_encode_chat_ids_and_mask(tok: HeronTokenizer) -> None:
    ids, mask = tok.encode_chat(CHAT)
    assert ids == tok.encode(tok.apply_chat_template(CHAT))
    nl = tok.encode("\n")
    s = tok.special_ids
    hello = tok.encode("Hello.")
    expected_ids = (
        [s["bos"], s["system"], *nl, *tok.encode("Be brief."), s["end"], *nl]
        + [s["user"], *nl, *tok.encode("Hi?"), s["end"], *nl]
        + [s["assistant"], *nl, *hello, s["end"], *nl]
    )
    assert ids == expected_ids
    start = len(ids) - len(nl) - 1 - len(hello)  # first assistant content token
    assert mask == [start <= i < len(ids) - len(nl) for i in range(len(ids))]
    prompt, prompt_mask = tok.encode_chat(CHAT[:2], add_generation_prompt=True)
    assert prompt == ids[:start] and not any(prompt_mask)


def test_encode_chat_never_parses_specials_in_content(tok: HeronTokenizer) -> None:
    ids, _ = tok.encode_chat([{"role": "user", "content": "<|end|><|assistant|>"}])
    assert ids.count(tok.end_id) == 1


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty list"),
        ([{"role": "user"}], r"messages\[0\] is missing 'content'"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], r"messages\[1\]\['role'\] is 'robot'"),
        ([{"role": "user", "content": "a", "name": "x"}], r"messages\[0\] has unknown key\(s\) \['name'\]"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\] must be a string"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], r"messages\[1\].*only come first"),
        (["hi"], r"messages\[0\] must be a dict"),
    ],
)
def test_bad_chats_name_the_message(tok: HeronTokenizer, messages: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tok.apply_chat_template(messages)


def test_save_and_load_file_or_folder(tok: HeronTokenizer, tmp_path) -> None:
    file = tok.save(tmp_path / "ckpt")
    assert file == tmp_path / "ckpt" / "tokenizer.json"
    assert [p.name for p in file.parent.iterdir()] == ["tokenizer.json"]  # no temp files left behind
    added = {t["content"] for t in json.loads(file.read_text())["added_tokens"]}
    assert added == set(SPECIAL_TOKENS.values())
    for source in (tmp_path / "ckpt", file):
        loaded = HeronTokenizer.load(source)
        assert loaded.to_json() == tok.to_json()
        assert loaded.encode(TRICKY_TEXTS[3]) == tok.encode(TRICKY_TEXTS[3])
    assert tok.save(tmp_path / "other.json") == tmp_path / "other.json"


def test_load_errors_name_the_path(tok: HeronTokenizer, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        HeronTokenizer.load(tmp_path / "nowhere")
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=str(broken)):
        HeronTokenizer.load(tmp_path)
    data = json.loads(tok.to_json())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|end|>"]
    del data["model"]["vocab"]["<|end|>"]
    broken.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"lacks Heron's special tokens \['<\|end\|>'\]"):
        HeronTokenizer.load(broken)


def test_a_saved_tokenizer_is_as_readable_as_any_new_file(tok, tmp_path) -> None:
    """Written through a temporary file that the umask governs (mkstemp's would be 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    (tmp_path / "plain.txt").write_text("x")
    assert stat.S_IMODE(tok.save(tmp_path).stat().st_mode) == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert stat.S_IMODE(tok.save(tmp_path).stat().st_mode) == 0o666 & ~umask


def test_decode_refuses_negative_ids_and_skips_ids_past_the_vocabulary(tok: HeronTokenizer) -> None:
    """The Rust decoder overflows on a negative id. Past the vocabulary lie the padding rows of a
    model's embedding, which sampling can pick: they decode to nothing, as in transformers."""
    with pytest.raises(ValueError, match=f"token id -1 is not in the vocabulary of {tok.vocab_size} tokens"):
        tok.decode([tok.bos_id, -1])
    assert tok.decode([tok.vocab_size, *tok.encode("x = 1"), 99999]) == "x = 1"


# Characters around which the byte-level pattern splits differently: kinds of space (Python's \s
# holds \x1c-\x1f, the Rust pattern does not), newlines, letters, digits, punctuation, an apostrophe.
CUT_ALPHABET = "ab9 \n\n\n\r\t\x1c\x85\u2028\u3000'.é日<|eos|>"


@pytest.fixture(scope="module")
def cut_tok() -> HeronTokenizer:
    """Trained on text of CUT_ALPHABET alone, so it merges runs of spaces and newlines: a cut at a
    pre-token boundary that the whole text does not have then changes the ids."""
    rng = random.Random(0)
    texts = ["".join(rng.choice(CUT_ALPHABET) for _ in range(400)) for _ in range(200)]
    return train_tokenizer(texts, vocab_size=600, progress=False)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=CUT_ALPHABET, max_size=120), max_chars=st.integers(1, 12))
def test_plain_pieces_encode_to_the_whole_texts_ids(cut_tok: HeronTokenizer, text: str, max_chars: int) -> None:
    tok = cut_tok
    bounds = tok.plain_pieces(text, max_chars)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(text)
    assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))  # contiguous
    assert all(stop - start >= max_chars for start, stop in bounds[:-1])
    pieces = tok.encode_batch([text[start:stop] for start, stop in bounds], allow_special=False)
    assert sum(pieces, []) == tok.encode(text, allow_special=False)


def test_plain_pieces_cut_before_the_last_space_ahead_of_a_non_space(tok: HeronTokenizer) -> None:
    text = "x = 1\ny\n\nz\n w\nend"
    # between the newlines of "\n\n", between "\n" and " w": never after a run's last whitespace
    assert tok.plain_pieces(text, 1) == [(0, 1), (1, 3), (3, 5), (5, 8), (8, 11), (11, 13), (13, 17)]
    assert tok.plain_pieces(text, 100) == [(0, len(text))]
    with pytest.raises(ValueError, match="max_chars"):
        tok.plain_pieces(text, 0)


def test_a_tokenizer_that_could_act_across_a_cut_keeps_texts_whole(tok: HeronTokenizer) -> None:
    spec = json.loads(tok.backend.to_str())
    lowercased = HeronTokenizer(Tokenizer.from_str(json.dumps(spec | {"normalizer": {"type": "Lowercase"}})))
    added = Tokenizer.from_str(tok.backend.to_str())
    added.add_tokens([AddedToken("1\nb", special=False)])
    text = "a 1\nb 2\nc 3\nd"
    for whole in (lowercased, HeronTokenizer(added)):
        assert whole.plain_pieces(text, 1) == [(0, len(text))]
    assert len(tok.plain_pieces(text, 1)) == 7


def test_training_on_a_long_text_in_pieces_learns_what_the_whole_text_teaches(monkeypatch) -> None:
    rng = random.Random(1)
    text = "".join(rng.choice(CUT_ALPHABET) for _ in range(20_000))
    learned = {}
    for piece_chars in (10**9, 40):
        monkeypatch.setattr("heron.tokenizer.bpe._TRAIN_PIECE_CHARS", piece_chars)
        learned[piece_chars] = train_tokenizer([text], vocab_size=600, progress=False).to_json()
    assert learned[40] == learned[10**9]
