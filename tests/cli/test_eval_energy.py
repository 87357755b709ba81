"""`heron eval` prints the energy per scored token, with its source."""
from pathlib import Path

import torch

from heron.cli.commands import scored_tokens
from heron.cli.main import main
from heron.core import ModelConfig, Transformer
from heron.data import Corpus, prepare_shards
from heron.tokenizer import train_tokenizer
from heron.train.checkpoint import save_model_folder


def test_scored_tokens_counts_what_perplexity_predicts() -> None:
    # 50 tokens, windows of 16 start at 0, 16, 32, 48 and predict 16 + 16 + 16 + 1 tokens.
    assert scored_tokens(50, 16, 2, None) == 49
    assert scored_tokens(50, 16, 2, 1) == 32 and scored_tokens(50, 16, 1, 3) == 48


def test_eval_prints_energy_per_token(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"m{i}.py").write_text(f"def f{i}(a):\n    return a + {i}\n" * 10)
    tokenizer = train_tokenizer([p.read_text() for p in corpus.iterdir()], vocab_size=300, progress=False)
    shards = prepare_shards(Corpus([corpus]), tokenizer, tmp_path / "shards", val_fraction=0.5, progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2,
                                    max_seq_len=16))
    checkpoint = save_model_folder(tmp_path / "ckpt", model, tokenizer=tokenizer)
    args = ["eval", str(checkpoint), "--shards", str(shards.path), "--seq-len", "16", "--batch-size", "2",
            "--max-batches", "2"]
    capsys.readouterr()
    assert main(args) == 0
    energy, ppl = capsys.readouterr().out.strip().splitlines()[-2:]
    assert energy.startswith("energy: ") and " J/token over 64 tokens" in energy
    assert "(measured: " in energy or "(estimate: CPU time x " in energy
    assert ppl.startswith("validation perplexity: ")
    # Without --seq-len the windows default to 256 tokens, shortened to this model's 16-token context.
    assert main(args[:4] + args[6:]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == ppl
