"""Bases that differ from a freshly trained Heron checkpoint: a tokenizer whose pad token or
other tokens lie past the model's vocabulary, and a pruned (sparse) checkpoint."""
import copy
import dataclasses

import pytest
import torch
import yaml

import heron
from heron.align.data import encode_chats, encode_pairs
from heron.align.grpo import GRPOSettings, grpo
from heron.align.heads import with_scalar_head
from heron.align.objectives import preference_objective, reference_logprobs, reward_objective, sft_objective
from heron.align.ppo import PPOSettings, ppo
from heron.align.recipe import load_align_recipe
from heron.align.run import run_alignment
from heron.align.synthetic import RepeatTask
from heron.compress.prune_model import sparsity_of
from heron.compress.sparse_store import save_sparse
from heron.core import Transformer
from heron.train.checkpoint import save_model_folder

TASK = RepeatTask()
MAX_LEN = 64


class PadPastVocabulary:
    """A tokenizer that gained a pad token after its model was made (as Hugging Face
    tokenizers gain <|pad|> without the embedding being resized): its pad id is the
    model's vocab_size, one past the last id the embedding holds."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    @property
    def pad_id(self) -> int:
        return self._tokenizer.vocab_size

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size + 1


def test_a_pad_id_past_the_model_s_vocabulary_pads_nothing_the_model_reads(base):
    """Rows and rollouts are padded with an id the model holds; every method runs (each was
    an IndexError in the embedding), and the losses are those of the tokenizer's own padding."""
    model, plain = heron.load(base)
    tokenizer = PadPastVocabulary(plain)
    assert tokenizer.pad_id == model.config.vocab_size
    chats = encode_chats(tokenizer, TASK.sft_chats(8, seed=1), MAX_LEN)
    assert not chats.tokens().all() and int(chats.ids.max()) < model.config.vocab_size
    rows = torch.arange(8)
    model.train()
    torch.testing.assert_close(sft_objective(model, chats)(rows)[0],
                               sft_objective(model, encode_chats(plain, TASK.sft_chats(8, seed=1), MAX_LEN))(rows)[0],
                               rtol=0, atol=0)
    chosen, rejected = encode_pairs(tokenizer, TASK.preference_pairs(8, seed=2), MAX_LEN)
    reward_objective(with_scalar_head(model, seed=0).train(), chosen, rejected)(rows)
    reference = (reference_logprobs(model, chosen), reference_logprobs(model, rejected))
    preference_objective(model.train(), chosen, rejected, "dpo", reference=reference)(rows)
    frozen = copy.deepcopy(model).eval()
    ppo(model, with_scalar_head(model, seed=0), frozen, tokenizer, TASK.prompts(8, 0), TASK.judge,
        PPOSettings(steps=1, prompts_per_step=4, minibatch=4, epochs=1, max_new_tokens=6, progress=False))
    grpo(model, frozen, tokenizer, TASK.prompts(8, 0), TASK.judge,
         GRPOSettings(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=6, progress=False))


def test_a_pruned_base_is_aligned_with_a_warning_that_the_result_is_dense(base, tmp_path):
    model, tokenizer = heron.load(base)
    with torch.no_grad():
        for block in model.blocks:
            for weight in (block.attn.qkv.weight, block.attn.out.weight, block.mlp.up.weight, block.mlp.down.weight):
                weight[:, ::2] = 0  # half of every block linear's inputs
    pruned = save_sparse(tmp_path / "pruned", model, tokenizer=tokenizer)
    raw = {"name": "sft", "out_dir": str(tmp_path / "sft"), "base": str(pruned), "save_every": 0,
           "data": {"task": {"n": 16}, "max_len": MAX_LEN}, "fit": {"steps": 1, "batch_size": 4}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(raw))
    with pytest.warns(UserWarning, match=r"pruned \(50% of its block weights are zero\).*the aligned model is dense"):
        folder = run_alignment("sft", load_align_recipe(tmp_path / "sft.yaml"))
    aligned, _ = heron.load(folder)
    assert sparsity_of(model) == 0.5 and sparsity_of(aligned) < 0.25  # as the warning says, the zeros fill in


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_a_tokenizer_holding_ids_past_the_model_s_vocabulary_is_named_before_training(base, tmp_path, method):
    """A base whose embedding stops short of its tokenizer (a Hugging Face tokenizer that gained
    tokens its model never grew for): the row or prompt holding such a token is named with it,
    before any step; it was an IndexError deep in the embedding lookup."""
    model, tokenizer = heron.load(base)
    chats = TASK.sft_chats(16, seed=0)
    past = max(max(tokenizer.chat_turn_ids(c[:-1], c[-1]["content"])[0]) for c in chats)  # a prompt's token
    torch.manual_seed(0)
    short = Transformer(dataclasses.replace(model.config, vocab_size=past))
    folder = save_model_folder(tmp_path / "short", short, tokenizer=tokenizer)
    raw = {"name": method, "out_dir": str(tmp_path / method), "base": str(folder), "save_every": 0,
           "data": {"task": {"n": 16}, "max_len": MAX_LEN}, "fit": {"steps": 1, "batch_size": 4},
           "grpo": {"steps": 1, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    where = {"sft": r"chat \d+", "dpo": r"pair \d+ with its (chosen|rejected) reply", "grpo": r"data: prompt \d+"}
    with pytest.raises(ValueError, match=rf"{where[method]}: token '.*' \(id \d+\) lies past the model's "
                                         rf"vocabulary of {past}"):
        run_alignment(method, load_align_recipe(tmp_path / "recipe.yaml"))
    assert not (tmp_path / method / "metrics.jsonl").exists() or not (tmp_path / method / "metrics.jsonl").read_text()
