"""Governance: what a run cost and where it came from (so far, the energy meter).

Imports the standard library only and nothing model-specific, so every layer
may record to it.
"""

from heron.govern.energy import (
    DEFAULT_GRID_G_PER_KWH, DEFAULT_WATTS_PER_CORE, GRID_ENV, WATTS_ENV, EnergyMeter, EnergyReport,
    process_cpu_seconds,
)

__all__ = ["DEFAULT_GRID_G_PER_KWH", "DEFAULT_WATTS_PER_CORE", "GRID_ENV", "WATTS_ENV", "EnergyMeter", "EnergyReport",
           "process_cpu_seconds"]
