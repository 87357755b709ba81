"""`heron eval` prints the energy per scored token, with its source."""
from pathlib import Path

from heron.cli.commands import scored_tokens
from heron.cli.main import main
from heron.train.checkpoint import save_model_folder


def test_scored_tokens_counts_what_perplexity_predicts() -> None:
    # 50 tokens, windows of 16 start at 0, 16, 32, 48 and predict 16 + 16 + 16 + 1 tokens.
    assert scored_tokens(50, 16, 2, None) == 49
    assert scored_tokens(50, 16, 2, 1) == 32 and scored_tokens(50, 16, 1, 3) == 48


def test_eval_prints_energy_per_token(tmp_path: Path, capsys, code_model) -> None:
    model, tokenizer, shards = code_model(max_seq_len=16)
    checkpoint = save_model_folder(tmp_path / "ckpt", model, tokenizer=tokenizer)
    args = ["eval", str(checkpoint), "--shards", str(shards), "--seq-len", "16", "--batch-size", "2",
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
