"""The parser and the verbs that need no model start without torch: `heron --help`,
consent, audit and feedback run in a fraction of the time a model verb takes to import."""
from __future__ import annotations

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


def _subparsers(parser):
    """Every parser under `parser`, depth first."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for sub in action.choices.values():
            yield sub
            yield from _subparsers(sub)
