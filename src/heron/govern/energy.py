"""The energy meter: joules, joules per token and grams of CO2e for a stretch of work.

    meter = EnergyMeter().start()
    ...                                  # train, compress, evaluate
    report = meter.stop(tokens=n)        # EnergyReport
    lineage["energy"] = report.to_dict()

Where the figures come from, tried in this order:

1. RAPL counters (Intel's running average power limit; AMD Zen reports
   through the same driver) under Linux powercap: the sum of the package
   domains `<root>/intel-rapl:N` whose name is `package-N`. Subdomains are
   left out (core and uncore lie inside their package's counter), and so is
   `psys`, the whole platform, which would count the packages twice.
   Measured, but for the whole package: other processes on it count too.
   Since Linux 5.10 `energy_uj` is readable by root only (CVE-2020-8694, the
   PLATYPUS side channel); an unreadable counter falls back to the estimate.
2. Otherwise an estimate: the CPU time (user + system) of this process and
   of its waited-for children x a stated power per busy core
   (DEFAULT_WATTS_PER_CORE, $HERON_WATTS_PER_CORE, or the argument).
3. NVML on NVIDIA GPUs, added to either: the boards' energy counters
   (`nvmlDeviceGetTotalEnergyConsumption`, Volta and newer), when `pynvml`
   is importable and a GPU answers. Optional, never a dependency. NVML
   ignores CUDA_VISIBLE_DEVICES: it counts every GPU it sees.

Every report says which source it came from and whether it was measured (one
estimated part makes the whole figure an estimate); `unavailable` keeps why
the sources before it were not used.

Why not CodeCarbon: where RAPL is unreadable it estimates too (from the CPU
model's TDP, or a constant when the model is unknown), so it would not measure
more here; it starts a background scheduler thread and writes its own
emissions.csv; and its output does not say, figure by figure, what was
measured and what was assumed. Reading two sysfs files and one NVML call is
less code than adapting it.

Distributed runs: each process meters itself, and the train loop adds up
every process's estimate and the node-wide counters (RAPL, NVML) read by one
process per node (`read(node_counters=...)`).
"""
from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POWERCAP_ROOT = Path("/sys/class/powercap")
# One busy core with its share of the uncore, at full load: a 65 W 6-core
# desktop part is 10.8 W a core at its TDP, a 205 W 28-core server part 7.3 W.
DEFAULT_WATTS_PER_CORE = 10.0
# The world-average carbon intensity of electricity generation, 475 gCO2/kWh
# in 2018 (IEA, Global Energy & CO2 Status Report 2019). Set your grid's.
DEFAULT_GRID_G_PER_KWH = 475.0
WATTS_ENV, GRID_ENV = "HERON_WATTS_PER_CORE", "HERON_GRID_G_PER_KWH"
JOULES_PER_KWH = 3.6e6


def _check_tokens(tokens: int | None) -> None:
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"tokens: must be a positive integer or None, got {tokens!r}")


@dataclass(frozen=True)
class EnergyReport:
    """Energy used by one stretch of work, with where the figure comes from."""

    joules: float
    seconds: float  # wall-clock time metered
    source: str  # e.g. "rapl:/sys/class/powercap/intel-rapl:0 (package-0)", "estimate: CPU time x 10 W/core"
    measured: bool  # False when any part is an estimate
    tokens: int | None = None  # tokens the work processed, for joules_per_token
    grid_g_per_kwh: float = DEFAULT_GRID_G_PER_KWH
    unavailable: tuple[str, ...] = ()  # why the sources tried before `source` were not used

    def __post_init__(self) -> None:
        for name in ("joules", "seconds", "grid_g_per_kwh"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        _check_tokens(self.tokens)

    @property
    def joules_per_token(self) -> float | None:
        return None if self.tokens is None else self.joules / self.tokens

    @property
    def co2e_grams(self) -> float:
        return self.joules / JOULES_PER_KWH * self.grid_g_per_kwh

    def __add__(self, later: EnergyReport) -> EnergyReport:
        """This stretch, then `later` (a resumed run): joules, seconds and tokens
        add up; CO2e is priced at the later stretch's grid intensity."""
        source = self.source if self.source == later.source else f"{self.source}; then {later.source}"
        tokens = None if self.tokens is None or later.tokens is None else self.tokens + later.tokens
        return EnergyReport(self.joules + later.joules, self.seconds + later.seconds, source,
                            self.measured and later.measured, tokens, later.grid_g_per_kwh,
                            tuple(dict.fromkeys(self.unavailable + later.unavailable)))

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values, derived figures included (for lineage.json)."""
        return {"joules": self.joules, "seconds": self.seconds, "source": self.source, "measured": self.measured,
                "tokens": self.tokens, "joules_per_token": self.joules_per_token,
                "grid_g_per_kwh": self.grid_g_per_kwh, "co2e_grams": self.co2e_grams,
                "unavailable": list(self.unavailable)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EnergyReport:
        """Inverse of to_dict (the derived figures are recomputed, not read)."""
        return cls(raw["joules"], raw["seconds"], raw["source"], raw["measured"], raw.get("tokens"),
                   raw.get("grid_g_per_kwh", DEFAULT_GRID_G_PER_KWH), tuple(raw.get("unavailable", ())))

    def summary(self) -> str:
        """One line for people: per token first when tokens are known."""
        per_token = "" if self.tokens is None else f"{self.joules_per_token:.3g} J/token over {self.tokens:,} tokens, "
        return (f"energy: {per_token}{self.joules:.3g} J in {self.seconds:.1f} s, {self.co2e_grams:.3g} g CO2e "
                f"at {self.grid_g_per_kwh:g} g/kWh ({provenance(self.source, self.measured)})")


def provenance(source: str, measured: bool) -> str:
    """Where an energy figure came from, in words: an estimate names itself, a counter says measured."""
    if source.startswith("estimate"):
        return source
    return f"{'measured' if measured else 'partly estimated'}: {source}"


# ----- counters -----------------------------------------------------------------


class _Unavailable(Exception):
    """A source this machine does not offer; the message says why."""


@dataclass(frozen=True)
class _Counter:
    """A cumulative counter: joules between two reads = (b - a) * scale."""

    name: str
    measured: bool
    read: Callable[[], float]
    scale: float  # joules per unit read


class _RaplPackage:
    """One package's energy_uj, unwrapped. The counter restarts from 0 past
    max_energy_range_uj (usually 2^38 uJ: every ~45 min at 100 W), so a drop
    between two reads is one wrap; read at least once per wrap period."""

    def __init__(self, folder: Path) -> None:
        self.file = folder / "energy_uj"
        self.range_uj = int((folder / "max_energy_range_uj").read_text())
        self.last = int(self.file.read_text())
        self.total_uj = 0

    def read_uj(self) -> int:
        now = int(self.file.read_text())
        self.total_uj += now - self.last if now >= self.last else now + self.range_uj - self.last
        self.last = now
        return self.total_uj


def _rapl_counter(root: Path) -> _Counter:
    domains = [p for p in root.glob("intel-rapl:*") if re.fullmatch(r"intel-rapl:\d+", p.name)]
    try:
        named = {p: (p / "name").read_text().strip() for p in domains}
        folders = sorted((p for p, name in named.items() if name.startswith("package")),
                         key=lambda p: int(p.name.split(":")[1]))
        if not folders:
            raise _Unavailable(f"rapl: no package domains (intel-rapl:N) under {root}")
        packages = [_RaplPackage(p) for p in folders]
    except (OSError, ValueError) as err:
        raise _Unavailable(f"rapl: {err}") from err
    name = " + ".join(f"rapl:{p} ({named[p]})" for p in folders)
    return _Counter(name, True, lambda: sum(p.read_uj() for p in packages), 1e-6)


def _nvml_counter() -> _Counter:
    try:
        import pynvml
    except ImportError as err:
        raise _Unavailable("nvml: pynvml is not installed") from err
    try:
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        for handle in handles:  # NotSupported before Volta
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except pynvml.NVMLError as err:
        raise _Unavailable(f"nvml: {err}") from err
    if not handles:
        raise _Unavailable("nvml: no NVIDIA GPU")
    name = "nvml:GPU " + ",".join(str(i) for i in range(len(handles)))
    return _Counter(name, True, lambda: sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in handles), 1e-3)


def process_cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) and its waited-for children.

    The process's own time comes from `time.process_time` (the kernel's per-thread
    accounting, to the nanosecond): `os.times` counts in clock ticks (10 ms here), which
    made a short decode cost no CPU time and so no joules. Children are counted in ticks,
    the only way the kernel reports them."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def _setting(name: str, value: float | None, env: str, default: float, *, zero_ok: bool) -> float:
    """The argument, else the environment variable, else the default; checked."""
    if value is None and env in os.environ:
        name, raw = env, os.environ[env]
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{env}: not a number: {raw!r}") from None
    value = default if value is None else value
    if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
        raise ValueError(f"{name}: must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value!r}")
    return float(value)


# ----- the meter ----------------------------------------------------------------


class EnergyMeter:
    """Meters the energy of what runs between start() and stop().

    `clock` (wall seconds) and `cpu_time` (CPU seconds) can be injected so
    that tests are exact.
    """

    def __init__(self, *, powercap_root: str | Path = POWERCAP_ROOT, watts_per_core: float | None = None,
                 grid_g_per_kwh: float | None = None, nvml: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 cpu_time: Callable[[], float] = process_cpu_seconds) -> None:
        self.watts_per_core = _setting("watts_per_core", watts_per_core, WATTS_ENV, DEFAULT_WATTS_PER_CORE,
                                       zero_ok=False)
        self.grid_g_per_kwh = _setting("grid_g_per_kwh", grid_g_per_kwh, GRID_ENV, DEFAULT_GRID_G_PER_KWH,
                                       zero_ok=True)
        self._clock = clock
        self._counters: list[_Counter] = []
        unavailable: list[str] = []
        try:
            self._counters.append(_rapl_counter(Path(powercap_root)))
        except _Unavailable as why:
            unavailable.append(str(why))
            self._counters.append(_Counter(f"estimate: CPU time x {self.watts_per_core:g} W/core", False,
                                           cpu_time, self.watts_per_core))
        if nvml:
            try:
                self._counters.append(_nvml_counter())
            except _Unavailable as why:
                unavailable.append(str(why))
        self.unavailable = tuple(unavailable)
        self._start: tuple[float, list[float]] | None = None
        self._end: tuple[float, list[float]] | None = None

    @property
    def source(self) -> str:
        return " + ".join(c.name for c in self._counters)

    @property
    def measured(self) -> bool:
        return all(c.measured for c in self._counters)

    def start(self) -> EnergyMeter:
        self._start, self._end = self._sample(), None
        return self

    def sample(self) -> None:
        """Read the counters and drop the figures: long runs call this at least
        once per RAPL wrap period (the train loop does every step)."""
        self._started()
        self._sample()

    def read(self, tokens: int | None = None, *, node_counters: bool = True) -> EnergyReport:
        """Energy from start() to now, or to stop() once stopped; the meter runs on. Without
        `node_counters`, the measured counters, which count the whole node (RAPL's packages,
        NVML's GPUs), are left out: of several processes on a node, one reads them for all."""
        start = self._started()
        _check_tokens(tokens)
        end = self._end or self._sample()
        joules = sum((b - a) * c.scale for c, a, b in zip(self._counters, start[1], end[1])
                     if node_counters or not c.measured)
        return EnergyReport(joules, end[0] - start[0], self.source, self.measured, tokens, self.grid_g_per_kwh,
                            self.unavailable)

    def stop(self, tokens: int | None = None) -> EnergyReport:
        """Stop metering and report; later read()s give the same figures."""
        self._started()
        _check_tokens(tokens)
        if self._end is None:
            self._end = self._sample()
        return self.read(tokens)

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _sample(self) -> tuple[float, list[float]]:
        return self._clock(), [c.read() for c in self._counters]

    def _started(self) -> tuple[float, list[float]]:
        if self._start is None:
            raise RuntimeError("EnergyMeter: call start() (or enter the with block) first")
        return self._start


__all__ = ["DEFAULT_GRID_G_PER_KWH", "DEFAULT_WATTS_PER_CORE", "GRID_ENV", "WATTS_ENV", "EnergyMeter", "EnergyReport",
           "process_cpu_seconds", "provenance"]
