"""SFT rows of imported chat templates: every assistant turn's tokens found in the whole rendered chat.

Known answer: the row is what transformers' apply_chat_template tokenises, and the mask covers each
assistant turn's content and end token, including under a template that renders the last turn
otherwise (Qwen3 gives only the last an empty <think> block).
"""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from heron.align.data import encode_chats
from heron.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

QWEN3_LIKE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
              "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
              "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_every_assistant_turn_is_found_where_the_whole_chat_puts_it(tmp_path):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["Hello there, how are you? Fine, thanks. <think>"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": QWEN3_LIKE}))
    tokenizer = load_tokenizer(tmp_path)
    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Fine"},
            {"role": "user", "content": "And you?"}, {"role": "assistant", "content": "Fine, thanks."}]
    rows = encode_chats(tokenizer, [chat], max_len=128)
    ids = rows.ids[0, : int(rows.last[0]) + 1].tolist()
    whole = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(chat, tokenize=True)
    whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    assert ids == whole[: len(ids)] and whole[len(ids):] == tokenizer.encode("\n", add_special_tokens=False)
    masked = tokenizer.decode([i for i, m in zip(ids, rows.mask[0].tolist()) if m], skip_special=False)
    assert masked == "Fine<|im_end|><think>\n\n</think>\n\nFine, thanks.<|im_end|>"
