"""Hook points: named identity modules that expose activations.

Every activation worth inspecting passes through a `HookPoint`, whose dotted
name in the model (`blocks.3.attn.hook_pattern`) is stable. Hook functions are
attached only inside the `attach_hooks` context manager and removed on exit,
so with nothing attached a forward pass is the plain computation, bit for bit.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

# fn(activation, hook_name) -> replacement activation, or None to keep it.
HookFn = Callable[[torch.Tensor, str], torch.Tensor | None]


class HookPoint(nn.Module):
    """Identity; a place to read or replace an activation.

    With no hook attached a call returns its input without entering
    nn.Module's call machinery: a decode step passes ~10 hook points a layer,
    and that machinery cost ~0.5 ms a token on the `small` preset. Hooks are
    attached to a point itself (`attach_hooks`); torch's global module hooks
    do not see hook points.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(x) if self._forward_hooks or self._forward_pre_hooks else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def active(self) -> bool:
        """Whether a hook is attached (lets callers skip work nobody reads)."""
        return bool(self._forward_hooks)


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """All hook points of a model by dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, HookPoint)}


@contextmanager
def attach_hooks(
    model: nn.Module, fns: Mapping[str, HookFn] | list[tuple[str, HookFn]]
) -> Iterator[None]:
    """Attach hook functions by name for the duration of a `with` block."""
    points = hook_points(model)
    items = list(fns.items()) if isinstance(fns, Mapping) else list(fns)
    for name, _ in items:
        if name not in points:
            raise KeyError(f"no hook point named {name!r}{unknown_hook_hint(name, list(points))}")
    handles = []
    try:
        for name, fn in items:
            handles.append(points[name].register_forward_hook(_adapt(fn, name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def unknown_hook_hint(name: str, available: Sequence[str]) -> str:
    """What to append to an error about a hook name that names no hook point:
    the closest names, a few valid ones, and where the full list is."""
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
    guess = f"; did you mean {', '.join(close)}?" if close else ""
    examples = ", ".join(available[:4]) + (", ..." if len(available) > 4 else "")
    return (f"{guess} (this model has {len(available)} hook points, such as {examples}; "
            "heron.core.hook_points(model) lists them all)")


def _adapt(fn: HookFn, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]:
    def forward_hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        replacement = fn(output, name)
        if replacement is not None:
            _check_replacement(name, output, replacement)
        return replacement

    return forward_hook


def _check_replacement(name: str, activation: torch.Tensor, replacement: object) -> None:
    """A replacement must have the activation's shape: a scalar or a slice would
    broadcast through the layers below and change the logits without an error."""
    if isinstance(replacement, torch.Tensor) and replacement.shape == activation.shape:
        return
    if isinstance(replacement, torch.Tensor):
        got = f"a tensor of shape {tuple(replacement.shape)}"
    else:
        got = f"a value of type {type(replacement).__name__}"
    raise ValueError(f"hook function at {name!r} returned {got}; expected None (keep the activation) or a tensor "
                     f"of the activation's shape {tuple(activation.shape)}")
