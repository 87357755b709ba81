"""Model families: presets and builders that plug core parts together."""
from heron.models.presets import PRESETS, build_model, parameter_count, preset_config

__all__ = ["PRESETS", "build_model", "parameter_count", "preset_config"]
