"""The alignment tests' shared base model."""
import pytest
import torch

from heron.align.synthetic import RepeatTask
from heron.core import ModelConfig, Transformer
from heron.tokenizer import train_tokenizer
from heron.train.checkpoint import save_model_folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny untrained checkpoint with a tokenizer that knows the task's words."""
    task = RepeatTask()
    tokenizer = train_tokenizer([m["content"] for c in task.sft_chats(200, seed=0) for m in c] * 2,
                                vocab_size=300, progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                    max_seq_len=64))
    return save_model_folder(tmp_path_factory.mktemp("base") / "ckpt", model, tokenizer=tokenizer)
