"""`heron <verb> ...`: parses arguments and calls the layers below.

Each verb is one small function; the work lives in the library, so everything
the CLI does is also a Python call away. The verbs that run models live in
`commands` and `demo`, imported when one of them runs, so `heron --help` and
the verbs that need no model (consent, audit, feedback, pii) start without
loading torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from heron.cli.options import DEMO_RECIPE, fraction_below_one, n_of_m, positive_int, shipped_recipes

Handler = Callable[[argparse.Namespace], int]
Verbs = argparse._SubParsersAction  # what `add_subparsers` returns: each group's `register` adds its verbs to it
# Errors that mean "the input was wrong": shown as one line, not a traceback (RecipeError is a
# ValueError; CheckpointError is looked up where it lives, in `_is_user_error`).
USER_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError,
               KeyError)
SIGPIPE_EXIT = 141  # 128 + SIGPIPE: how a Unix tool whose reader went away ends (`heron ... | head`)
CHECKPOINT_HELP = "a checkpoint folder, a run folder (its latest checkpoint) or a Hugging Face folder"


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="tokens to generate at most (default: 128, or as many as the model's context leaves)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature (default %(default)g; 0 = greedy)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample from the k likeliest tokens only")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample from the smallest set of tokens holding this probability "
                             "(default %(default)g: all)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="penalise tokens already seen (CTRL's penalty; default %(default)g: none)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling: the same seed, the same text")
    from heron.cli import watermark

    watermark.add_generation_options(parser)  # --watermark-key, --watermark-gamma, --watermark-delta


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="where the model runs: cpu, cuda, cuda:N, or auto (the default: a CUDA GPU when torch "
                             "sees one, else the CPU)")


def _lazy(module: str, name: str) -> Handler:
    """The handler `name` of heron.cli.`module`, imported when the verb runs. These verbs
    run models in a process that is Heron's, so the C library keeps the memory freed
    tensors held for the next ones (core/allocator.py)."""
    def run(args: argparse.Namespace) -> int:
        from heron.core.allocator import retain_freed_memory

        retain_freed_memory()
        return getattr(importlib.import_module(f"heron.cli.{module}"), name)(args)
    return run


def _is_user_error(err: Exception) -> bool:
    """Whether `err` says the input was wrong. A CheckpointError can only come from its
    module, so it is looked for only once that module is loaded."""
    checkpoint = sys.modules.get("heron.train.checkpoint")
    return isinstance(err, USER_ERRORS) or (checkpoint is not None and isinstance(err, checkpoint.CheckpointError))


def _is_busy_database(err: Exception) -> bool:
    """SQLite's "database is locked": another process's transaction, not a fault of the input."""
    return type(err).__name__ == "OperationalError" and "database is locked" in str(err)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with a hint where it takes a value that begins with "-" for an option:
    `--nm -1:4` or `--stop ---` otherwise reads "expected one argument" and no more. Subcommands'
    parsers are of this class too (`add_subparsers` makes them of the parent's class)."""

    def error(self, message: str) -> NoReturn:
        if message.endswith(": expected one argument"):
            option = message.removeprefix("argument ").split(":")[0].split("/")[-1]  # "-o/--out" -> "--out"
            message += f" (if its value begins with '-', join the two with '=': {option}=VALUE)"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="heron", description="An open workbench for language models.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for register in (_register_tokenizer, _register_data, _register_train, _register_generate, _register_eval,
                     _register_convert, _register_compress, _register_align, _register_explain, _register_demo):
        register(verbs)
    # governance: each verb's parser and handlers live in its own module (imported here, inside
    # main's reach, so that Ctrl-C while they load is one line, not a traceback)
    from heron.cli import audit, card, consent, feedback, pii, watermark

    for verb in (feedback, audit, card, consent, pii, watermark):
        verb.register(verbs)
    return parser


def _register_tokenizer(verbs: Verbs) -> None:
    tok = verbs.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer on a corpus")
    p.add_argument("sources", nargs="*", help="files, folders or globs (default: the Python standard library)")
    p.add_argument("--vocab-size", type=positive_int, default=8192,
                   help="tokens in the vocabulary, specials included (default %(default)s)")
    p.add_argument("--ext", action="append", default=None, help="file extensions to read, e.g. .py (repeatable)")
    p.add_argument("--out", type=Path, required=True,
                   help="where to write tokenizer.json: a .json file or a folder; an existing Heron tokenizer is "
                        "replaced, any other file (or a model's folder) refused")
    p.set_defaults(handler=_lazy("commands", "tokenizer_train"))


def _register_data(verbs: Verbs) -> None:
    data = verbs.add_parser("data", help="data tools").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="tokenise a corpus into memory-mapped shards")
    p.add_argument("sources", nargs="*", help="files, folders or globs (default: the Python standard library)")
    p.add_argument("--tokenizer", type=Path, required=True,
                   help="tokenizer.json, or a folder holding it: Heron's, or an imported (Hugging Face) model's")
    p.add_argument("--ext", action="append", default=None, help="file extensions to read (repeatable)")
    p.add_argument("--val-fraction", type=fraction_below_one, default=0.02,
                   help="share of documents held out for validation (default %(default)g)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the train/validation split by document (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="shard folder to write")
    p.set_defaults(handler=_lazy("commands", "data_prepare"))


def _add_recipe_run_options(p: argparse.ArgumentParser, example: str, no_resume_help: str) -> None:
    """--set KEY=VALUE overrides (`example` shows one) and --no-resume, for a command that runs a recipe."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe field, e.g. --set {example} (repeatable)")
    p.add_argument("--no-resume", action="store_true", help=no_resume_help)


def _register_train(verbs: Verbs) -> None:
    shipped = ", ".join(shipped_recipes())
    p = verbs.add_parser("train", help=f"train from a recipe (a YAML file or a shipped name: {shipped})")
    p.add_argument("recipe", help="a recipe YAML file, or a shipped recipe's name")
    _add_recipe_run_options(p, "train.steps=100",
                            "start over, deleting the run folder's checkpoints and metrics (default: resume from them)")
    p.set_defaults(handler=_lazy("commands", "train_recipe"))


def _register_generate(verbs: Verbs) -> None:
    p = verbs.add_parser("generate", help="continue a prompt with a checkpoint")
    p.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (repeatable: a batch; default: standard input, less one trailing newline)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="with --chat: a system turn before the user's (instructions for the reply)")
    p.add_argument("--no-stream", action="store_true", help="print whole completions instead of streaming")
    _add_sampling(p)
    _add_device(p)
    p.set_defaults(handler=_lazy("commands", "generate"))


def _register_eval(verbs: Verbs) -> None:
    p = verbs.add_parser("eval", help="validation perplexity of a checkpoint")
    p.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    p.add_argument("--shards", type=Path, required=True, help="shard folder (its validation split is used)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per scored window (default: 256, or the model's max_seq_len if shorter)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows scored at once (default %(default)s)")
    p.add_argument("--max-batches", type=positive_int, default=None,
                   help="score this many batches of windows spread evenly over the split (default: all)")
    _add_device(p)
    p.set_defaults(handler=_lazy("commands", "evaluate"))


def _register_convert(verbs: Verbs) -> None:
    convert = verbs.add_parser("convert", help="model formats in and out").add_subparsers(dest="action", required=True)
    p = convert.add_parser("from-hf", help="a Hugging Face model folder -> a Heron checkpoint folder")
    p.add_argument("source", type=Path, help="folder with config.json and *.safetensors or pytorch_model.bin")
    p.add_argument("target", type=Path, help="checkpoint folder to write (new, or empty)")
    p.set_defaults(handler=_lazy("commands", "convert_from_hf"))
    p = convert.add_parser("to-hf", help="a Heron checkpoint -> a Hugging Face folder that transformers loads")
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("target", type=Path, help="folder to write (new, or empty)")
    p.add_argument("--family", default=None, help="force a family (default: the first that expresses the model)")
    p.set_defaults(handler=_lazy("commands", "convert_to_hf"))
    p = convert.add_parser("to-gguf", help="a Heron checkpoint or Hugging Face folder -> one GGUF file for llama.cpp")
    p.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    p.add_argument("target", type=Path, help="the .gguf file to write (a new path)")
    p.add_argument("--type", dest="dtype", choices=["f32", "f16", "q8_0", "q4_0", "q4_1"], default="f16",
                   help="tensor type of the matrices (norms stay f32); default %(default)s. A quantised checkpoint's "
                        "matrices keep their own codes (int8 -> q8_0, symmetric int4 -> q4_0, int4 -> q4_1); "
                        "int4 with a group size not a multiple of 32 goes in dequantised, with a warning")
    p.set_defaults(handler=_lazy("commands", "convert_to_gguf"))


def _register_compress(verbs: Verbs) -> None:
    actions = verbs.add_parser("compress", help="make a checkpoint smaller").add_subparsers(
        dest="action", required=True)
    for register in (_register_prune, _register_quantize, _register_distill, _register_report):
        register(actions)


def _register_prune(actions: Verbs) -> None:
    p = actions.add_parser("prune", help="unstructured or N:M (magnitude, wanda, sparsegpt), or structured pruning")
    p.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    p.add_argument("target", type=Path, help="checkpoint folder to write (new, or empty)")
    p.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], default="wanda",
                   help="how --sparsity and --nm score weights; wanda and sparsegpt read calibration windows "
                        "(default %(default)s)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of block-linear weights set to zero")
    p.add_argument("--nm", type=n_of_m, default=None, metavar="N:M", help="keep N of every M inputs, e.g. 2:4")
    p.add_argument("--mlp-channels", type=float, default=None, help="fraction of MLP hidden channels removed")
    p.add_argument("--heads", type=float, default=None, help="fraction of attention head (kv) groups removed")
    p.add_argument("--experts", type=positive_int, default=None, help="MoE experts kept per layer (the most routed)")
    _add_calibration(p, "shard folder: calibration and recovery windows (train split)")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="masked fine-tune steps after pruning (default %(default)s: none)")
    p.add_argument("--recover-lr", type=float, default=1e-5,
                   help="learning rate of the masked fine-tune (default %(default)g)")
    p.set_defaults(handler=_lazy("commands", "compress_prune"))


def _register_quantize(actions: Verbs) -> None:
    p = actions.add_parser("quantize", help="weight-only int8 or int4 (rtn, gptq, awq), loadable with heron.load")
    p.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    p.add_argument("target", type=Path, help="checkpoint folder to write (new, or empty)")
    p.add_argument("--scheme", choices=["int8", "int4"], default="int8",
                   help="codes of the linears inside each block (default %(default)s)")
    p.add_argument("--method", choices=["rtn", "gptq", "awq"], default="rtn",
                   help="rtn rounds each weight to the nearest code; gptq and awq calibrate on --calib-shards "
                        "(default %(default)s)")
    p.add_argument("--group-size", type=positive_int, default=None,
                   help="int4: input columns per scale and zero point (default 128)")
    p.add_argument("--act-order", action="store_true", help="gptq: columns in order of decreasing Hessian diagonal")
    p.add_argument("--embeddings", choices=["int8", "int4", "fp32"], default="int8",
                   help="format of the token embedding and output head (default %(default)s)")
    p.add_argument("--symmetric", action="store_true",
                   help="int4: llama.cpp Q4_0's grid (no zero points), so `convert to-gguf` writes Q4_0 exactly")
    _add_calibration(p, "gptq, awq: shard folder of calibration windows (train split)")
    p.set_defaults(handler=_lazy("commands", "compress_quantize"))


def _add_calibration(parser: argparse.ArgumentParser, shards_help: str) -> None:
    """The calibration windows pruning and quantisation read: where from, how many, how long."""
    parser.add_argument("--calib-shards", default=None, help=shards_help)
    parser.add_argument("--calib-batches", type=positive_int, default=16,
                        help="calibration batches drawn (default %(default)s)")
    parser.add_argument("--calib-batch-size", type=positive_int, default=8,
                        help="windows per batch (default %(default)s)")
    parser.add_argument("--seq-len", type=positive_int, default=256,
                        help="tokens per window, shortened to the model's max_seq_len (default %(default)s)")


def _register_distill(actions: Verbs) -> None:
    p = actions.add_parser("distill", help="train a smaller student (a training recipe) on a teacher's logits "
                                           "(and hidden states)")
    p.add_argument("teacher", type=Path, help="teacher: a Heron checkpoint (quantised or pruned too) or a Hugging "
                   "Face folder; the recipe's data must use its tokenizer")
    p.add_argument("recipe", help="the student's training recipe (file or shipped name)")
    p.add_argument("--temperature", type=float, default=2.0,
                   help="softening of both distributions (Hinton et al.; default %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the soft (KL) term; 1 - alpha on the labels (default %(default)s)")
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="weight of the hidden-state (TinyBERT) term: student residual streams, through a learned "
                        "projection, against the teacher's; 0 (default) = logits only")
    p.add_argument("--hidden-layers", default=None, metavar="T0,T1,...",
                   help="the teacher layer each student layer matches, '_' for none, e.g. _,1 (default: the "
                        "uniform map, last to last)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (repeatable)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over, deleting the output folder's checkpoints and metrics (default: resume)")
    p.set_defaults(handler=_lazy("commands", "compress_distill"))


def _register_report(actions: Verbs) -> None:
    p = actions.add_parser("report", help="size, perplexity, decode speed and energy of variants; Pareto plot")
    p.add_argument("checkpoints", type=Path, nargs="+", help="the reference first, then its variants")
    p.add_argument("--baseline", type=Path, action="append", default=[], metavar="CHECKPOINT",
                   help="a checkpoint measured after the variants without being one of the reference's (a student "
                        "trained from scratch, another model): no lineage warning (repeatable)")
    p.add_argument("--shards", type=Path, required=True, help="shard folder whose validation split is scored")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for report.md, report.json and pareto.png: new, empty or an earlier report's "
                        "(replaced); a folder holding other files is refused before any measuring")
    p.add_argument("--seq-len", type=positive_int, default=128,
                   help="tokens per scored window, shortened to the model's max_seq_len (default %(default)s)")
    p.add_argument("--max-batches", type=positive_int, default=16,
                   help="validation batches of 8 windows scored, spread evenly over the split (default %(default)s)")
    p.add_argument("--new-tokens", type=positive_int, default=64,
                   help="tokens decoded per speed round (default %(default)s)")
    p.set_defaults(handler=_lazy("commands", "compress_report"))


def _register_align(verbs: Verbs) -> None:
    p = verbs.add_parser("align", help="align a checkpoint: sft, rm, dpo (loss dpo, ipo, simpo or orpo: "
                                       "--set preference.loss=...), ppo or grpo")
    p.add_argument("method", choices=["sft", "rm", "dpo", "ppo", "grpo"],
                   help="sft: supervised fine-tuning; rm: a reward model; dpo: a preference loss on chosen and "
                        "rejected replies (preference.loss: dpo, ipo, simpo or orpo; orpo with preference.sft_weight=0, "
                        "its loss holding the NLL); ppo, grpo: reinforcement "
                        "learning against a reward")
    p.add_argument("recipe", help="an alignment recipe (YAML), or a shipped one's name (task-sft, task-dpo)")
    _add_recipe_run_options(p, "fit.steps=100",
                            "start over instead of going on from a killed run's saved state (out_dir/state.pt)")
    p.set_defaults(handler=_lazy("commands", "align"))


def _register_explain(verbs: Verbs) -> None:
    p = verbs.add_parser("explain", help="one prompt through every lens: an offline HTML report")
    p.add_argument("checkpoint", type=Path, help="a Heron checkpoint or Hugging Face folder (with its tokenizer)")
    p.add_argument("--prompt", required=True, help="the text to explain")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for index.html and its figures: new, empty, or an earlier report (replaced whole); "
                        "a folder holding any other file is refused")
    p.add_argument("--corrupted", default=None,
                   help="a prompt of the same token length to patch against (activation patching)")
    p.add_argument("--target", default=None, help="the next token to explain (default: the model's top prediction)")
    p.add_argument("--ig-steps", type=positive_int, default=32,
                   help="integrated-gradients steps, doubled if they miss (default %(default)s)")
    p.set_defaults(handler=_lazy("commands", "explain"))


def _register_demo(verbs: Verbs) -> None:
    p = verbs.add_parser("demo", help="the whole life of a small model on the Python standard library")
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="folder for every stage's output (default %(default)s)")
    p.add_argument("--recipe", default=DEMO_RECIPE,
                   help="the shipped recipe to pre-train (default %(default)s; tiny: the dense model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the demo's recipe (e.g. --set train.steps=50)")
    p.add_argument("--fresh", "--no-resume", dest="fresh", action="store_true",
                   help="start over (--no-resume is the same): pre-train from scratch (deleting the run's checkpoints and metrics) and delete "
                        "the alignment and compression outputs (OUT/align, OUT/compress) instead of reusing them")
    p.set_defaults(handler=_lazy("demo", "run"))


@contextmanager
def _plain_warnings(verb: str) -> Iterator[None]:
    """Warnings raised in Heron's code print as `heron VERB: warning: ...`, not as
    Python's file:line form; others print as usual. Restored on return."""
    with warnings.catch_warnings():
        python_form = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if f"{os.sep}heron{os.sep}" in filename:
                print(f"heron {verb}: warning: {message}", file=file or sys.stderr)
            else:
                python_form(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("heron: interrupted", file=sys.stderr)
        return 130
    try:
        with _plain_warnings(args.verb):
            return args.handler(args)
    except BrokenPipeError:  # quietly, as other tools: and no second error when Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_EXIT
    except Exception as err:
        if _is_busy_database(err):
            print(f"heron {args.verb}: error: the database is busy: another process held it past SQLite's wait "
                  "(one writer at a time); the transaction that failed was rolled back, so run the command again",
                  file=sys.stderr)
            return 2
        if not _is_user_error(err):
            raise
        print(f"heron {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"heron {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
