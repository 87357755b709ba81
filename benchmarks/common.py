"""Shared benchmark machinery: interleaved timing, the machine, the results files.

Heron and `transformers` run in one process, in alternating order (A B, then
B A, ...), so slow drift from other work on a shared machine falls on both
sides alike. A speedup is the median over rounds of the per-round ratio of
the two measurements, which pairs measurements taken seconds apart.

`finish` prints a benchmark's section, machine line included, and, for the
published run only (`WRITE_RULE`), `record` merges its keys into
`benchmarks/results.json` (other benchmarks' keys are kept) and rewrites only
its own section of `benchmarks/RESULTS.md`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from heron.core.gemm import cpu_family, gemm_backend, weight_gradient_backend

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results.json"
RESULTS_MD = HERE / "RESULTS.md"
THREADS = 2
P = TypeVar("P")  # a benchmark's plan


WRITE_RULE = (
    "Only the published run writes: with any option away from its default (--quick, --smoke, a subset of "
    "presets, a part left out or reused) the script prints its section and leaves results.json, RESULTS.md and "
    "the plots as they are, so that every published figure, and its section, comes from one whole run."
)


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring's first line, --no-write and, below the options, `WRITE_RULE`."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=WRITE_RULE)
    parser.add_argument("--no-write", action="store_true", help="print only; leave results files alone")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)` plus `departures`: the options other than --no-write given away from
    their defaults (the published run's), as on a command line; `finish` writes only without any."""
    args = parser.parse_args(argv)
    defaults = vars(parser.parse_args([]))
    args.departures = [_as_option(dest, value) for dest, value in vars(args).items()
                       if dest != "no_write" and not _same_setting(value, defaults[dest])]
    return args


def _same_setting(value: object, default: object) -> bool:
    if isinstance(value, list) and isinstance(default, list):
        return sorted(map(str, value)) == sorted(map(str, default))  # --presets base small is the default's set
    return value == default


def _as_option(dest: str, value: object) -> str:
    flag = "--" + dest.replace("_", "-")
    if value is True:
        return flag
    return f"{flag} {' '.join(map(str, value))}" if isinstance(value, list) else f"{flag} {value}"


def plan_args(doc: str, full: P, smoke: P) -> tuple[argparse.Namespace, P]:
    """(flags, plan) of a benchmark with a full and a smoke plan: --smoke picks the smoke plan
    (which checks the script and, like --no-write, writes nothing: `finish`)."""
    parser = bench_parser(doc)
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything, to check the script")
    args = parse_args(parser)
    return args, smoke if args.smoke else full


def finish(args: argparse.Namespace, section: str, title: str, results: list[Result],
           info: Mapping[str, object], notes: list[str], files: Callable[[], list[Path]] = list) -> None:
    """Print the section as RESULTS.md would hold it, machine line included. Then, for the published
    run only (`parse_args`: no departures, no --no-write), write `files` (plots, samples: it makes
    them and returns their paths), merge the keys into results.json and rewrite the section."""
    print(_section_md(title, results, info, notes, dt.date.today().isoformat()), flush=True)
    if args.no_write:
        print("Not written (--no-write): results.json, RESULTS.md and the plots are as they were.")
    elif args.departures:
        print(f"Not written: this is not the published run ({', '.join(args.departures)}), so results.json, "
              "RESULTS.md and the plots keep its figures; the default options rerun it.")
    else:
        for path in files():
            print(f"wrote {path}")
        record(section, title, results, info, notes)


def setup_torch(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


# ----- timing -----------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """A sample of per-round measurements."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the rounds landed."""
        return (max(self.values) - min(self.values)) / self.median

    def __str__(self) -> str:
        return f"{self.median:,.2f} (±{100 * self.spread / 2:.0f}%, n={len(self.values)})"


def interleave(runs: Mapping[str, Callable[[], float]], rounds: int, log: bool = True) -> dict[str, Stats]:
    """Call each run once per round, alternating the order round by round.

    Each run returns one measurement (e.g. tokens/s). Returns them per name.
    """
    names = list(runs)
    values: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            values[name].append(runs[name]())
        if log:
            row = ", ".join(f"{n} {values[n][-1]:,.2f}" for n in names)
            print(f"  round {r + 1}/{rounds}: {row}", flush=True)
    return {n: Stats(tuple(v)) for n, v in values.items()}


def ratio(a: Stats, b: Stats) -> Stats:
    """Per-round a / b (rounds paired in time)."""
    return Stats(tuple(x / y for x, y in zip(a.values, b.values)))


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----- the machine ------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


GEMM_NAMES = {"mkl": "MKL", "onednn": "oneDNN"}


def machine() -> dict[str, object]:
    import transformers

    return {
        "cpu": cpu_model(),
        "cpu_family": cpu_family(),  # AMD's 25 (Zen 3, 4) or 26 (Zen 5): GEMM libraries' speeds differ
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),  # AVX2 or AVX512: kernel speeds differ
        "gemm": gemm_backend(),  # the library of Heron's fp32 CPU GEMMs (heron/core/gemm.py)
        "weight_gradient_gemm": weight_gradient_backend(),  # and of their weight gradients
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def machine_line(info: Mapping[str, object]) -> str:
    kernels = f" (family {info['cpu_family']}, {info['cpu_kernels']}"
    if "gemm" in info:
        kernels += f", Heron's GEMMs through {GEMM_NAMES[info['gemm']]}"
        if info["weight_gradient_gemm"] != info["gemm"]:
            kernels += f", their weight gradients through {GEMM_NAMES[info['weight_gradient_gemm']]}"
    kernels += ")"
    return (f"{info['cpu']}{kernels}, {info['cores']} cores, {info['threads']} torch thread{'s' if info['threads'] != 1 else ''}, "
            f"torch {info['torch']}, transformers {info['transformers']}, load average {info['load_avg_1m']} at start")


# ----- process memory (Linux) -------------------------------------------------


def status_kib(field: str) -> int:
    """A field of /proc/self/status, in KiB: VmRSS is resident memory now, VmHWM its peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Make the peak RSS the current RSS (/proc/self/clear_refs); return it, in bytes.

    `peak_rss() - reset_peak_rss()` taken around some work is the most memory
    it held at once beyond what the process held before, temporaries included.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak RSS since the last reset, in bytes."""
    return status_kib("VmHWM") * 1024


# ----- one training step two ways ------------------------------------------------

MEMORY_CHILD = "--memory-child"  # argv flag: this process measures one way's step and prints its rise


def step_memory_child(make_step: Callable[[str], Callable[[], None]], way: str) -> None:
    """Child side: print as JSON the peak-RSS rise of one `make_step(way)` step, after one
    warm-up step (the optimizer's state, the allocator's arenas)."""
    step = make_step(way)
    step()
    before = reset_peak_rss()
    step()
    print(json.dumps({"rise": peak_rss() - before}))


@dataclass(frozen=True)
class StepPlan:
    rounds: int  # interleaved rounds of one step each way
    memory: bool  # measure each way's peak-RSS rise too


STEP_FULL, STEP_SMOKE = StepPlan(rounds=6, memory=True), StepPlan(rounds=1, memory=False)


def two_way_step_main(doc: str, script: str, make_step: Callable[[str], Callable[[], None]], key: str,
                      ways: Mapping[str, str], how: str, section: str, title: str, notes: list[str]) -> None:
    """The whole of a benchmark of one training step two ways (`two_way_step_results`),
    its memory children included; results go to `section` of the results files."""
    if MEMORY_CHILD in sys.argv:
        step_memory_child(make_step, sys.argv[sys.argv.index(MEMORY_CHILD) + 1])
        return
    args, plan = plan_args(doc, STEP_FULL, STEP_SMOKE)
    info = machine()
    finish(args, section, title, two_way_step_results(script, make_step, key, ways, how, plan.rounds, plan.memory),
           info, notes)


def two_way_step_results(script: str, make_step: Callable[[str], Callable[[], None]], key: str,
                         ways: Mapping[str, str], how: str, rounds: int, memory: bool) -> list[Result]:
    """One training step two ways, `ways` {name: what it does}, the new way first and
    the old second: `{key}_speedup_{new}_over_{old}` (steps/s, median of per-round
    ratios over `rounds` interleaved rounds of one step, after a warm-up step each)
    and, with `memory`, `{key}_peak_rss_{new}_over_{old}` and each way's
    `{key}_peak_rss_rise_mib_{way}`: one step's peak-RSS rise after a warm-up step,
    each in a fresh process running `script --memory-child WAY` (`step_memory_child`)."""
    (new, new_what), (old, old_what) = ways.items()
    steps = {way: make_step(way) for way in ways}
    for step in steps.values():
        step()
    stats = interleave({way: (lambda s=step: 1.0 / timed(s)) for way, step in steps.items()}, rounds)
    speedup = ratio(stats[new], stats[old])
    results = [Result(f"{key}_speedup_{new}_over_{old}", speedup.median, "x",
                      f"steps/s, {new_what} / {old_what}, median of per-round ratios over {rounds} interleaved "
                      f"rounds of one step (spread {speedup.spread:.0%}): {how}")]
    if not memory:
        return results
    del steps
    rises = {}
    for way in ways:
        out = subprocess.run([sys.executable, script, MEMORY_CHILD, way], check=True, capture_output=True,
                             text=True).stdout
        rises[way] = json.loads(out.strip().splitlines()[-1])["rise"]
        print(f"  one step's peak-RSS rise, {way}: {rises[way] / 2**20:.0f} MiB", flush=True)
    return results + [
        Result(f"{key}_peak_rss_{new}_over_{old}", rises[new] / rises[old], "x",
               f"one step's peak-RSS rise, {new_what} / {old_what}: {how}; fresh process each, after one warm-up step"),
        *(Result(f"{key}_peak_rss_rise_mib_{way}", rises[way] / 2**20, "MiB", f"{what}: {how}")
          for way, what in ways.items()),
    ]


# ----- memory bandwidth -------------------------------------------------------


def memory_bandwidth(mib: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Best-of-`repeats` bandwidths in bytes/s over a buffer far larger than L3.

    read: `sum` over an fp32 buffer, bytes read / time; this is the traffic of
    decoding, which streams weights and writes almost nothing.
    copy: `dst.copy_(src)`, (bytes read + bytes written) / time.
    """
    n = mib * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)  # touch every page before timing
    read = min(timed(lambda: src.sum()) for _ in range(repeats))
    copy = min(timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return {"read": src.nbytes / read, "copy": 2 * src.nbytes / copy}


# ----- results ----------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    key: str
    value: float
    unit: str
    detail: str
    target: float | None = None  # a value the issue asks for
    at_most: bool = False  # the target is an upper bound (memory ratios), not a lower one
    unmeasurable: str = ""  # why the value cannot show the target met, whatever it is (a ratio over a non-positive)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if self.unmeasurable:
            return False
        return self.value <= self.target if self.at_most else self.value >= self.target

    @property
    def explained(self) -> str:
        return self.detail + (f"; not met whatever the value: {self.unmeasurable}" if self.unmeasurable else "")


INTERLEAVING_NOTE = (
    "Heron and transformers run in one process, alternating order each round; speedups are medians of "
    "per-round ratios. The machine is shared, so absolute tokens/s are noisy; ratios less so."
)


def record(section: str, title: str, results: list[Result], info: Mapping[str, object], notes: list[str]) -> None:
    """Merge `results` into results.json and rewrite this section of RESULTS.md."""
    today = dt.date.today().isoformat()
    with open(Path(tempfile.gettempdir()) / "heron-bench-results.lock", "w") as lock:  # two may finish at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
        for r in results:
            data[r.key] = {"value": round(r.value, 4), "unit": r.unit, "detail": r.explained, "measured": today}
        _write_atomic(RESULTS_JSON, json.dumps(data, indent=2, sort_keys=True) + "\n")
        _write_atomic(RESULTS_MD, _merge_section(_read_md(), section, _section_md(title, results, info, notes, today)))
    print(f"wrote {len(results)} keys to {RESULTS_JSON} and section {section!r} of {RESULTS_MD}")


def _section_md(title: str, results: list[Result], info: Mapping[str, object], notes: list[str], today: str) -> str:
    lines = [f"## {title}", "", f"Measured {today} on {machine_line(info)}.", "",
             "| key | value | unit | target | met |", "|---|---:|---|---:|:-:|"]
    for r in results:
        target = "" if r.target is None else f"{'≤' if r.at_most else '≥'} {r.target:g}"
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| `{r.key}` | {r.value:,.3g} | {r.unit} | {target} | {met} |")
    lines += ["", *(f"- {n}" if n and not n.startswith("|") else n for n in notes)]
    targeted = [f"- `{r.key}`: {r.explained}" for r in results if r.target is not None]
    if targeted:  # the other keys' details are in results.json
        lines += ["", "How each key was measured:", "", *targeted]
    return "\n".join(lines) + "\n"


_HEADER = "# Benchmark results\n\nWritten by the scripts in this folder; each owns one section.\n"


def _read_md() -> str:
    return RESULTS_MD.read_text() if RESULTS_MD.exists() else _HEADER


def _merge_section(text: str, section: str, body: str) -> str:
    start, end = f"<!-- section:{section} -->", f"<!-- /section:{section} -->"
    block = f"{start}\n{body}{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        return before + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
