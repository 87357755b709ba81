"""An alignment run records its energy in the checkpoint's lineage."""
import json

from heron.cli.main import main
from heron.govern import EnergyReport
from test_align_cli import recipe


def test_alignment_lineage_records_energy(base, tmp_path):
    assert main(["align", "sft", str(recipe(tmp_path, base, "sft", fit={"steps": 2, "batch_size": 8}))]) == 0
    energy = json.loads((tmp_path / "sft" / "model" / "lineage.json").read_text())["alignment"]["energy"]
    report = EnergyReport.from_dict(energy)
    assert report.source and isinstance(report.measured, bool)
    assert report.tokens is None and energy["joules_per_token"] is None
    assert energy["co2e_grams"] == report.co2e_grams
