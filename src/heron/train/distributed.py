"""Multi-process training through torchrun and torch.distributed: DDP or FSDP2.

No home-made distribution: processes come from `torchrun` (which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), gradients are reduced by
DistributedDataParallel or by FSDP2's `fully_shard`. What lives here is the
glue the loop needs: set up and tear down the process group, wrap the model,
split a global batch, reduce a number, and gather full state dicts so that a
checkpoint written by any layout loads into a single process.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from heron.train.recipe import RecipeError

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank among world_size, its device, the layout."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    parallel: str  # none | ddp | fsdp
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(parallel: str, device: str = "auto") -> DistContext:
    """Join the process group torchrun prepared (gloo on CPU, nccl on CUDA)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device: 'cuda', but torch sees no CUDA device here (use cpu, or auto)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if parallel == "none":
        return DistContext(0, 1, 0, torch.device("cuda" if use_cuda else "cpu"), parallel)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        if "WORLD_SIZE" not in os.environ:
            raise RecipeError(f"train.parallel: {parallel!r} needs a launcher: torchrun --nproc_per_node N ...")
        if use_cuda:
            torch.cuda.set_device(target)
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=target if use_cuda else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, target, parallel, owns)


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP, or FSDP2 with one shard group per block and one for the rest.

    The model must hold identical weights on every rank beforehand (same seed
    or same checkpoint): fully_shard keeps each rank's slice of what it has.
    Per-block groups follow the FSDP2 examples (torchtitan's `apply_fsdp`): the
    root group holds the embedding and the head, so tied weights stay together.
    """
    if ctx.parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if ctx.parallel == "fsdp":
        for block in _repeated_blocks(model):
            fully_shard(block)
        fully_shard(model)
    return model


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Members of the root's ModuleLists (the Transformer's `blocks`); deeper
    lists (MoE experts) stay inside their block's group."""
    return [m for child in model.children() if isinstance(child, nn.ModuleList) for m in child]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module (FSDP2 shards in place, so only DDP wraps)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: nn.Module, enabled: bool) -> Any:
    """Context that skips the gradient all-reduce for accumulation micro-steps
    before the last one; the result is the same, only communication is saved."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        return _fsdp_sync(model, enabled)
    return nullcontext()


@contextmanager
def _fsdp_sync(model: FSDPModule, enabled: bool) -> Iterator[None]:
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def rank_slice(batch: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous share of a global batch (B, ...) -> (B / world, ...)."""
    share = batch.shape[0] // ctx.world_size
    return batch[ctx.rank * share : (ctx.rank + 1) * share]


def all_reduce_sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks (identity in one process)."""
    if ctx.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def from_main(value: Any, ctx: DistContext) -> Any:
    """Rank 0's `value` on every rank (a collective: every rank calls it and waits for rank 0)."""
    if ctx.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts gathered to full tensors on CPU, keyed by
    parameter name, whatever the layout. A collective: every rank must call it."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state dict into any layout (each rank
    keeps its shard). A collective under FSDP."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_ returns a replicated DTensor under FSDP; read it as a float."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


__all__ = [
    "DistContext", "all_reduce_sum", "barrier", "full_state_dicts", "grad_norm_value", "gradient_sync",
    "load_optimizer_state", "rank_slice", "setup", "teardown", "unwrap", "wrap_model",
]
