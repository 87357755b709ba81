"""Alignment runs that a kill does not lose.

Every `every` steps an alignment loop hands its state to `Resumable.step_done`,
which writes it atomically to one file (<out_dir>/state.pt): the weights and optimiser state of
every part the loop trains (its "parts": modules, optimisers, a KL
controller), the random generators' states, the metrics rows so far and
what the run is (`identity`: the method, the recipe, the base's weights
hash). A rerun of the same run reads it back (`Resumable.restore`) and goes
on from the step it holds; every step is drawn from (seed, step), so the
resumed run continues exactly as the unbroken one would have, bit for bit
on CPU. A rerun of another run is refused, naming what changed.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from heron.store.atomic import write_file_atomic
from heron.train.checkpoint import CheckpointError
from heron.train.loop import check_finite_weights
from heron.train.rng import rng_states, set_rng_states

STATE_FORMAT = 1


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class Resumable:
    """One alignment run's saved state in `file`; `saved` is what the file held when the run
    began (None: no file, the run starts at step 0). `every` 0 saves nothing."""

    file: Path
    every: int
    identity: dict[str, Any]
    saved: dict[str, Any] | None = None
    extra: dict[str, Stateful] = field(default_factory=dict)  # the run's parts outside the loop (its energy so far)
    rows: list[dict[str, Any]] = field(default_factory=list)  # every step's metrics, earlier runs' included

    def __post_init__(self) -> None:
        if self.saved is not None:
            self.rows = list(self.saved["rows"])

    @property
    def step(self) -> int:
        """The steps done: where the loop starts."""
        return self.saved["step"] if self.saved is not None else 0

    def restore(self, parts: Mapping[str, Stateful]) -> int:
        """Load the saved state into `parts` (the names the loop saved them under); returns the step to start at."""
        if self.saved is None:
            return 0
        parts = {**parts, **self.extra}
        if set(parts) != set(self.saved["parts"]):
            raise CheckpointError(f"{self.file}: its parts ({', '.join(sorted(self.saved['parts']))}) "
                                  f"are not this run's ({', '.join(sorted(parts))})")
        for name, part in parts.items():
            part.load_state_dict(self.saved["parts"][name])
        set_rng_states(self.saved["rng"])
        return self.step

    def step_done(self, step: int, row: dict[str, Any], parts: Mapping[str, Stateful]) -> None:
        """Record step `step`'s metrics row; save the state when `every` divides the step."""
        self.rows.append(row)
        if self.every and step % self.every == 0:
            every_part = {**parts, **self.extra}
            saved = {name: part.state_dict() for name, part in every_part.items()}
            # An update can overflow with a finite loss and gradient (lr 1e39 is inf in fp32):
            # the last good state stays the one a rerun resumes from.
            check_finite_weights(step, {f"{name}.{key}": value for name, part in every_part.items()
                                        if isinstance(part, (nn.Module, ModuleBuffers))
                                        for key, value in saved[name].items()})
            state = {"format": STATE_FORMAT, "identity": self.identity, "step": step, "rows": self.rows,
                     "rng": rng_states(), "parts": saved}
            write_file_atomic(self.file, lambda f: torch.save(state, f))


class ModuleBuffers:
    """A module's persistent buffers as a part to save: `fit` saves the parameters it trains, not
    the buffers its forwards update (a MoE router's running centre)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: value.detach().clone() for name, value in self.module.state_dict(keep_vars=True).items()
                if not isinstance(value, nn.Parameter)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unexpected = self.module.load_state_dict(state, strict=False).unexpected_keys
        if unexpected or set(state) != set(self.state_dict()):
            raise CheckpointError(f"saved buffers {sorted(state)} are not this model's {sorted(self.state_dict())}")


def read_state(file: Path) -> dict[str, Any] | None:
    """What `Resumable.step_done` saved in `file`, or None when there is no such file."""
    if not file.is_file():
        return None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: say which
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{file}: unreadable ({first_line}); delete it to start the run over") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{file}: not an alignment run's state of format {STATE_FORMAT}; delete it to "
                              "start the run over")
    return state


def record_step(step: int, row: dict[str, Any], history: list[dict[str, Any]],
                on_step: Callable[[dict[str, Any]], None] | None, resume: Resumable | None,
                parts: Mapping[str, Stateful]) -> None:
    """An alignment loop's finished step `step`: its metrics row into the history, to the caller's
    callback, and to the resumable state (`Resumable.step_done`) when the run has one."""
    history.append(row)
    if on_step is not None:
        on_step(row)
    if resume is not None:
        resume.step_done(step, row, parts)


__all__ = ["ModuleBuffers", "Resumable", "Stateful", "read_state", "record_step"]
