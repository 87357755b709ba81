"""The CLI's verbs, one function each: arguments in, library calls, exit code out."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import heron
from heron.core import Transformer
from heron.data.shards import META_FILE
from heron.data import Corpus, check_shards_fit, check_val_scorable, default_corpus, load_shards, prepare_shards
from heron.generate import Generator, SamplingParams, perplexity
from heron.generate.perplexity import evaluated_windows
from heron.govern import EnergyMeter
from heron.tokenizer import SPECIAL_TOKENS, HeronTokenizer, Tokenizer, load_tokenizer, train_tokenizer
from heron.tokenizer.bpe import TOKENIZER_FILE, replaceable_tokenizer_file
from heron.interop.convert import export_hf, import_hf
from heron.cli.options import ALIGN_RECIPES_DIR, RECIPES_DIR, as_flag, as_override, flag_of, in_flags, recipe_path
from heron.store.inputs import existing_input
from heron.cli.watermark import watermark_from_args
from heron.interop.gguf import save_gguf
from heron.train import CheckpointError, load_recipe, train

DEFAULT_NEW_TOKENS = 128  # heron generate, unless the model's context leaves less room
DEFAULT_EVAL_SEQ_LEN = 256  # tokens per scored window, unless the model's context is shorter
# Past the largest vocabularies in use (Gemma's 262k); the `tokenizers` trainer reserves room for the size asked
# for, so a mistyped 1e12 aborts the process in Rust instead of failing.
MAX_VOCAB_SIZE = 2**20
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, then the special tokens: train_tokenizer's floor


def corpus_from(sources: list[str], extensions: list[str] | None) -> Corpus:
    if not sources:
        return default_corpus()
    return Corpus(sources, extensions=extensions)


def tokenizer_train(args: argparse.Namespace) -> int:
    if args.vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"--vocab-size: at most {MAX_VOCAB_SIZE:,}, got {args.vocab_size:,}")
    if args.vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"--vocab-size: at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special "
                         f"tokens), got {args.vocab_size}")
    file = replaceable_tokenizer_file(args.out)  # before training: a refused --out costs nothing
    if file.name == TOKENIZER_FILE and (file.parent / META_FILE).is_file():
        raise FileExistsError(f"{file.parent}: holds shards ({META_FILE}) made with its {TOKENIZER_FILE}, which "
                              "another tokenizer would orphan; write the tokenizer to another folder and prepare "
                              "new shards with it")
    corpus = corpus_from(args.sources, args.ext).excluding(file)  # a rerun into the corpus must not learn it
    print(f"training a {args.vocab_size}-token BPE on {len(corpus)} files")
    tokenizer = train_tokenizer(corpus, args.vocab_size)
    corpus.check_decodable()
    if corpus.skipped:
        warnings.warn(f"skipped {len(corpus.skipped)} undecodable (non-UTF-8) files, e.g. {corpus.skipped[0]}",
                      stacklevel=1)
    if tokenizer.vocab_size < args.vocab_size:
        warnings.warn(f"the corpus gave {tokenizer.vocab_size} tokens, not the {args.vocab_size} asked for: BPE "
                      "stops when no pair of tokens occurs twice more", stacklevel=1)
    print(f"tokenizer: {tokenizer.save(args.out)} ({tokenizer.vocab_size} tokens)")
    return 0


def data_prepare(args: argparse.Namespace) -> int:
    source = Path(args.tokenizer)  # a tokenizer.json, or a folder: Heron's, or a Hugging Face model's
    tokenizer = load_tokenizer(source) if source.is_dir() else HeronTokenizer.load(source)
    shards = prepare_shards(corpus_from(args.sources, args.ext), tokenizer, args.out,
                            val_fraction=args.val_fraction, seed=args.seed, tokenizer_source=source)
    reused = "; reused: the corpus and tokenizer are those that made them" if shards.reused else ""
    print(f"shards: {shards.path} ({len(shards.train):,} train / {len(shards.val):,} validation tokens{reused})")
    for split, tokens in (("training", shards.train), ("validation", shards.val)):
        if len(tokens) == 0:
            warnings.warn(f"the {split} split is empty: training needs both, `heron eval` the validation one "
                          "(add files, or change --val-fraction; a corpus of one file cannot be split)", stacklevel=1)
    return 0


def recipe_from_args(args: argparse.Namespace, load: Callable[[Path, list[str]], Any] = load_recipe,
                     shipped_in: Path = RECIPES_DIR) -> Any:
    """The recipe args.recipe names (a file, or one shipped in `shipped_in`) read by `load` with the --set
    overrides; an error in a field a --set gave is named as that --set (the library names the field, which
    a recipe file gives as well)."""
    try:
        return load(recipe_path(args.recipe, shipped_in), args.overrides)
    except ValueError as err:
        raise as_override(err, args.overrides) from None


def train_recipe(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    result = train(recipe, resume=not args.no_resume)
    if result.checkpoint is not None and result.is_main:  # under torchrun, one report for the run
        print(f"run folder: {result.out_dir}\ncheckpoint: {result.checkpoint}")
    return 0


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The flags as SamplingParams; an invalid one is named as the flag the user typed."""
    new_tokens = DEFAULT_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    try:
        return SamplingParams(max_new_tokens=new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=tuple(args.stop),
                              seed=args.seed, watermark=watermark_from_args(args))
    except ValueError as err:
        raise sampling_flag(err, args) from None


def sampling_flag(err: ValueError, args: argparse.Namespace) -> ValueError:
    """An error of SamplingParams or its Watermark, `top_p: ...`, named as the flag the user typed: `--top-p: ...`
    (a Watermark names its own fields, key, gamma and delta, which the --watermark-* flags set)."""
    field, sep, rest = str(err).partition(": ")
    name = next((n for n in (field, f"watermark_{field}") if n in vars(args)), None)
    return ValueError(f"{flag_of(name)}: {rest}") if sep and name is not None else err


def device_from(text: str) -> torch.device:
    """--device: "auto" is the first CUDA GPU when torch sees one, else the CPU."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device: torch.device | None = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: {text!r} is not a device (cpu, cuda, cuda:N or auto)")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ValueError(f"--device: {text!r}: torch sees {count or 'no'} CUDA device(s) here")
    return device


def load_on(checkpoint: Path, device: str) -> tuple[Transformer, Tokenizer | None]:
    """`heron.load`, then the model moved to --device (checked before loading)."""
    target = device_from(device)
    model, tokenizer = heron.load(checkpoint)
    return model.to(target), tokenizer


def prompt_from_stdin() -> str:
    """Standard input less one trailing newline, the one `echo` or a terminal's last Enter adds."""
    if sys.stdin.isatty():
        print("reading the prompt from standard input; end it with Ctrl-D", file=sys.stderr)
    text = sys.stdin.read()
    return text.removesuffix("\n").removesuffix("\r")


def generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # before the model loads, and before a prompt is read from standard input
    if args.system is not None and not args.chat:
        raise ValueError("--system: a system turn belongs to a chat; add --chat")
    model, tokenizer = load_on(args.checkpoint, args.device)
    if tokenizer is None:
        raise CheckpointError(f"{args.checkpoint}: no tokenizer.json, so text cannot be generated")
    if params.watermark is not None:  # γ against the model's vocabulary: checked before any token is sampled
        try:
            params.watermark.green_size(model.config.vocab_size)
        except ValueError as err:
            raise sampling_flag(err, args) from None
    texts = args.prompt or [prompt_from_stdin()]
    generator = Generator(model, tokenizer)
    if args.chat:  # each prompt is a user turn; the reply ends with the turn's end token
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        prompts = [tokenizer.chat_prompt_ids([*system, {"role": "user", "content": t}]) for t in texts]
        texts = [tokenizer.decode(ids, skip_special=False) for ids in prompts]
        params = dataclasses.replace(params, stop_token_ids=tokenizer.chat_stop_ids)
    else:
        prompts = [generator.prompt_ids(t) for t in texts]
    longest, context = max(map(len, prompts)), model.config.max_seq_len
    room = context + 1 - longest  # the last new token is never fed back: a prompt filling the context gets one
    if room < 1:
        raise ValueError(f"prompt: {longest} tokens, more than the model's context of {context}; shorten it")
    if args.max_new_tokens is None:  # the default, as far as the model's context leaves room for it
        params = dataclasses.replace(params, max_new_tokens=min(DEFAULT_NEW_TOKENS, room))
    elif args.max_new_tokens > room:
        raise ValueError(f"--max-new-tokens: at most {room} after a {longest}-token prompt (the model's context is "
                         f"{context} tokens), got {args.max_new_tokens}")
    if len(prompts) == 1 and not args.no_stream:
        pieces = generator.stream(prompts[0], params)  # checks and prefills before the prompt is echoed
        print(texts[0], end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
        return 0
    completions = [prompt + text for prompt, text in zip(texts, generator.generate(prompts, params))]
    print(f"\n{'-' * 40}\n".join(completions))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    model, tokenizer = load_on(args.checkpoint, args.device)
    if args.seq_len is not None and args.seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq-len: at most the model's max_seq_len {model.config.max_seq_len}, got {args.seq_len}")
    shards = load_shards(args.shards)
    check_shards_fit(shards, str(args.checkpoint), vocab_size=model.config.vocab_size, tokenizer=tokenizer)
    check_val_scorable(shards)
    seq_len = min(DEFAULT_EVAL_SEQ_LEN, model.config.max_seq_len) if args.seq_len is None else args.seq_len
    meter = EnergyMeter().start()
    ppl = perplexity(model, shards.val, seq_len=seq_len, batch_size=args.batch_size,
                     max_batches=args.max_batches, progress=True)
    print(meter.stop(tokens=scored_tokens(len(shards.val), seq_len, args.batch_size, args.max_batches)).summary())
    print(f"validation perplexity: {ppl:.3f}")  # last: scripts read the figure at the end
    return 0


def scored_tokens(n_tokens: int, seq_len: int, batch_size: int, max_batches: int | None) -> int:
    """How many tokens perplexity() predicts: those its evaluated windows predict."""
    starts = evaluated_windows(n_tokens, seq_len, batch_size, max_batches)
    return sum(min(seq_len, n_tokens - 1 - s) for s in starts)


def convert_from_hf(args: argparse.Namespace) -> int:
    target = import_hf(args.source, args.target)
    print(f"wrote Heron checkpoint {target}")
    return 0


def convert_to_hf(args: argparse.Namespace) -> int:
    from heron.compress.checkpoint import is_quantized_folder
    from heron.train.checkpoint import require_new_folder, resolve_checkpoint

    require_new_folder(args.target, args.checkpoint)
    if is_quantized_folder(resolve_checkpoint(args.checkpoint)):
        raise ValueError(f"{args.checkpoint}: quantised; Hugging Face folders hold full-precision weights here: "
                         "export the model it was quantised from, or write a GGUF file (heron convert to-gguf)")
    family = export_hf(args.checkpoint, args.target, args.family, load=heron.load)  # pruned ones too
    print(f"wrote {family.architecture} folder {args.target}")
    return 0


def convert_to_gguf(args: argparse.Namespace) -> int:
    from heron.compress.gguf_export import dequantised_layers, save_quantized_gguf
    from heron.compress.qlinear import is_quantized
    from heron.train.checkpoint import require_new_folder

    if args.target.exists():  # before loading: nothing is replaced, not even an older GGUF
        raise FileExistsError(f"{args.target}: exists; write the GGUF file to a new path")
    # Nor written into the source (its folder, or the checkpoint a run folder names): that would change
    # what the folder's lineage and audit hashes describe. The check to-hf makes of its folder, of a file here.
    require_new_folder(args.target, args.checkpoint)
    model, tokenizer = heron.load(args.checkpoint)
    if tokenizer is None:
        raise CheckpointError(f"{args.checkpoint}: no tokenizer.json; a GGUF file carries the tokenizer")
    if is_quantized(model):
        path = save_quantized_gguf(model, tokenizer, args.target, dtype=args.dtype)  # warns naming any fallback
        fallen_back = len(dequantised_layers(model))
        what = (f"quantised layers' own codes where they fit a ggml block, {fallen_back} dequantised as "
                f"{args.dtype} (named above)" if fallen_back else "quantised layers' own codes")
        what += f", other matrices {args.dtype}"
    else:
        path = save_gguf(model, tokenizer, args.target, dtype=args.dtype)
        what = args.dtype
    print(f"wrote GGUF {path} ({what}; {path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def align(args: argparse.Namespace) -> int:
    from heron.align.recipe import load_align_recipe
    from heron.align.run import run_alignment

    recipe = recipe_from_args(args, load_align_recipe, ALIGN_RECIPES_DIR)
    folder = run_alignment(args.method, recipe, resume=not args.no_resume)
    print(f"wrote {args.method} checkpoint {folder} (metrics: {Path(recipe.out_dir) / 'metrics.jsonl'})")
    return 0


# ----- compress ---------------------------------------------------------------------


def compress_prune(args: argparse.Namespace) -> int:
    from heron.compress.prune_checkpoint import PruneSettings, prune_checkpoint

    structured = (args.mlp_channels, args.heads, args.experts)  # scored on calibration windows when given
    if args.calib_shards is not None and args.method == "magnitude" and not args.recover_steps and all(
            v is None for v in structured):
        raise ValueError("--calib-shards: --method magnitude reads no calibration windows, and no --recover-steps "
                         "train on them (use --method wanda or sparsegpt, or add --recover-steps)")
    try:
        settings = PruneSettings(
            method=args.method, sparsity=args.sparsity, nm=args.nm, mlp_channels=args.mlp_channels, heads=args.heads,
            experts=args.experts, calib_shards=args.calib_shards, calib_batches=args.calib_batches,
            calib_batch_size=args.calib_batch_size, seq_len=args.seq_len, recover_steps=args.recover_steps,
            recover_lr=args.recover_lr,
        )
        report = prune_checkpoint(args.checkpoint, args.target, settings)
    except ValueError as err:
        raise in_flags(err, args, PruneSettings) from None
    print(f"wrote pruned checkpoint {args.target}: {report['parameters_before']:,} -> "
          f"{report['parameters_after']:,} parameters, block linears {report['block_linear_sparsity']:.1%} zeros")
    return 0


def compress_quantize(args: argparse.Namespace) -> int:
    from heron.compress.quantize import QuantizeSettings
    from heron.compress.quantize_checkpoint import QuantizeCheckpointSettings, quantize_checkpoint

    if args.group_size is not None and "int4" not in (args.scheme, args.embeddings):
        raise ValueError("--group-size: applies to int4 only (int8 keeps one scale per output row)")
    if args.calib_shards is not None and args.method == "rtn":
        raise ValueError("--calib-shards: rtn rounds each weight on its own and reads no calibration data "
                         "(use --method gptq or awq)")
    group_size = QuantizeSettings.group_size if args.group_size is None else args.group_size
    try:
        settings = QuantizeCheckpointSettings(
            QuantizeSettings(scheme=args.scheme, method=args.method, group_size=group_size,
                             act_order=args.act_order, embeddings=args.embeddings, symmetric=args.symmetric),
            calib_shards=args.calib_shards, calib_batches=args.calib_batches,
            calib_batch_size=args.calib_batch_size, seq_len=args.seq_len,
        )
        report = quantize_checkpoint(args.checkpoint, args.target, settings)
    except ValueError as err:
        raise as_flag(err, args, QuantizeSettings, QuantizeCheckpointSettings) from None
    ratio = f", {report['size_vs_source']:.3f}x the source's weights file" if report["size_vs_source"] else ""
    print(f"wrote {args.scheme} {args.method} checkpoint {args.target}: {report['model_bytes']:,} bytes{ratio}")
    return 0


def hidden_layers(text: str | None) -> dict[int, int] | None:
    """--hidden-layers "1,_,3": student layer i matches the i-th teacher layer ('_': none)."""
    if text is None:
        return None
    entries = [entry.strip() for entry in text.split(",")]
    for entry in entries:
        if entry != "_" and not entry.isdigit():
            raise ValueError(f"hidden_layers: {entry!r} in {text!r} is not a teacher layer index or '_'")
    return {i: int(entry) for i, entry in enumerate(entries) if entry != "_"}


def distill_layers(args: argparse.Namespace) -> dict[int, int] | None:
    """--hidden-layers as a layer map, after the checks distill() makes only once the teacher and the data
    are loaded (but those of the layer numbers, which need both)."""
    from heron.compress.distill import check_hidden_weight
    from heron.compress.distill_loss import check_settings

    check_settings(args.temperature, args.alpha)
    check_hidden_weight(args.hidden_weight)
    layers = hidden_layers(args.hidden_layers)
    if layers is not None and args.hidden_weight == 0:
        raise ValueError("hidden_layers: matches hidden states, which --hidden-weight 0 (the default) leaves out; "
                         "add --hidden-weight above 0")
    return layers


def compress_distill(args: argparse.Namespace) -> int:
    from heron.compress.distill import distill

    try:
        layers = distill_layers(args)  # before the recipe's data and the teacher load
        recipe = recipe_from_args(args)
        result = distill(args.teacher, recipe, temperature=args.temperature, alpha=args.alpha,
                         hidden_weight=args.hidden_weight, hidden_layers=layers, resume=not args.no_resume)
    except ValueError as err:  # the keywords distill() names in its errors, each set by its flag
        raise as_flag(err, args, fields=("temperature", "alpha", "hidden_weight", "hidden_layers")) from None
    if result.is_main:
        print(f"run folder: {result.out_dir}\nstudent checkpoint: {result.checkpoint}")
    return 0


def explain(args: argparse.Namespace) -> int:
    from heron.interpret.explain import ExplainSettings, explain as write_explanation

    try:  # before loading the model
        settings = ExplainSettings(prompt=args.prompt, corrupted=args.corrupted, target=args.target,
                                   ig_steps=args.ig_steps)
    except ValueError as err:
        raise as_flag(err, args, ExplainSettings) from None
    model, tokenizer = heron.load(args.checkpoint)
    if tokenizer is None:
        raise CheckpointError(f"{args.checkpoint}: no tokenizer; explaining a prompt needs the model's tokenizer")
    try:  # the library tokenises the prompts and the target, naming its fields: `prompt: '' encodes to no tokens`
        page = write_explanation(model, tokenizer, settings, args.out)
    except ValueError as err:
        raise as_flag(err, args, ExplainSettings) from None
    print(f"wrote {page}")
    return 0


def compress_report(args: argparse.Namespace) -> int:
    from heron.compress.report import measure, report_folder, write_report

    report_folder(args.out)  # before measuring: a refused --out costs nothing
    for folder in args.checkpoints:  # before the lineage checks warn, and before any model is measured
        existing_input(folder, "checkpoints", "checkpoint", folder=True)
    for folder in args.baseline:
        existing_input(folder, "--baseline", "checkpoint", folder=True)
    rows = measure(args.checkpoints + args.baseline, load_shards(args.shards), seq_len=args.seq_len,
                   max_batches=args.max_batches, new_tokens=args.new_tokens, baselines=args.baseline)
    report = write_report(rows, args.out)
    print(report.read_text(encoding="utf-8"))
    return 0
