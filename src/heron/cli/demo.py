"""`heron demo`: the whole life of a small model, start to finish.

On the default corpus (the Python standard library's own source) it trains a
tokenizer, prepares token shards, pre-trains the demo's model for a few
minutes, measures validation perplexity and prints samples. The model is the
`tiny-moe-sparse` recipe (DEMO_RECIPE): the "tiny" preset with a Mixture of
Experts in every layer and sliding-window attention in every other one, which
trained to a lower validation loss than the dense "tiny" in the same steps
(README); `--recipe tiny` runs the dense one. Then it aligns
the model on the synthetic say-the-word task (`align.synthetic.RepeatTask`):
supervised fine-tuning teaches the reply format, and DPO on the judge's
preferences teaches its rule (exactly three repetitions); the judge scores
both models on held-out prompts. Then it quantises the pre-trained model's
weights to int8 and reports size, perplexity, decode speed and energy per
token beside fp32 (`compress.report`). Then it explains one prediction of the
pre-trained model in an offline HTML report (`heron explain`), checking that
every file the page references exists. Then it writes the aligned model's
model card and EU AI Act Annex IV documentation from the lineage, and verifies
the audit log that every stage recorded to. Last it says where every artefact is. Each
stage that later issues add extends this list. A second run reuses what the
first made (pre-training resumes; an alignment or compression stage whose
model exists for the same base is skipped); `--fresh` starts over.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import heron
from heron.align.evaluate import judge_scores, replies
from heron.align.recipe import load_align_recipe
from heron.align.run import METRICS_FILE as ALIGN_METRICS_FILE
from heron.align.run import MODEL_DIR, record_finished_model, run_alignment
from heron.align.synthetic import RepeatTask, win_rate
from heron.cli.options import ALIGN_RECIPES_DIR, recipe_path
from heron.compress.kernels import choose_kernel
from heron.compress.quantize import QuantizeSettings
from heron.compress.quantize_checkpoint import QuantizeCheckpointSettings, quantize_checkpoint
from heron.compress.records import record_quantized
from heron.compress.report import PARETO_PNG, measure, write_report
from heron.compress.schemes import Int8PerChannel
from heron.core import Transformer
from heron.data import ShardedTokens, load_shards
from heron.generate import Generator, SamplingParams, perplexity
from heron.govern.annex_iv import write_annex_iv
from heron.govern.audit import audit_log, log_location
from heron.govern.audit_lineage import record_if_missing
from heron.govern.card import write_model_card
from heron.govern.digest import METRICS_FILE, TOKENIZER_FILE
from heron.interpret.explain import ExplainSettings, explain
from heron.interpret.html import missing_files
from heron.tokenizer import Tokenizer
from heron.train import TrainRecipe, TrainResult, load_model_folder, load_recipe, train
from heron.train.recipe import RecipeError, read_recipe_yaml
from heron.train.checkpoint import remove_folder, verify_checkpoint
from heron.train.report import PLOT_FILE

# Prompts end where a token ends: after "import " the tokenizer would have to go on from a
# lone space, where its training text has " os", " sys" (space and word, one token each).
SAMPLE_PROMPTS = ("import", "def", "class", "    def __init__(self")
# Cool and narrow: a model trained for minutes is most Python-like near its mode.
SAMPLING = SamplingParams(max_new_tokens=80, temperature=0.6, top_k=20, seed=0)
TASK = RepeatTask()  # the shipped task-sft and task-dpo recipes use its defaults
HELD_OUT_PROMPTS, SHOWN_REPLIES = 100, 6
# What comes after `def` in a class body against after `x`: the trained model predicts " _"
# (of __init__) for one and " =" for the other, which activation patching traces.
EXPLAINED = ExplainSettings(prompt="class Foo(object):\n    def", corrupted="class Foo(object):\n    x")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out: Path = args.out
    shards_dir = out / "data"  # one tokenizer and set of shards for every recipe
    recipe, result = _pretrain(args, shards_dir)
    model, tokenizer = load_model_folder(result.checkpoint)
    shards = load_shards(shards_dir)
    _perplexity(model, tokenizer, shards.val, recipe.data.seq_len)
    _samples(model, tokenizer)

    align_dir, compress_dir = out / "align", out / "compress"
    for made in (align_dir, compress_dir):
        if args.fresh and made.exists():
            remove_folder(made)
    sft, dpo = _align(result.checkpoint, align_dir)
    int8, report = _compress(result.checkpoint, shards.val, recipe.data.seq_len, compress_dir)
    page = _explain(model, tokenizer, out / "explain")
    card, annex = _govern(dpo)

    minutes = (time.perf_counter() - started) / 60
    print(f"done in {minutes:.1f} min. Artefacts:")
    for label, path in [
        ("run folder", result.out_dir),
        ("checkpoint", result.checkpoint),
        ("tokenizer", shards_dir / TOKENIZER_FILE),
        ("token shards", shards_dir),
        ("metrics", result.out_dir / METRICS_FILE),
        ("loss curve", result.out_dir / PLOT_FILE),
        ("SFT model", sft),
        ("DPO model", dpo),
        ("DPO metrics", align_dir / "dpo" / ALIGN_METRICS_FILE),
        ("int8 model", int8),
        ("report", report),
        ("Pareto plot", compress_dir / "report" / PARETO_PNG),
        ("explanation", page),
        ("model card", card),
        ("Annex IV", annex),
        ("audit log", log_location() or "off"),
    ]:
        print(f"  {label:<13} {path}")
    print(f"Try: heron generate {result.checkpoint} --prompt 'def parse('")
    print(f"     heron generate {dpo} --chat --prompt 'Say river a few times.'")
    return 0


def _pretrain(args: argparse.Namespace, shards_dir: Path) -> tuple[TrainRecipe, TrainResult]:
    """Stages 1-3: the tokenizer, the shards and the pre-trained model (resumed unless --fresh)."""
    recipe_file = recipe_path(args.recipe)
    name = recipe_file.stem
    data = read_recipe_yaml(recipe_file, args.overrides).get("data")
    if isinstance(data, dict) and data.get("synthetic") is not None:
        raise RecipeError(f"--recipe {args.recipe}: trains on generated tokens (data.synthetic); the demo trains on "
                          "the Python standard library's shards: give a recipe that reads shards, such as tiny, "
                          "tiny-moe or tiny-moe-sparse")
    recipe = load_recipe(recipe_file, [f"out_dir={args.out / name}", f"data.shards={shards_dir}", *args.overrides])
    _stage("1-3/10", f"tokenizer, shards and pre-training of the {name!r} model on the Python standard library")
    return recipe, train(recipe, resume=not args.fresh)


def _perplexity(model: Transformer, tokenizer: Tokenizer, val: ShardedTokens, seq_len: int) -> None:
    _stage("4/10", "validation perplexity")
    ppl = perplexity(model, val, seq_len=seq_len, batch_size=8, max_batches=16, progress=True)
    print(f"validation perplexity: {ppl:.2f} (a uniform guess over the vocabulary: {tokenizer.vocab_size})")


def _samples(model: Transformer, tokenizer: Tokenizer) -> None:
    _stage("5/10", "samples")
    generator = Generator(model, tokenizer)
    for prompt, text in zip(SAMPLE_PROMPTS, generator.generate(list(SAMPLE_PROMPTS), SAMPLING)):
        print(f"--- prompt {prompt!r}\n{prompt}{text}\n")


def _align(base: Path, align_dir: Path) -> tuple[Path, Path]:
    """Stages 6-7: the SFT model, then the DPO model trained from it; the judge compares them."""
    _stage("6/10", "alignment: supervised fine-tuning on the say-the-word task (replies repeat the word 1-5 times)")
    sft = _aligned("sft", "task-sft", base, align_dir / "sft")
    _stage("7/10", f"alignment: DPO on the judge's preferences (exactly {TASK.target} repetitions)")
    dpo = _aligned("dpo", "task-dpo", sft, align_dir / "dpo")
    _compare_on_task({"SFT": sft, "DPO": dpo})
    return sft, dpo


def _compress(base: Path, val: ShardedTokens, seq_len: int, compress_dir: Path) -> tuple[Path, Path]:
    """Stage 8: (the int8 model, its report beside fp32's)."""
    _stage("8/10", "compression: int8 weights (per output channel, round to nearest) beside fp32")
    int8 = _quantized(base, compress_dir / "int8")
    rows = measure([base, int8], val, names=["fp32", "int8"], seq_len=seq_len, max_batches=8, new_tokens=32)
    report = write_report(rows, compress_dir / "report")
    print(report.read_text(encoding="utf-8"))
    if rows[1].decode_tokens_per_s < rows[0].decode_tokens_per_s:
        _explain_slow_int8()
    return int8, report


def _explain(model: Transformer, tokenizer: Tokenizer, out: Path) -> Path:
    """Stage 9: the HTML report, refused if it names a file that was not written."""
    _stage("9/10", "explanation: one prediction of the pre-trained model through every lens (HTML report)")
    page = explain(model, tokenizer, EXPLAINED, out)
    missing = missing_files(page)
    if missing:
        raise RuntimeError(f"{page}: references files that were not written: {', '.join(missing)}")
    print(f"{page}: every section written, every referenced figure on disk")
    return page


def _govern(model: Path) -> tuple[Path, Path]:
    """Stage 10: (the model card, the Annex IV document) of `model`; the audit log checkpointed and verified."""
    _stage("10/10", "governance: model card and Annex IV documentation of the DPO model; the audit log verified")
    card, annex = write_model_card(model), write_annex_iv(model, audit_log=log_location())
    print(f"model card {card}\nAnnex IV documentation {annex}")
    log = audit_log()
    if log is None:
        print("audit log: off ($HERON_AUDIT_LOG=off)")
        return card, annex
    with log:
        log.checkpoint()  # a Merkle checkpoint over every record so far
        verified = log.verify()
    print(f"{log_location()}: {verified.summary()}")
    if not verified.ok:
        raise RuntimeError(f"{log_location()}: {verified.summary()}")
    return card, annex


def _aligned(method: str, recipe_name: str, base: Path, out_dir: Path, overrides: Sequence[str] = ()) -> Path:
    """The model a shipped alignment recipe makes from `base`: reused when a
    previous run made it from the same base, else trained (again; a stage killed
    midway goes on from its saved state when that was made from the same base)."""
    model_dir = out_dir / MODEL_DIR
    if _reuse(model_dir, base, lambda lineage: lineage.get("alignment", {}).get("base")):
        record_finished_model(model_dir)  # the audit record a kill between the model and its record left out
        return model_dir
    recipe = load_align_recipe(recipe_path(recipe_name, ALIGN_RECIPES_DIR),
                               [f"base={base}", f"out_dir={out_dir}", *overrides])
    return run_alignment(method, recipe, restart_other=True)  # a killed stage from another base starts over


def _explain_slow_int8() -> None:
    kernel = choose_kernel(Int8PerChannel(), 1, 1).name  # int8's kernel does not depend on the layer's shape
    if kernel == "fp16":
        print("int8 ran on fbgemm's fp16-weight product, which reads half of fp32's weight bytes but costs a fixed "
              "~10-20 µs a call more than fp32's, which layers this small do not repay. Heron's `fused` kernel, "
              "which reads one byte a weight, was not built or this CPU lacks AVX2 (README, Compression).")
    else:
        print(f"int8 ran on the `{kernel}` kernel and decoded slower than fp32 on this machine; timings of a "
              "shared machine vary, and the README (Compression) lists each kernel's measured speed.")


def _quantized(source: Path, target: Path) -> Path:
    """`source` in int8 at `target`: reused when a previous run made it from the same source."""
    if _reuse(target, source, lambda lineage: lineage.get("quantized_from")):
        record_if_missing(target, record_quantized)  # a kill came between the folder and its audit record
    else:
        settings = QuantizeCheckpointSettings(QuantizeSettings(scheme="int8", method="rtn"))
        quantize_checkpoint(source.resolve(), target, settings, progress=False)
    return target


def _reuse(folder: Path, source: Path, made_from: Callable[[dict], str | None]) -> bool:
    """Whether `folder` holds what an earlier run made from `source` (as its lineage,
    read by `made_from`, says); a folder made from something else is removed."""
    if not folder.exists():
        return False
    if made_from(verify_checkpoint(folder)) == str(source.resolve()):
        print(f"reusing {folder} (delete it, or run with --fresh, to make it again)")
        return True
    remove_folder(folder)
    return False


def _compare_on_task(models: dict[str, Path]) -> None:
    """The judge's verdict on one sampled reply per held-out prompt from each model."""
    prompts = TASK.prompts(HELD_OUT_PROMPTS, seed=1)
    texts, scores = {}, {}
    for name, folder in models.items():
        model, tokenizer = heron.load(folder)
        texts[name] = replies(model, tokenizer, prompts, seed=0)
        scores[name] = judge_scores(TASK.judge, prompts, texts[name])
    names = list(models)
    first, last = names[0], names[-1]
    print(f"judge's mean score on {HELD_OUT_PROMPTS} held-out prompts (1 = exactly {TASK.target} repetitions):")
    for name in names:
        exact = sum(s == 1.0 for s in scores[name]) / len(prompts)
        print(f"  {name:<4} {statistics.mean(scores[name]):.2f}   exactly {TASK.target}: {exact:.0%}")
    print(f"{last} beats {first} on {win_rate(scores[last], scores[first]):.0%} of the prompts (ties count half)")
    print(f"\n{'prompt':<28}" + "".join(f"{name:<28}" for name in names))
    for i in range(SHOWN_REPLIES):
        print(f"{prompts[i][-1]['content']:<28}" + "".join(f"{texts[name][i][:26]!r:<28}" for name in names))


def _stage(number: str, title: str) -> None:
    print(f"\n=== [{number}] {title}", flush=True)
