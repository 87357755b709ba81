"""Reward and value models: a policy's body under a scalar head."""
from __future__ import annotations

import torch

from heron.core.transformer import Transformer


def with_scalar_head(model: Transformer, seed: int | None = None) -> Transformer:
    """A new Transformer with `model`'s weights and a freshly initialised scalar head
    (`head="scalar"`: one number per position), the usual start of a reward or value model.
    `seed` fixes the head's initialisation (None: torch's global generator draws it)."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = Transformer(model.config.replace(head="scalar", tie_embeddings=False))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    missing = out.load_state_dict(body, strict=False).missing_keys
    if missing != ["lm_head.weight"]:
        raise ValueError(f"model: expected only the head to be new, missing {missing}")
    return out.to(next(model.parameters()).device)


__all__ = ["with_scalar_head"]
