"""Ablation: take away attention heads' or MLPs' output and measure what breaks.

A head is ablated in its slice of `blocks.{i}.attn.hook_z` (the heads'
outputs before the `out` projection, head h owning channels h*hd .. (h+1)*hd),
an MLP at `blocks.{i}.hook_mlp_out`. Zero ablation writes zeros; mean
ablation writes the activation's mean over every row and position of a
reference batch, which keeps what the component adds on average and removes
only what it reads from this input (Wang et al. 2022, IOI, section 3).

An ablation is a set of patches (interpret/patching.py's format: hook name ->
(bool mask, value)), so `patch(model, ids, ablation_patches(...))` runs it
once, and `ablated(...)` keeps it attached for a `with` block:

    with ablated(model, heads=[(1, 2)], how="mean", reference=ids):
        losses = repeat_losses(model, ids, period=16)
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from heron.core.head_loss import next_token_targets
from heron.core.hooks import HookFn, attach_hooks
from heron.core.modes import evaluating
from heron.core.transformer import Transformer
from heron.interpret.cache import run_with_cache
from heron.interpret.heads import Head

ABLATIONS = ("zero", "mean")


def ablation_patches(model: Transformer, heads: Sequence[Head] = (), mlps: Sequence[int] = (), *,
                     how: str = "zero", reference: torch.Tensor | None = None
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{hook name: (bool mask (1, 1, F), value (1, 1, F))}: the channels of each
    hook that `heads` and `mlps` own, and what replaces them ("zero", or "mean"
    over `reference` (B, T) token ids)."""
    c = model.config
    if how not in ABLATIONS:
        raise ValueError(f"how: {how!r} is not one of {', '.join(ABLATIONS)}")
    if (how == "mean") != (reference is not None):
        raise ValueError("reference: mean ablation needs reference token ids, zero ablation takes none")
    masks: dict[str, torch.Tensor] = {}
    for layer, head in heads:
        if not (0 <= layer < c.n_layers and 0 <= head < c.n_heads):
            raise ValueError(f"heads: ({layer}, {head}) is outside {c.n_layers} layers x {c.n_heads} heads")
        name = f"blocks.{layer}.attn.hook_z"
        mask = masks.setdefault(name, torch.zeros(c.n_heads * c.resolved_head_dim, dtype=torch.bool))
        mask[head * c.resolved_head_dim : (head + 1) * c.resolved_head_dim] = True
    for layer in mlps:
        if not 0 <= layer < c.n_layers:
            raise ValueError(f"mlps: layer {layer} is outside {c.n_layers} layers")
        masks[f"blocks.{layer}.hook_mlp_out"] = torch.ones(c.d_model, dtype=torch.bool)
    values = _means(model, reference, list(masks)) if reference is not None else {}
    device = model.embed.weight.device
    zeros = {name: torch.zeros(mask.shape, device=device) for name, mask in masks.items()}
    return {name: (mask.to(device).view(1, 1, -1), values.get(name, zeros[name]).view(1, 1, -1))
            for name, mask in masks.items()}


def _means(model: Transformer, reference: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """{name: (F,) mean of the activation over every row and position of `reference`}."""
    if not names:
        return {}
    _, cache = run_with_cache(model, reference.to(model.embed.weight.device), names)
    return {name: cache[name].float().mean(dim=(0, 1)).to(cache[name].dtype) for name in names}


@contextmanager
def ablated(model: Transformer, heads: Sequence[Head] = (), mlps: Sequence[int] = (), *,
            how: str = "zero", reference: torch.Tensor | None = None) -> Iterator[None]:
    """Every forward of `model` inside the `with` block runs with `heads` and
    `mlps` ablated (see `ablation_patches`); the hooks go when the block ends."""
    patches = ablation_patches(model, heads, mlps, how=how, reference=reference)
    with attach_hooks(model, {name: _replace(mask, value) for name, (mask, value) in patches.items()}):
        yield


def _replace(mask: torch.Tensor, value: torch.Tensor) -> HookFn:
    return lambda activation, _name: torch.where(mask, value.to(activation.dtype), activation)


# ----- losses on repeated tokens --------------------------------------------------------


def token_losses(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """(B, T - 1): the cross-entropy of predicting ids[:, t + 1] from ids[:, : t + 1], in eval mode."""
    with torch.no_grad(), evaluating(model):  # the model's head loss: no (B, T, V) logits
        return model(ids, targets=next_token_targets(ids), reduction="none").loss[:, :-1]


@dataclass(frozen=True)
class RepeatLosses:
    """Mean next-token loss on the two halves of random tokens repeated once (period L)."""

    unrepeated: float  # targets 1 .. L-1: tokens never seen before, not predictable in context
    repeated: float  # targets L+1 .. 2L-1: each follows a token whose earlier occurrence gives it away

    @property
    def gap(self) -> float:
        """How much the repetition helps: in-context copying."""
        return self.unrepeated - self.repeated


def repeat_losses(model: Transformer, ids: torch.Tensor, period: int) -> RepeatLosses:
    """The losses of `model` on `ids` (B, 2 * period), e.g. `repeated_tokens`.
    Target L, the first of the repeat, is in neither half: nothing says the
    sequence starts over there."""
    if ids.dim() != 2 or ids.shape[1] != 2 * period:
        raise ValueError(f"ids: expected (B, {2 * period}) for period {period}, got {tuple(ids.shape)}")
    losses = token_losses(model, ids)  # (B, 2L - 1); column t predicts target t + 1
    return RepeatLosses(unrepeated=float(losses[:, : period - 1].mean()), repeated=float(losses[:, period:].mean()))


def gap_removed(clean: RepeatLosses, ablated_run: RepeatLosses) -> float:
    """The share of the clean in-context gap an ablation takes away: 0 when the
    repeated half's loss is unchanged, 1 when it rises to the unrepeated half's."""
    if clean.gap <= 0:
        raise ValueError(f"clean: the repeated half is not easier than the first ({clean}); nothing to remove")
    return (ablated_run.repeated - clean.repeated) / clean.gap


__all__ = [
    "ABLATIONS", "RepeatLosses", "ablated", "ablation_patches", "gap_removed", "repeat_losses", "token_losses",
]
