"""`heron demo`: the whole life of a small model, start to finish.

On the default corpus (the Python standard library's own source) it trains a
tokenizer, prepares token shards, pre-trains the "tiny" preset for a few
minutes, measures validation perplexity, prints samples and says where every
artefact is. Each stage that later issues add extends this list.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from heron.cli.commands import recipe_path
from heron.data import load_shards
from heron.generate import Generator, SamplingParams, perplexity
from heron.train import load_model_folder, load_recipe, train
from heron.train.report import METRICS_FILE, PLOT_FILE
from heron.train.sources import TOKENIZER_FILE

SAMPLE_PROMPTS = ("import ", "def ", "class ", "    def __init__(self")
# Cool and narrow: a model trained for minutes is most Python-like near its mode.
SAMPLING = SamplingParams(max_new_tokens=80, temperature=0.6, top_k=20, seed=0)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out: Path = args.out
    shards_dir = out / "data"
    recipe = load_recipe(recipe_path("tiny"), [f"out_dir={out}", f"data.shards={shards_dir}", *args.overrides])
    _stage("1-3/5", "tokenizer, shards and pre-training of the 'tiny' model on the Python standard library")
    result = train(recipe, resume=not args.fresh)
    model, tokenizer = load_model_folder(result.checkpoint)

    _stage("4/5", "validation perplexity")
    shards = load_shards(shards_dir)
    ppl = perplexity(model, shards.val, seq_len=recipe.data.seq_len, batch_size=8, max_batches=16, progress=True)
    print(f"validation perplexity: {ppl:.2f} (a uniform guess over the vocabulary: {tokenizer.vocab_size})")

    _stage("5/5", "samples")
    generator = Generator(model, tokenizer)
    for prompt, text in zip(SAMPLE_PROMPTS, generator.generate(list(SAMPLE_PROMPTS), SAMPLING)):
        print(f"--- prompt {prompt!r}\n{prompt}{text}\n")

    minutes = (time.perf_counter() - started) / 60
    print(f"done in {minutes:.1f} min. Artefacts:")
    for label, path in [
        ("run folder", result.out_dir),
        ("checkpoint", result.checkpoint),
        ("tokenizer", shards_dir / TOKENIZER_FILE),
        ("token shards", shards_dir),
        ("metrics", result.out_dir / METRICS_FILE),
        ("loss curve", result.out_dir / PLOT_FILE),
    ]:
        print(f"  {label:<13} {path}")
    print(f"Try: heron generate {result.checkpoint} --prompt 'def parse('")
    return 0


def _stage(number: str, title: str) -> None:
    print(f"\n=== [{number}] {title}", flush=True)
