"""QuantizeCheckpointSettings: checked on construction, with the calibration
fields and checks it shares with PruneSettings (CalibrationSettings)."""
from __future__ import annotations

import pytest

from heron.compress.prune_checkpoint import PruneSettings
from heron.compress.quantize import QuantizeSettings
from heron.compress.calibration import CalibrationSettings
from heron.compress.quantize_checkpoint import QuantizeCheckpointSettings


@pytest.mark.parametrize("kwargs, message", [
    ({"quantize": QuantizeSettings("int4", "gptq")}, r"calib_shards: method 'gptq' needs a shard folder, got None"),
    ({"quantize": QuantizeSettings("int3")}, r"scheme: unknown 'int3'; known: .*"),
    ({"quantize": QuantizeSettings(), "calib_batch_size": 0}, r"calib_batch_size: expected a positive integer, got 0"),
])
def test_a_bad_setting_fails_on_construction_naming_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        QuantizeCheckpointSettings(**kwargs)


@pytest.mark.parametrize("build", [
    lambda **calibration: QuantizeCheckpointSettings(QuantizeSettings(), **calibration),
    lambda **calibration: PruneSettings("magnitude", sparsity=0.5, **calibration),
])
@pytest.mark.parametrize("field", ["calib_batches", "calib_batch_size", "seq_len"])
def test_both_settings_check_the_shared_calibration_fields(build, field):
    assert isinstance(build(), CalibrationSettings)
    with pytest.raises(ValueError, match=f"^{field}: expected a positive integer, got -1$"):
        build(**{field: -1})
