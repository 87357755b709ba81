"""Training records its energy in lineage.json, and a resumed run adds the
segments before the resume (as the checkpoint's lineage recorded them) to its own."""
from __future__ import annotations

import json

import pytest

from heron.govern import EnergyReport
from heron.train import load_checkpoint, train
from heron.train.checkpoint import latest_checkpoint
from train_workers import Crash, crash_after


def test_lineage_records_the_energy_of_the_run(recipe_factory) -> None:
    result = train(recipe_factory(train={"steps": 2}))
    lineage = load_checkpoint(result.checkpoint).lineage
    energy = EnergyReport.from_dict(lineage["energy"])
    assert energy.source and isinstance(energy.measured, bool)
    assert energy.tokens == lineage["tokens_seen"] == 2 * 8 * 16
    assert lineage["energy"]["joules_per_token"] == energy.joules / energy.tokens


def test_a_resumed_run_adds_the_energy_before_the_resume(recipe_factory) -> None:
    recipe = recipe_factory(train={"steps": 4, "ckpt_every": 2})
    with pytest.raises(Crash):
        train(recipe, callbacks=[crash_after(3)])
    # Plant a known figure for the first segment in the checkpoint the run resumes from.
    lineage_file = latest_checkpoint(recipe.out_dir) / "lineage.json"
    lineage = json.loads(lineage_file.read_text())
    before = EnergyReport(1e6, 1000.0, "rapl:/planted (package-0)", True, tokens=lineage["tokens_seen"])
    lineage_file.write_text(json.dumps({**lineage, "energy": before.to_dict()}))
    result = train(recipe)
    energy = EnergyReport.from_dict(load_checkpoint(result.checkpoint).lineage["energy"])
    assert energy.joules >= before.joules and energy.seconds >= before.seconds
    assert energy.source.startswith("rapl:/planted (package-0); then ")
    assert energy.measured is ("estimate" not in energy.source)
    assert energy.tokens == 4 * 8 * 16  # the whole run's tokens, not the last segment's
