"""A LLaMA-style Hugging Face folder built in code: random weights, and a
SentencePiece-free BPE tokenizer with <s>/</s>, a post-processor that adds
<s>, and a Zephyr-style chat template in tokenizer_config.json."""
import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TEXTS = [f"def f_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)] + ["Hello, world! " * 20]


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    return tok


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Path:
    """A saved LlamaForCausalLM with its tokenizer files."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf-llama")
    tokenizer = build_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False}, "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE,
    }))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.2,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def pytest_sessionfinish(session, exitstatus) -> None:
    """llama-cpp-python opens os.devnull twice when imported (to silence llama.cpp's
    logging) and never closes it, which Python reports as a ResourceWarning at exit."""
    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        handle = getattr(utils, name, None)
        if handle is not None:
            handle.close()
