"""Read the residual stream in vocabulary space.

The logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens")
applies the model's own final norm and unembedding to the residual stream at
every depth, so the last depth gives the model's logits exactly.

Direct logit attribution (Elhage et al. 2021, "A Mathematical Framework for
Transformer Circuits", sec. 2) splits the target logit into what each part of
the model writes to the final residual stream: the embedding, each attention
head, each layer's `out` bias and each MLP. The residual stream is a sum of
those writes, and the only non-linear step between it and the logit is the
final norm; freezing the norm's scale at the value the actual final residual
gives (the standard linearisation, as in TransformerLens) makes the readout
linear, so the parts add up to the logit:

    RMSNorm:   logit = sum_c  u . (g * c / rms(x))
    LayerNorm: logit = sum_c  u . (g * (c - mean(c)) / std(x))  +  u . b

with x the final residual, c each component, g (and b) the norm's gain (and
bias) and u the target token's unembedding row. Centring is linear, so with
LayerNorm the sum still holds; its bias is one more component, `norm.bias`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from heron.core.transformer import Transformer
from heron.interpret.cache import (
    ActivationCache, check_next_token_head, check_position, check_target, check_tokens, resid_names,
)


def _reads(names: Callable[[Transformer], list[str]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A hook point missing from the cache fails naming the function that wanted it and
    `names`, the helper that lists every hook point it reads."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def reading(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except KeyError as err:
                raise KeyError(f"{fn.__name__}: {err.args[0]}; run_with_cache(model, ids, {names.__name__}(model)) "
                               "records every hook point it reads") from None
        return reading
    return wrap


def _unembed(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """(..., V) logits of a residual stream (..., d): the model's own final norm and head."""
    return model.lm_head(model.norm(x))


@_reads(resid_names)
@torch.no_grad()
def logit_lens(model: Transformer, cache: ActivationCache) -> torch.Tensor:
    """(n_layers + 1, B, T, V): the logits each depth of the residual stream
    would give (depth i enters block i; the last is the model's output). The
    cache needs `resid_names(model)`. One depth at a time, through the same
    modules on the same shapes as the forward pass, so the last depth equals
    the model's logits bit for bit."""
    return torch.stack([_unembed(model, cache.resid(i)) for i in range(model.config.n_layers + 1)])


@dataclass
class TokenLens:
    """One token's logit and probability at every depth of the residual stream."""

    logits: torch.Tensor  # (n_layers + 1, B, T)
    probs: torch.Tensor  # (n_layers + 1, B, T)


@_reads(resid_names)
@torch.no_grad()
def token_lens(model: Transformer, cache: ActivationCache, target: int | torch.Tensor) -> TokenLens:
    """The logit lens for one token per position: `target` is a token id, or
    (B, T) ids (e.g. the next tokens of the input; (B, 1) for one per row).
    Depth by depth, so only one (B, T, V) block of logits is alive at a time. A scalar head has no
    tokens to give probabilities of: its score lens is logit_lens(...)[..., 0]."""
    check_next_token_head("token_lens", model, "logit_lens(model, cache)[..., 0] is its score at every depth")
    check_tokens("target", target, model.config.vocab_size)
    targets = _per_position(target, tuple(cache.resid(0).shape[:2]))  # (B, T)
    logits, probs = [], []
    for depth in range(model.config.n_layers + 1):
        full = _unembed(model, cache.resid(depth)).float()  # (B, T, V)
        index = targets.to(full.device).unsqueeze(-1)  # (B, T, 1)
        logits.append(full.gather(-1, index)[..., 0])
        probs.append(full.softmax(-1).gather(-1, index)[..., 0])
    return TokenLens(logits=torch.stack(logits), probs=torch.stack(probs))


def _per_position(target: int | torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(B, T) ids from one token id or ids shaped (B, T) (a size-1 axis broadcasts). A
    1-D tensor is refused: broadcasting reads it as one id per position, so one id
    per row (B,) failed on an unrelated expand, or, when B == T, was silently misread."""
    ids = torch.as_tensor(target)
    if ids.dim() == 0 or (ids.dim() == 2 and all(n in (1, size) for n, size in zip(ids.shape, shape))):
        return ids.expand(shape)
    B, T = shape
    raise ValueError(f"target: expected a token id or ({B}, {T}) ids, one per position, got shape "
                     f"{tuple(ids.shape)}; for one token per row pass target[:, None], shape ({B}, 1)")


# ----- direct logit attribution ----------------------------------------------------


def dla_names(model: Transformer) -> list[str]:
    """The hook points `direct_logit_attribution` reads: pass them to run_with_cache."""
    n = model.config.n_layers
    per_layer = [name for i in range(n) for name in (f"blocks.{i}.attn.hook_z", f"blocks.{i}.hook_mlp_out")]
    return ["hook_embed"] + per_layer + [resid_names(model)[-1]]


@dataclass
class LogitAttribution:
    """Each component's direct contribution to a target logit.

    Components, in order: `embed` (token and position embeddings),
    then per layer i `blocks.{i}.attn.heads.{h}` for each query head,
    `blocks.{i}.attn.out.bias` when the projection has a bias, and
    `blocks.{i}.mlp`; last `norm.bias` for a LayerNorm with a bias.
    `values.sum(-1)` equals `logit` up to float rounding.
    """

    labels: list[str]  # C component names
    values: torch.Tensor  # (B, C) fp32
    logit: torch.Tensor  # (B,) fp32: the target logit, through the model's own norm and head
    n_heads: int
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {label: i for i, label in enumerate(self.labels)}

    def __getitem__(self, label: str) -> torch.Tensor:
        """(B,) one component's contribution."""
        if label not in self._index:
            raise KeyError(f"no component {label!r}; components look like {self.labels[:3]}")
        return self.values[:, self._index[label]]

    def heads(self) -> torch.Tensor:
        """(B, n_layers, n_heads): the attention heads' contributions as a grid."""
        columns = [i for label, i in self._index.items() if ".attn.heads." in label]
        return self.values[:, columns].unflatten(1, (-1, self.n_heads))


@_reads(dla_names)
@torch.no_grad()
def direct_logit_attribution(
    model: Transformer, cache: ActivationCache, target: int | torch.Tensor, position: int = -1
) -> LogitAttribution:
    """Split the logit of `target` (an id, or (B,) ids) at `position`
    into the direct writes of each component (see the module docstring for
    the linearisation and what the sum equals). The cache needs
    `dla_names(model)`. Computed in fp32 whatever the model's dtype. For a
    scalar head (a reward model) target 0, its one output, splits the score."""
    c = model.config
    check_target("target", target, model)
    resid = cache.resid(c.n_layers)  # (B, T, d): the final residual stream
    check_position("position", position, resid.shape[1])
    x = resid[:, position]  # (B, d)
    final = x.float()  # (B, d)
    targets = torch.as_tensor(target, device=final.device).expand(final.shape[0])  # (B,)
    u = _weight(model.lm_head, "lm_head")[targets].float()  # (B, d): the target's unembedding rows
    labels, parts = ["embed"], [cache.resid(0)[:, position, None]]  # (B, 1, d)
    for i, block in enumerate(model.blocks):
        out = block.attn.out
        w = _weight(out, f"blocks.{i}.attn.out").unflatten(1, (c.n_heads, c.resolved_head_dim))  # (d, H, hd)
        z = cache.heads(i)[:, position]  # (B, H, hd)
        labels += [f"blocks.{i}.attn.heads.{h}" for h in range(c.n_heads)]
        parts.append(torch.einsum("bhe,dhe->bhd", z.float(), w.float()))  # (B, H, d): head h's write
        if out.bias is not None:
            labels.append(f"blocks.{i}.attn.out.bias")
            parts.append(out.bias.expand(final.shape[0], 1, -1))  # (B, 1, d)
        labels.append(f"blocks.{i}.mlp")
        parts.append(cache[f"blocks.{i}.hook_mlp_out"][:, position, None])  # (B, 1, d)
    components = torch.cat([p.float() for p in parts], dim=1)  # (B, C, d)
    values = _frozen_readout(model.norm, final, components, u)  # (B, C)
    bias = getattr(model.norm, "bias", None)
    if bias is not None:
        labels.append("norm.bias")
        values = torch.cat([values, (u @ bias.float())[:, None]], dim=1)
    logit = _unembed(model, x).float().gather(-1, targets[:, None])[:, 0]  # (B,)
    return LogitAttribution(labels=labels, values=values, logit=logit, n_heads=c.n_heads)


def _frozen_readout(norm: nn.Module, final: torch.Tensor, components: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B, C) u . norm(component), with the norm's scale frozen at the one the
    final residual `final` (B, d) gets: linear in each component (B, C, d)."""
    eps = norm.eps if norm.eps is not None else torch.finfo(final.dtype).eps
    if isinstance(norm, nn.RMSNorm):
        scale = torch.rsqrt(final.square().mean(-1) + eps)  # (B,)
    elif isinstance(norm, nn.LayerNorm):
        scale = torch.rsqrt(final.var(-1, unbiased=False) + eps)  # (B,)
        components = components - components.mean(-1, keepdim=True)  # centring is linear
    else:
        raise TypeError(f"direct logit attribution: no linearisation for a {type(norm).__name__} final norm")
    gain = norm.weight.float() if norm.weight is not None else 1.0
    return torch.einsum("bcd,bd->bc", components * gain, u) * scale[:, None]


def _weight(module: nn.Module, name: str) -> torch.Tensor:
    """A linear layer's (out, in) weight. A swapped-in layer (quantised,
    adapted) without one of that shape must be merged back first."""
    weight = getattr(module, "weight", None)
    shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape:
        raise TypeError(f"{name}: a {type(module).__name__} has no plain (out, in) weight to attribute through")
    return weight


__all__ = ["LogitAttribution", "TokenLens", "direct_logit_attribution", "dla_names", "logit_lens", "token_lens"]
