"""`heron watermark detect ...`, and the `--watermark-*` options of generation.

    heron watermark detect out.txt --tokenizer runs/demo/tiny-moe-sparse/checkpoints/latest --key 42
    heron watermark detect "def f(x): ..." --tokenizer tokenizer.json --key 42 --gamma 0.25

The detector must see the token ids the generator saw, over the same
vocabulary size: the model's (config.json's `vocab_size`, which can exceed
the tokenizer's when the embedding is padded). Given a checkpoint folder it
reads that; given a bare tokenizer.json it uses the tokenizer's size, and
`--vocab-size` overrides both.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from heron.cli.options import as_flag, finite_float, positive_int, text_or_file
from heron.govern.digest import CONFIG_FILE
from heron.govern.history import read_json
from heron.tokenizer import HeronTokenizer, Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from heron.govern.watermark import Watermark

# Embeddings are padded past the tokenizer to a multiple of 64 to 1024 (GPT-2's 50257 to 50304; Megatron's
# 128 per tensor-parallel rank): the largest --vocab-size a model of a tokenizer plausibly has.
PAD_MULTIPLE = 1024


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the `watermark` verb to the CLI's verbs."""
    actions = verbs.add_parser("watermark", help="green-list watermarks (Kirchenbauer et al. 2023)").add_subparsers(
        dest="action", required=True)
    p = actions.add_parser("detect", help="z-test a text for the watermark of a key")
    p.add_argument("text", help="the text, a file holding it, or - for standard input")
    p.add_argument("--tokenizer", type=Path, required=True,
                   help="a checkpoint (or run) folder, or a tokenizer.json")
    p.add_argument("--key", required=True, help="the secret key the text was generated with")
    p.add_argument("--gamma", type=float, default=None, help="green fraction used at generation (default 0.25)")
    p.add_argument("--z", dest="z_threshold", type=z_threshold, default=None,
                   help="the z whose normal-tail false-positive rate, 3.2e-5 at z 4, the verdict holds (default 4)")
    p.add_argument("--vocab-size", type=positive_int, default=None,
                   help="the generating model's vocabulary size (default: the checkpoint's, else the tokenizer's)")
    p.add_argument("--count-repeated", action="store_true",
                   help="score repeated (previous, token) bigrams every time, not once")
    p.set_defaults(handler=detect_command)


def z_threshold(text: str) -> float:
    """An argparse type for --z: above 0, where the false-positive rate is below 1/2 (at 0 or below,
    plain text, green a γ-fraction of the time, would pass for watermarked half the time or more)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return value


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """--watermark-key (and its γ and δ) for a verb that samples text."""
    parser.add_argument("--watermark-key", default=None, help="watermark the output with this secret key")
    parser.add_argument("--watermark-gamma", type=float, default=None, help="green fraction (default 0.25)")
    parser.add_argument("--watermark-delta", type=float, default=None,
                        help="logit bias of green tokens (default 2)")


def watermark_from_args(args: argparse.Namespace) -> Watermark | None:
    """The Watermark that `add_generation_options`' flags ask for (None without --watermark-key)."""
    if args.watermark_key is None:
        for flag in ("gamma", "delta"):
            if getattr(args, f"watermark_{flag}") is not None:
                raise ValueError(f"--watermark-{flag}: sets the watermark of --watermark-key; add the key")
        return None
    return _watermark(args.watermark_key, gamma=args.watermark_gamma, delta=args.watermark_delta)


def _watermark(key: str, **settings: float | None) -> Watermark:
    """A Watermark with the settings given on the command line, the library's defaults for the rest.

    Imported here, not at the top: the parser is built for every verb, and this module needs torch."""
    from heron.govern.watermark import Watermark

    return Watermark(key=key, **{name: value for name, value in settings.items() if value is not None})


def detect_command(args: argparse.Namespace) -> int:
    try:  # the Watermark names its fields (key, gamma): checked before the tokenizer loads, γ then against its size
        watermark = _watermark(args.key, gamma=args.gamma)
        tokenizer, vocab_size = tokenizer_and_vocab(args.tokenizer)
        vocab_size = vocab_size if args.vocab_size is None else checked_vocab_size(args.vocab_size, tokenizer,
                                                                                  vocab_size)
        watermark.green_size(vocab_size)
    except ValueError as err:
        raise as_flag(err, args, fields=("key", "gamma")) from None
    from heron.govern.watermark import DEFAULT_Z_THRESHOLD, detect, p_value

    ids = tokenizer.encode(text_or_file(args.text))
    z_threshold = DEFAULT_Z_THRESHOLD if args.z_threshold is None else args.z_threshold
    result = detect(ids, watermark, vocab_size, z_threshold, ignore_repeated=not args.count_repeated)
    share = result.green / result.scored if result.scored else 0.0
    print(f"tokens {len(ids)}, scored {result.scored}"
          f"{'' if args.count_repeated else ' (distinct bigrams)'}, green {result.green} ({share:.1%}; "
          f"{watermark.green_size(vocab_size) / vocab_size:.1%} expected without a watermark)")
    # Four digits: near the threshold two would print the p-value and the rate it is held to alike.
    print(f"z {result.z:.2f} (normal approximation), p-value {result.p_value:.4g} (exact binomial tail: "
          "the verdict's)")
    if not result.scored:
        print("verdict: none: no token was scored (a text needs at least two tokens)")
        return 0
    verdict = "watermarked" if result.watermarked else "not watermarked"
    alpha = p_value(result.z_threshold)
    print(f"verdict: {verdict} (p-value {'<=' if result.watermarked else '>'} {alpha:.4g}, the false-positive "
          f"rate of z > {result.z_threshold:g})")
    return 0


def checked_vocab_size(requested: int, tokenizer: Tokenizer, known: int) -> int:
    """--vocab-size, if a model of this tokenizer can have it: at least the tokenizer's ids, at most the
    known vocabulary (the checkpoint's, else the tokenizer's) padded as embeddings are, to a multiple of
    PAD_MULTIPLE; a green list is hashed over every id, so a mistyped size would allocate without bound."""
    largest = -(-known // PAD_MULTIPLE) * PAD_MULTIPLE
    if not tokenizer.vocab_size <= requested <= largest:
        raise ValueError(f"--vocab-size: a model of this tokenizer (its ids, and {known} padded to a multiple of "
                         f"{PAD_MULTIPLE} at most) has {tokenizer.vocab_size} to {largest}, got {requested}")
    return requested


def tokenizer_and_vocab(path: Path) -> tuple[Tokenizer, int]:
    """(tokenizer, vocabulary size the model samples over) from a tokenizer.json or a checkpoint folder."""
    if path.is_file():
        tokenizer = HeronTokenizer.load(path)
        return tokenizer, tokenizer.vocab_size
    from heron.train.checkpoint import resolve_checkpoint  # torch: only for a checkpoint folder

    folder = resolve_checkpoint(path)
    tokenizer = load_tokenizer(folder)
    config = folder / CONFIG_FILE
    if config.is_file():
        data = read_json(config)
        size = data.get("vocab_size") or data.get("text_config", {}).get("vocab_size")
        if isinstance(size, int):
            return tokenizer, size
    return tokenizer, tokenizer.vocab_size


__all__ = ["add_generation_options", "detect_command", "register", "watermark_from_args"]
