"""Hook points: named identity modules that expose activations.

Every activation worth inspecting passes through a `HookPoint`, whose dotted
name in the model (`blocks.3.attn.hook_pattern`) is stable. Hook functions are
attached only inside the `attach_hooks` context manager and removed on exit,
so with nothing attached a forward pass is the plain computation, bit for bit.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
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
            close = difflib.get_close_matches(name, points, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"no hook point named {name!r}{hint}")
    handles = []
    try:
        for name, fn in items:
            handles.append(points[name].register_forward_hook(_adapt(fn, name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adapt(fn: HookFn, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]:
    def forward_hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return fn(output, name)

    return forward_hook
