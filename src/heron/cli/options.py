"""What the CLI's verbs share before any work: shipped recipes, argument types, naming
a library's error by its flag, and reading a text argument or checking an output path.

Standard library only, so that building the parser (`heron --help`, and the
verbs that need no model: consent, audit, feedback) loads neither torch nor
the model code; the verbs' handlers import those when they run.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
ALIGN_RECIPES_DIR = RECIPES_DIR / "align"
DEMO_RECIPE = "tiny-moe-sparse"


def shipped_recipes(folder: Path = RECIPES_DIR) -> list[str]:
    """The names of the recipes shipped in `folder`."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


def recipe_path(name_or_path: str, shipped_in: Path = RECIPES_DIR) -> Path:
    """A recipe file, or the name of one shipped with Heron (`tiny`; `task-dpo` in recipes/align)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_in / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(shipped_recipes(shipped_in))
    raise FileNotFoundError(f"no recipe file {name_or_path!r} and no shipped recipe of that name ({names})")


def n_of_m(text: str) -> tuple[int, int]:
    """"2:4" -> (2, 4)."""
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:M such as 2:4, got {text!r}") from None
    return n, m


def positive_int(text: str) -> int:
    """An argparse type: a whole number above zero."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def finite_float(text: str) -> float:
    """An argparse type: a number that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def fraction_below_one(text: str) -> float:
    """An argparse type: a share from 0 up to, not including, 1 (--val-fraction; the library checks it
    only once the tokenizer is loaded, and names its keyword)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value:g}")
    return value


def flag_of(field: str) -> str:
    """The flag that sets a settings field: calib_shards -> --calib-shards."""
    return f"--{field.replace('_', '-')}"


def as_flag(err: ValueError, args: argparse.Namespace, *settings: type, fields: tuple[str, ...] = ()) -> ValueError:
    """An error of the settings classes (or naming one of `fields`), `calib_shards: ...`, named as the
    flag that sets the field: `--calib-shards: ...` (the library names its fields; the user typed flags)."""
    field, sep, rest = str(err).partition(": ")
    names = {f.name for cls in settings for f in dataclasses.fields(cls)} | set(fields)
    if sep and field in vars(args) and field in names:
        return ValueError(f"{flag_of(field)}: {rest}")
    return err


def in_flags(err: ValueError, args: argparse.Namespace, *settings: type) -> ValueError:
    """as_flag, and the fields the message goes on to name written as flags too: a setting `experts=3`
    or `method 'wanda'` as `--experts 3`, `--method wanda`; a list `sparsity, nm or heads` as `--sparsity,
    --nm or --heads`. A message that offers its own field (`sparsity: nothing to prune; give sparsity, ...`)
    needs no flag before it, and `got None` (Python's word for a flag not given) goes."""
    named = as_flag(err, args, *settings)
    if named is err:
        return err
    flag, _, rest = str(named).partition(": ")
    fields = "|".join(f.name for cls in settings for f in dataclasses.fields(cls) if f.name in vars(args))
    setting = re.compile(rf"\b({fields})(?:=| ')(\([^)]*\)|[^\s,']+)'?")  # experts=3, nm=(2, 4), method 'wanda'
    listed = re.compile(rf"(?<![-\w])(?:{fields})(?:(?:, | or | and )(?:{fields}))+\b")  # sparsity, nm or heads
    rest = setting.sub(lambda m: f"{flag_of(m[1])} {m[2]}", rest)
    rest = listed.sub(lambda m: re.sub(rf"\b({fields})\b", lambda f: flag_of(f[1]), m[0]), rest)
    rest = rest.removesuffix(", got None")
    return ValueError(rest if re.search(rf"{flag}(?![-\w])", rest) else f"{flag}: {rest}")


def as_override(err: ValueError, overrides: list[str]) -> ValueError:
    """A recipe's error about a field a --set gave, `train.steps: Input should be greater than 0 (got -1)`,
    named as that --set: `--set train.steps=-1: must be greater than 0` (the value is the one typed: the
    last --set of a field, the one that counts). Each line of a many-line error on its own; the others,
    and any error of a recipe file's own field, keep the field's name."""
    given = {item.partition("=")[0].strip(): item for item in overrides}
    lines = []
    for line in str(err).splitlines():
        field, sep, reason = line.partition(": ")
        if sep and field in given:
            reason = re.sub(r" \(got .*\)$", "", re.sub(r"^Input should be ", "must be ", reason))
            line = f"--set {given[field]}: {reason}"
        lines.append(line)
    text = "\n".join(lines)
    return err if text == str(err) else ValueError(text)


# How a file name given where text is also accepted usually ends: such an argument that names
# no file is taken for a mistyped path, not for the text to read.
TEXT_FILE_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".csv", ".tsv", ".log", ".py", ".html", ".xml", ".yaml",
                      ".yml")


def could_be_a_path(argument: str) -> bool:
    """Whether a `TEXT` argument may name a file: not '-', not empty, one line, at most 1024 characters
    (longer is text: no path is, and asking the file system fails on it)."""
    return argument not in ("", "-") and "\n" not in argument and len(argument) <= 1024


def text_or_file(argument: str) -> str:
    """What a `TEXT` argument holds: standard input for '-', the contents of the file it names,
    else the argument itself. A folder, a file that is not UTF-8, or a missing file named like
    one (`notes.txt`, or `data/x` where data/ exists; not `N/A` or a URL) is an error, so a
    typo never passes as the text to read."""
    if argument == "-":
        return sys.stdin.read()
    if not could_be_a_path(argument):
        return argument
    path = Path(argument)
    if path.is_dir():
        raise IsADirectoryError(f"{argument}: is a folder; give a file, the text itself, or - for standard input")
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{argument}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    looks_like_a_path = not any(c.isspace() for c in argument) and "://" not in argument and (
        path.suffix.lower() in TEXT_FILE_SUFFIXES or ("/" in argument and path.parent.is_dir()))
    if looks_like_a_path:
        raise FileNotFoundError(f"{argument}: no such file (to check the words themselves, "
                                f"pass them on standard input: echo '{argument}' | heron ... -)")
    return argument


def not_the_source(out: Path, source: str | Path, what: str) -> Path:
    """`out`, unless it is the file `source` (a path or an sqlite:/// URL) names: an export
    written there would replace the very database it reads."""
    text = str(source)
    if "://" in text:
        if not text.startswith("sqlite:///") or text == "sqlite:///":
            return out
        text = text.removeprefix("sqlite:///")
    if out.exists() and Path(text).exists() and os.path.samefile(out, text):
        raise FileExistsError(f"{out}: is the {what} being read; write to another file")
    return out


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """--overwrite, for the verbs that write a file from a database (`new_output` reads it)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the file if it exists (default: an existing file is refused)")


def new_output(out: Path, source: str, what: str, overwrite: bool) -> Path:
    """`out`, where a verb may write what it read from the database `source`: never the database
    itself, and an existing file only with --overwrite (a user's file, or the one imported from)."""
    not_the_source(out, source, what)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists; write to a new file, or pass --overwrite to replace it")
    return out


def lasting_database(text: str) -> str:
    """An argparse type: a database path or URL that outlives the command (an in-memory SQLite
    database, `:memory:` or `sqlite://`, would take the writes and drop them on exit)."""
    if text.strip() in (":memory:", "sqlite://", "sqlite:///", "sqlite:///:memory:"):
        raise argparse.ArgumentTypeError(f"{text!r} is an in-memory database: nothing would be kept; "
                                         "give a file or a server's URL")
    return text
