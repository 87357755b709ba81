"""Heron's model core: torch and the standard library only."""
from heron.core.config import AttentionPattern, ModelConfig, MoEConfig, RopeScaling
from heron.core.hooks import HookPoint, attach_hooks, hook_points
from heron.core.kv_cache import KVCache
from heron.core.modes import evaluating
from heron.core.moe import MoE
from heron.core.sparse import sparse_attention
from heron.core.transformer import Transformer, TransformerOutput

__all__ = [
    "AttentionPattern",
    "HookPoint",
    "KVCache",
    "ModelConfig",
    "MoE",
    "MoEConfig",
    "RopeScaling",
    "Transformer",
    "TransformerOutput",
    "attach_hooks",
    "evaluating",
    "hook_points",
    "sparse_attention",
]
