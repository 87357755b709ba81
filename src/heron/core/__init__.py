"""Heron's model core: torch and the standard library only."""
from heron.core.config import ModelConfig, RopeScaling
from heron.core.hooks import HookPoint, attach_hooks, hook_points
from heron.core.kv_cache import KVCache
from heron.core.transformer import Transformer, TransformerOutput

__all__ = [
    "HookPoint",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "TransformerOutput",
    "attach_hooks",
    "hook_points",
]
