import json

import pytest
import torch

from heron.data import ChatBatches, chat_examples_to_tensors, load_chat_jsonl
from heron.data.chat import read_chat_jsonl
from heron.tokenizer import HeronTokenizer, train_tokenizer

CHATS = [
    [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "5"}],
    [
        {"role": "system", "content": "terse"},
        {"role": "user", "content": "name a bird"},
        {"role": "assistant", "content": "heron"},
        {"role": "user", "content": "another"},
        {"role": "assistant", "content": "egret"},
    ],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
]


@pytest.fixture(scope="module")
def tok() -> HeronTokenizer:
    texts = [json.dumps(c) for c in CHATS] * 20
    return train_tokenizer(texts, vocab_size=300, progress=False)


def write_jsonl(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_load_chat_jsonl(tmp_path) -> None:
    file = tmp_path / "chats.jsonl"
    write_jsonl(file, [json.dumps({"messages": c, "id": i}) for i, c in enumerate(CHATS)] + [""])
    assert load_chat_jsonl(file) == CHATS


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"messages": [', r"chats\.jsonl:3: invalid JSON"),
        ('{"turns": []}', r"chats\.jsonl:3: expected an object with a 'messages' list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', r"chats\.jsonl:3: messages\[0\]\['role'\] is 'bot'"),
    ],
)
def test_bad_line_is_named(tmp_path, bad_line: str, message: str) -> None:
    file = tmp_path / "chats.jsonl"
    write_jsonl(file, [json.dumps({"messages": CHATS[0]}), "", bad_line])  # line 2 blank, line 3 bad
    with pytest.raises(ValueError, match=message):
        load_chat_jsonl(file)


def test_labels_are_next_assistant_tokens_only(tok) -> None:
    x, y = chat_examples_to_tensors(CHATS, tok, seq_len=64)
    assert x.shape == y.shape == (3, 64) and x.dtype == y.dtype == torch.long
    for row, chat in enumerate(CHATS):
        ids, mask = tok.encode_chat(chat)
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1]
        assert (x[row, n:] == tok.pad_id).all() and (y[row, n:] == -100).all()
        assert y[row, :n].tolist() == [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
    # Row 0: the supervised targets are exactly "5" then <|end|>.
    assert [t for t in y[0].tolist() if t != -100] == tok.encode("5") + [tok.end_id]


def test_truncation_keeps_the_head_and_drops_chats_without_targets(tok) -> None:
    ids, _ = tok.encode_chat(CHATS[1][:3])
    heron = len(tok.encode("heron"))
    cut = len(ids) - heron - 2  # seq_len + 1 tokens then end at the first token of "heron"
    x, y = chat_examples_to_tensors([CHATS[1][:3]], tok, seq_len=cut)
    assert y.tolist() == [[-100] * (cut - 1) + [ids[cut]]]
    long = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]
    fits = len(tok.encode_chat(short)[0]) - 1
    with pytest.warns(UserWarning, match=r"dropped 1 chat\(s\).*first indices \[0\]"):
        x, y = chat_examples_to_tensors([long, short], tok, seq_len=fits)
    assert x.shape == (1, fits) and [t for t in y[0].tolist() if t != -100] == tok.encode("ok") + [tok.end_id]
    with pytest.raises(ValueError, match=f"no chat example .*within seq_len={fits}.*raise seq_len"), \
            pytest.warns(UserWarning):
        chat_examples_to_tensors([long], tok, seq_len=fits)


def test_chat_batches_cover_each_epoch_and_split_across_ranks(tok) -> None:
    examples = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": str(i)}] for i in range(6)]
    batches = ChatBatches(examples, tok, seq_len=32, batch_size=4, seed=0)
    stream = [int(i) for s in range(3) for i in batches.indices(s)]  # 12 rows = two epochs of 6
    assert sorted(stream[:6]) == sorted(stream[6:]) == list(range(6))
    assert stream[:6] != stream[6:]  # each epoch has its own order
    again = ChatBatches(examples, tok, seq_len=32, batch_size=4, seed=0)
    x, y = again.batch(2)
    assert torch.equal(x, batches.batch(2)[0]) and torch.equal(y, batches.y[torch.from_numpy(batches.indices(2))])
    halves = [batches.batch(2, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), x)
    assert torch.equal(torch.cat([h[1] for h in halves]), y)


def test_a_truncated_line_names_the_column_where_it_stops(tmp_path) -> None:
    file = tmp_path / "chats.jsonl"
    write_jsonl(file, ['{"messages": ['])  # 14 characters: JSON expects a value at column 15
    with pytest.raises(ValueError, match=r"chats\.jsonl:1: invalid JSON: Expecting value \(column 15\)"):
        load_chat_jsonl(file)


def test_a_line_that_is_not_utf8_is_named(tmp_path) -> None:
    file = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": CHATS[0]}).encode()
    file.write_bytes(good + b"\n" + '{"messages": "café"}'.encode("latin-1") + b"\n")  # é is byte 18 of line 2
    with pytest.raises(ValueError, match=r"chats\.jsonl:2: not UTF-8 \(invalid continuation byte at byte 18 of the line\)"):
        load_chat_jsonl(file)


def test_read_chat_jsonl_gives_each_chat_its_line(tmp_path) -> None:
    file = tmp_path / "chats.jsonl"
    write_jsonl(file, ["", json.dumps({"messages": CHATS[0]}), "", json.dumps({"messages": CHATS[1]})])
    assert read_chat_jsonl(file) == [(2, CHATS[0]), (4, CHATS[1])]
