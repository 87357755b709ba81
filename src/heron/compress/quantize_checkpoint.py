"""`heron compress quantize`: a checkpoint in, a quantised checkpoint out.

Calibration inputs (GPTQ, AWQ) are random windows of a shard folder's
training split, the same windows training would draw (data/batches.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


from heron.compress.calibration import CalibrationSettings, calibration_windows
from heron.compress.checkpoint import save_quantized
from heron.compress.quantize import QuantizeSettings, quantize_model
from heron.compress.records import made_from, record_quantized
from heron.data.shards import check_shards_fit, load_shards
from heron.govern import EnergyMeter
from heron.train.checkpoint import (MODEL_FILE, check_finite_source, refuse_finished, require_new_folder,
                                   resolve_checkpoint)


@dataclass(frozen=True)
class QuantizeCheckpointSettings(CalibrationSettings):
    """`quantize_model`'s settings plus where calibration comes from; checked on construction."""

    quantize: QuantizeSettings

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantize.method in ("gptq", "awq") and self.calib_shards is None:
            raise ValueError(f"calib_shards: method {self.quantize.method!r} needs a shard folder, got None")
        self.quantize.check(calibrated=True)


def quantize_checkpoint(source: str | Path, target: str | Path, settings: QuantizeCheckpointSettings,
                        *, progress: bool = True) -> dict[str, Any]:
    """Quantise the model at `source` (a Heron checkpoint or Hugging Face
    folder) and write it to `target`; returns the summary recorded in its lineage."""
    import heron  # heron.load sits above every layer

    refuse_finished(target, made_from("quantized_from", source), record_quantized)
    require_new_folder(target, source)
    meter = EnergyMeter().start()
    model, tokenizer = heron.load(source)
    check_finite_source(model, source, "source")
    calibration = None
    if settings.quantize.method != "rtn":
        seq_len = min(settings.seq_len, model.config.max_seq_len)
        check_shards_fit(load_shards(settings.calib_shards), str(source), vocab_size=model.config.vocab_size,
                         tokenizer=tokenizer)
        calibration = calibration_windows(settings.calib_shards, settings.calib_batches, settings.calib_batch_size,
                                          seq_len, settings.seed)
    quantize_model(model, calibration=calibration, progress=progress, **asdict(settings.quantize))
    calibration_settings = {k: v for k, v in asdict(settings).items() if k != "quantize"}
    report = {"quantized_from": str(resolve_checkpoint(source).resolve()),  # the step folder, absolute
              "calibration": calibration_settings, "energy": meter.stop().to_dict()}
    folder = save_quantized(target, model, tokenizer, lineage=report)
    record_quantized(folder)
    size = (folder / MODEL_FILE).stat().st_size
    source_file = resolve_checkpoint(source) / MODEL_FILE  # absent for sharded Hugging Face folders
    ratio = size / source_file.stat().st_size if source_file.is_file() else None
    return {**report, **model.quantization, "model_bytes": size, "size_vs_source": ratio}


__all__ = ["QuantizeCheckpointSettings", "quantize_checkpoint"]
