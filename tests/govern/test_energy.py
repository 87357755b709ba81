"""The energy meter against a fake powercap tree and injected clocks: every
figure is checked against hand-computed values, none against the wall clock."""
import json
import os
import sys
import time
import types
from pathlib import Path

import pytest

from heron.govern import DEFAULT_WATTS_PER_CORE, GRID_ENV, WATTS_ENV, EnergyMeter, EnergyReport, process_cpu_seconds
from heron.govern.energy import provenance


def write_domain(folder: Path, name: str, energy_uj: int, range_uj: int = 10**12) -> Path:
    folder.mkdir(parents=True)
    (folder / "name").write_text(f"{name}\n")
    (folder / "energy_uj").write_text(f"{energy_uj}\n")
    (folder / "max_energy_range_uj").write_text(f"{range_uj}\n")
    return folder


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """Two packages with core/dram subdomains, the subdomains' top-level entries
    (sysfs lists them there too) and a psys domain, as on a two-socket server."""
    root = tmp_path / "powercap"
    for n in (0, 1):
        package = write_domain(root / f"intel-rapl:{n}", f"package-{n}", 1_000_000)
        write_domain(package / f"intel-rapl:{n}:0", "core", 500_000)
        write_domain(package / f"intel-rapl:{n}:1", "dram", 500_000)
        write_domain(root / f"intel-rapl:{n}:0", "core", 500_000)
    write_domain(root / "intel-rapl:2", "psys", 5_000_000)
    return root


def set_uj(domain: Path, value: int) -> None:
    (domain / "energy_uj").write_text(f"{value}\n")


class Ticks:
    """An injected clock or CPU-time function returning the given values in turn."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def __call__(self) -> float:
        return self.values.pop(0)


def test_rapl_sums_the_packages_only(powercap: Path) -> None:
    meter = EnergyMeter(powercap_root=powercap, nvml=False, clock=Ticks(100.0, 102.5)).start()
    set_uj(powercap / "intel-rapl:0", 1_000_000 + 3_000_000)  # +3 J
    set_uj(powercap / "intel-rapl:1", 1_000_000 + 1_500_000)  # +1.5 J
    for busy in ("intel-rapl:0/intel-rapl:0:0", "intel-rapl:0:0", "intel-rapl:2"):  # must not count
        set_uj(powercap / busy, 9_000_000)
    report = meter.stop(tokens=9)
    assert report.joules == pytest.approx(4.5, abs=1e-12) and report.seconds == 2.5
    assert report.measured and report.unavailable == ()
    assert report.source == (f"rapl:{powercap / 'intel-rapl:0'} (package-0) + "
                             f"rapl:{powercap / 'intel-rapl:1'} (package-1)")
    assert report.joules_per_token == pytest.approx(0.5, abs=1e-12)


def test_rapl_counter_wraparound_even_several_times(tmp_path: Path) -> None:
    package = write_domain(tmp_path / "intel-rapl:0", "package-0", 900, range_uj=1000)
    meter = EnergyMeter(powercap_root=tmp_path, nvml=False).start()
    set_uj(package, 100)  # wrapped: 100 uJ to the top, 100 after
    assert meter.read().joules == pytest.approx(200e-6, abs=1e-15)
    set_uj(package, 50)  # wrapped again, seen by sampling: +950
    meter.sample()
    set_uj(package, 40)  # and again: +990
    assert meter.stop().joules == pytest.approx((200 + 950 + 990) * 1e-6, abs=1e-15)


def make_unreadable(path: Path) -> None:
    """energy_uj is root-only on Linux >= 5.10; root reads through chmod 000,
    so under root a directory in its place stands in for the refusal."""
    if os.geteuid() == 0:
        path.unlink()
        path.mkdir()
    else:
        path.chmod(0)


def test_unreadable_counter_falls_back_to_the_estimate_and_says_why(powercap: Path) -> None:
    make_unreadable(powercap / "intel-rapl:1" / "energy_uj")
    meter = EnergyMeter(powercap_root=powercap, watts_per_core=4.0, nvml=False, cpu_time=Ticks(1.0, 3.5))
    report = meter.start().stop()
    assert not report.measured and report.joules == 10.0
    assert report.source == "estimate: CPU time x 4 W/core"
    assert len(report.unavailable) == 1 and report.unavailable[0].startswith("rapl: ")
    assert "intel-rapl:1/energy_uj" in report.unavailable[0]


def test_no_powercap_at_all_is_an_estimate(tmp_path: Path) -> None:
    report = EnergyMeter(powercap_root=tmp_path / "none", nvml=False, cpu_time=Ticks(0.0, 2.0)).start().stop()
    assert not report.measured and report.joules == 2.0 * DEFAULT_WATTS_PER_CORE
    assert report.source == f"estimate: CPU time x {DEFAULT_WATTS_PER_CORE:g} W/core"
    assert report.unavailable == (f"rapl: no package domains (intel-rapl:N) under {tmp_path / 'none'}",)


def test_cpu_time_is_finer_than_a_clock_tick() -> None:
    """A millisecond of work shows, every time: counted in clock ticks (10 ms) most such
    spans read zero, and a short decode then cost no joules."""
    for _ in range(5):
        start, spin = process_cpu_seconds(), time.process_time()
        while time.process_time() - spin < 0.001:
            pass
        assert process_cpu_seconds() > start


def test_estimate_is_cpu_time_times_watts_per_core(tmp_path: Path) -> None:
    """Burn CPU for real; the meter's own CPU-time readings give the exact answer."""
    seen: list[float] = []

    def cpu_time() -> float:
        seen.append(process_cpu_seconds())
        return seen[-1]

    with EnergyMeter(powercap_root=tmp_path, watts_per_core=7.5, nvml=False, cpu_time=cpu_time) as meter:
        total = 0
        while process_cpu_seconds() - seen[0] < 0.05:
            total += sum(range(10_000))
    report = meter.read(tokens=1000)
    assert len(seen) == 2 and seen[1] > seen[0]
    assert report.joules == (seen[1] - seen[0]) * 7.5
    assert meter.read().joules == report.joules  # stopped: the figure no longer moves


def fake_pynvml(energy_mj: dict[int, list[int]], supported: bool = True) -> types.ModuleType:
    """A stand-in for pynvml: GPU i's energy counter (mJ) gives energy_mj[i] in turn."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def total_energy(handle: int) -> int:
        if not supported:
            raise NVMLError("Not Supported")
        return energy_mj[handle].pop(0)

    nvml.NVMLError = NVMLError
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(energy_mj)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetTotalEnergyConsumption = total_energy
    return nvml


def test_nvml_energy_is_added_to_the_cpu_figure(tmp_path: Path, monkeypatch) -> None:
    # Reads: one probe, then start and stop. GPU 0 uses 2 J, GPU 1 0.5 J; the CPU 2 s x 10 W.
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: [5, 1000, 3000], 1: [7, 200, 700]}))
    meter = EnergyMeter(powercap_root=tmp_path, watts_per_core=10.0, cpu_time=Ticks(1.0, 3.0))
    report = meter.start().stop()
    assert report.joules == pytest.approx(22.5, abs=1e-12)
    assert report.source == "estimate: CPU time x 10 W/core + nvml:GPU 0,1"
    assert not report.measured  # the CPU part is an estimate


def test_one_process_of_a_node_reads_its_node_wide_counters(tmp_path: Path, monkeypatch) -> None:
    """Of several processes on one node, each counts its own CPU time, and one the GPUs (and RAPL's
    packages) for all: the others read without the node-wide counters."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: [5, 1000, 3000]}))
    meter = EnergyMeter(powercap_root=tmp_path, watts_per_core=10.0, cpu_time=Ticks(1.0, 3.0)).start()
    meter.stop()
    assert meter.read(node_counters=True).joules == pytest.approx(22.0, abs=1e-12)
    assert meter.read(node_counters=False).joules == pytest.approx(20.0, abs=1e-12)


def test_gpus_without_an_energy_counter_are_skipped_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: []}, supported=False))
    meter = EnergyMeter(powercap_root=tmp_path, cpu_time=Ticks(0.0, 1.0))
    assert meter.source.startswith("estimate: ") and meter.unavailable[-1] == "nvml: Not Supported"


def test_per_token_and_co2e_arithmetic() -> None:
    # 7.2 MJ = 2 kWh; at 300 g/kWh that is 600 g; over 1.8 M tokens, 4 J a token.
    report = EnergyReport(7.2e6, 3600.0, "estimate: CPU time x 10 W/core", False, tokens=1_800_000,
                          grid_g_per_kwh=300.0)
    assert report.joules_per_token == 4.0
    assert report.co2e_grams == pytest.approx(600.0, rel=1e-12)
    assert report.summary() == ("energy: 4 J/token over 1,800,000 tokens, 7.2e+06 J in 3600.0 s, 600 g CO2e "
                                "at 300 g/kWh (estimate: CPU time x 10 W/core)")
    measured = EnergyReport(2.0, 1.0, "rapl:/x (package-0)", True)
    assert measured.summary() == "energy: 2 J in 1.0 s, 0.000264 g CO2e at 475 g/kWh (measured: rapl:/x (package-0))"
    assert EnergyReport(3.6e6, 1.0, "x", True).co2e_grams == pytest.approx(475.0, rel=1e-12)  # the default grid
    assert EnergyReport(1.0, 1.0, "x", True).joules_per_token is None


def test_settings_come_from_arguments_then_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(WATTS_ENV, "12.5")
    monkeypatch.setenv(GRID_ENV, "50")
    meter = EnergyMeter(powercap_root=tmp_path, nvml=False, cpu_time=Ticks(0.0, 1.0))
    report = meter.start().stop()
    assert report.source == "estimate: CPU time x 12.5 W/core" and report.grid_g_per_kwh == 50.0
    assert EnergyMeter(powercap_root=tmp_path, watts_per_core=3.0, nvml=False).watts_per_core == 3.0
    monkeypatch.setenv(WATTS_ENV, "lots")
    with pytest.raises(ValueError, match=WATTS_ENV):
        EnergyMeter(powercap_root=tmp_path, nvml=False)


@pytest.mark.parametrize("make, name", [
    (lambda p: EnergyMeter(powercap_root=p, watts_per_core=-1.0, nvml=False), "watts_per_core"),
    (lambda p: EnergyMeter(powercap_root=p, watts_per_core=0.0, nvml=False), "watts_per_core"),
    (lambda p: EnergyMeter(powercap_root=p, grid_g_per_kwh=-5.0, nvml=False), "grid_g_per_kwh"),
    (lambda p: EnergyMeter(powercap_root=p, nvml=False).start().stop(tokens=0), "tokens"),
    (lambda p: EnergyMeter(powercap_root=p, nvml=False).start().read(tokens=2.5), "tokens"),
    (lambda p: EnergyReport(-1.0, 1.0, "x", True), "joules"),
])
def test_bad_arguments_name_the_argument(tmp_path: Path, make, name) -> None:
    with pytest.raises(ValueError, match=name):
        make(tmp_path)


def test_reading_before_start_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="start"):
        EnergyMeter(powercap_root=tmp_path, nvml=False).read()


def test_to_dict_round_trips_through_json_and_segments_add_up() -> None:
    first = EnergyReport(10.0, 4.0, "estimate: CPU time x 10 W/core", False, tokens=100, unavailable=("rapl: no",))
    restored = EnergyReport.from_dict(json.loads(json.dumps(first.to_dict())))
    assert restored == first
    assert restored.to_dict()["joules_per_token"] == 0.1 and restored.to_dict()["co2e_grams"] == first.co2e_grams
    later = EnergyReport(5.0, 2.0, "rapl:/x (package-0)", True, tokens=50, grid_g_per_kwh=100.0)
    both = first + later
    assert (both.joules, both.seconds, both.tokens, both.grid_g_per_kwh) == (15.0, 6.0, 150, 100.0)
    assert not both.measured and both.source == "estimate: CPU time x 10 W/core; then rapl:/x (package-0)"
    assert (first + first).source == first.source


def test_provenance_says_measured_only_for_counters() -> None:
    assert provenance("estimate: CPU time x 10 W/core", False) == "estimate: CPU time x 10 W/core"
    assert provenance("rapl:/sys/class/powercap/intel-rapl:0 (package-0)", True).startswith("measured: rapl:")
    assert provenance("nvml:0; then estimate: CPU time x 10 W/core", False).startswith("partly estimated: nvml")
