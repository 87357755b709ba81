"""The parser and the verbs that need no model start without torch: `heron --help`,
consent, audit and feedback run in a fraction of the time a model verb takes to import."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from heron.cli.main import build_parser
from heron.govern.watermark import DEFAULT_DELTA, DEFAULT_GAMMA, DEFAULT_Z_THRESHOLD

LIGHT_RUN = """
import sys
from heron.cli.main import build_parser, main
build_parser().format_help()
assert main(["consent", "grant", "u1", "training", "--db", sys.argv[1]]) == 0
assert main(["feedback", "stats", "--db", sys.argv[1] + ".missing"]) == 2
assert main(["audit", "verify", "--log", sys.argv[1] + ".audit"]) == 2  # no log there: a user error
heavy = [m for m in ("torch", "heron.core", "heron.train", "transformers") if m in sys.modules]
print("loaded:", heavy)
"""


def test_the_parser_and_the_light_verbs_do_not_load_torch(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-c", LIGHT_RUN, str(tmp_path / "consent.db")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "loaded: []"


def test_watermark_help_states_the_library_defaults() -> None:
    """The options default to None (the library's defaults apply, without importing it to build
    the parser), so their help states the numbers: they must be the library's."""
    helps = {a.dest: a.help for p in _subparsers(build_parser()) for a in p._actions}
    assert f"(default {DEFAULT_GAMMA:g})" in helps["watermark_gamma"] and f"(default {DEFAULT_GAMMA:g})" in helps["gamma"]
    assert f"(default {DEFAULT_DELTA:g})" in helps["watermark_delta"]
    assert f"(default {DEFAULT_Z_THRESHOLD:g})" in helps["z_threshold"]


def test_every_option_and_positional_has_help() -> None:
    """Every argument of every verb says what it is, and every verb has its line in its group's list."""
    missing = [f"{parser.prog}: {action.option_strings or action.dest}"
               for parser in [build_parser(), *_subparsers(build_parser())] for action in _arguments(parser)
               if not action.help]
    assert missing == []


def test_every_default_is_stated_and_none_reads_as_none() -> None:
    """An option that falls back to a value says which; one that defaults to None says what that means
    in words, never "(default: None)"."""
    unstated, none = [], []
    for parser in _subparsers(build_parser()):
        expand = parser._get_formatter()._expand_help
        for action in _arguments(parser):
            text = expand(action) if action.help else ""
            if re.search(r"default:? None\b", text):
                none.append(f"{parser.prog} {action.dest}")
            if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
                unstated.append(f"{parser.prog} {action.dest}")
    assert unstated == [] and none == []


def test_the_align_verb_offers_the_methods_the_recipe_knows() -> None:
    """The parser spells the methods out (importing the recipe would load torch): they must agree."""
    from heron.align.recipe import METHODS

    align = next(p for p in _subparsers(build_parser()) if p.prog.endswith(" align"))
    assert tuple(next(a for a in align._actions if a.dest == "method").choices) == METHODS


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """`parser`'s arguments, less -h, with a verb group's verbs standing for the group."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.extend(action._choices_actions)
        elif not isinstance(action, argparse._HelpAction):
            found.append(action)
    return found


def _subparsers(parser):
    """Every parser under `parser`, depth first."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for sub in action.choices.values():
            yield sub
            yield from _subparsers(sub)
