"""`heron compress prune`: a checkpoint in, a pruned checkpoint out.

Steps, in this order, each optional: remove MoE experts, attention head
groups, MLP channels (structured: the model gets smaller); then unstructured
or N:M pruning of the block linears and routed MoE experts (stored packed,
see sparse_store.py); then a short masked recovery fine-tune. A source's own
zeros (a model pruned before) stay zero through recovery and are stored packed
too. Calibration and recovery batches are random windows of a shard folder's
training split.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from heron.compress.calibration import CalibrationSettings, calibration_windows
from heron.compress.prune import check_target
from heron.compress.prune_model import METHODS, prune_model, recover, sparsity_of
from heron.compress.prune_structured import prune_experts, prune_heads, prune_mlp_channels
from heron.compress.qlinear import is_quantized
from heron.compress.records import made_from, record_pruned
from heron.compress.sparse_store import is_sparse_folder, save_sparse
from heron.core.transformer import Transformer
from heron.data import check_shards_fit, load_shards
from heron.data.batches import PackedBatches
from heron.govern import EnergyMeter
from heron.train.checkpoint import (check_finite_source, refuse_finished, require_new_folder, resolve_checkpoint,
                                   save_model_folder)
from heron.train.loop import DivergedError, check_finite_weights


DEFAULT_METHOD = "wanda"


@dataclass(frozen=True)
class PruneSettings(CalibrationSettings):
    """What to prune, calibrated (and recovered) on windows of `calib_shards`; checked on construction."""

    method: str = DEFAULT_METHOD  # unstructured / N:M scoring: magnitude, wanda or sparsegpt
    sparsity: float | None = None  # unstructured: fraction of block-linear and expert weights set to zero
    nm: tuple[int, int] | None = None  # N:M: keep n of every m consecutive inputs
    mlp_channels: float | None = None  # structured: fraction of MLP hidden channels removed
    heads: float | None = None  # structured: fraction of key/value head groups removed
    experts: int | None = None  # structured: experts kept per MoE layer
    recover_steps: int = 0
    recover_lr: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method: unknown {self.method!r}; known: {', '.join(METHODS)}")
        unstructured = self.sparsity is not None or self.nm is not None
        if unstructured:
            check_target(self.sparsity, self.nm)
            if self.nm is not None and self.nm[0] == self.nm[1]:  # as sparsity 0: nothing pruned, called pruned
                raise ValueError(f"nm: {self.nm[0]}:{self.nm[1]} keeps every weight; give n < m")
        elif all(v is None for v in (self.mlp_channels, self.heads, self.experts)):
            raise ValueError("sparsity: nothing to prune; give sparsity, nm, mlp_channels, heads or experts")
        for name in ("mlp_channels", "heads"):  # 0 would copy the model and call it pruned
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise ValueError(f"{name}: expected a fraction in (0, 1), got {value:g}")
        # The CLI always passes a method: only a non-default one shows it was asked for.
        if self.method != DEFAULT_METHOD and not unstructured:
            raise ValueError(f"method: {self.method!r} scores unstructured and N:M pruning; it applies only with "
                             "sparsity or nm")
        if self.recover_steps < 0:
            raise ValueError(f"recover_steps: expected a number of steps >= 0, got {self.recover_steps}")
        if not self.recover_lr > 0:
            raise ValueError(f"recover_lr: expected a positive learning rate, got {self.recover_lr:g}")
        needs = [f"method {self.method!r}" if unstructured and self.method != "magnitude" else "",
                 f"experts={self.experts}" if self.experts is not None else "",
                 f"recover_steps={self.recover_steps}" if self.recover_steps else ""]
        if self.calib_shards is None and any(needs):
            raise ValueError(f"calib_shards: a shard folder of calibration windows is needed for "
                             f"{' and '.join(filter(None, needs))}, got None")


def prune_checkpoint(source: str | Path, target: str | Path, settings: PruneSettings,
                     *, progress: bool = True) -> dict[str, Any]:
    """Prune the model at `source` (a Heron checkpoint or Hugging Face folder)
    and write it to `target`; returns the report recorded in its lineage."""
    import heron  # heron.load: plain, quantised-free Heron checkpoints and HF folders alike

    refuse_finished(target, made_from("pruned_from", source), record_pruned)
    require_new_folder(target, source)
    meter = EnergyMeter().start()
    model, tokenizer = heron.load(source)
    if is_quantized(model):
        raise ValueError(f"{source}: quantised; prune the full-precision model, then quantise the pruned one")
    check_finite_source(model, source, "source")
    _refuse_no_op(model, settings, source)
    before = sum(p.numel() for p in model.parameters())
    if settings.calib_shards is not None:
        check_shards_fit(load_shards(settings.calib_shards), str(source), vocab_size=model.config.vocab_size,
                         tokenizer=tokenizer)
    calibration, recovery = _batches(model, settings)
    if settings.experts is not None:
        model = prune_experts(model, settings.experts, calibration)
    if settings.heads is not None:
        model = prune_heads(model, settings.heads, calibration)
    if settings.mlp_channels is not None:
        model = prune_mlp_channels(model, settings.mlp_channels, calibration)
    unstructured = settings.sparsity is not None or settings.nm is not None
    if unstructured:
        prune_model(model, settings.method, sparsity=settings.sparsity, nm=settings.nm, calibration=calibration,
                    progress=progress)
    # Sparse: zeros pruned now or by an earlier pruning (not a dense source's stray exact zeros).
    sparse = unstructured or is_sparse_folder(resolve_checkpoint(source))
    report: dict[str, Any] = {"settings": asdict(settings), "parameters_before": before,
                              "parameters_after": sum(p.numel() for p in model.parameters())}
    if settings.recover_steps:  # masks None: every zero stays zero; {}: a dense model trains every weight
        losses = recover(model, recovery, settings.recover_steps, settings.recover_lr, progress=progress,
                         masks=None if sparse else {})
        report["recover_loss"] = {"first": losses[0], "last": losses[-1]}
    report["block_linear_sparsity"] = sparsity_of(model)  # the saved model's, after recovery; experts included
    report["energy"] = meter.stop().to_dict()
    lineage = {"pruned_from": str(resolve_checkpoint(source).resolve()), "pruning": report}  # as quantized_from
    if settings.recover_steps:
        _refuse_diverged(model, settings, target)
    if sparse:  # stored packed
        save_sparse(target, model, tokenizer, lineage)
    else:
        save_model_folder(target, model, tokenizer=tokenizer, lineage=lineage)
    record_pruned(Path(target))
    return report


def _refuse_no_op(model: Transformer, settings: PruneSettings, source: str | Path) -> None:
    """A ValueError where the source already has what is asked: a sparsity at or below its own
    (its zeros already meet it: nothing more is pruned) or as many experts as it keeps (it would be
    written out unchanged, its lineage claiming a pruning that did nothing)."""
    if settings.sparsity is not None and settings.sparsity <= (has := sparsity_of(model)):
        raise ValueError(f"sparsity: {source} is already {has:.1%} zeros; {settings.sparsity:g} would prune "
                         "nothing (give a higher one)")
    n_experts = model.config.moe.n_experts if model.config.moe is not None else None
    if settings.experts is not None and n_experts is not None and settings.experts >= n_experts:
        raise ValueError(f"experts: {source} already has {n_experts} experts per MoE layer; keeping "
                         f"{settings.experts} would remove none (give fewer)")


def _refuse_diverged(model: Transformer, settings: PruneSettings, target: str | Path) -> None:
    """A DivergedError, naming the target, before a model whose recovery's last update overflowed
    to NaN or infinite weights is written (recover stops on a non-finite loss or gradient, which
    that update's result shows only in the weights)."""
    try:
        check_finite_weights(settings.recover_steps, model.state_dict())
    except DivergedError as err:
        raise DivergedError(f"{target}: not written; {err}") from None


def _batches(model: Transformer, settings: PruneSettings) -> tuple[list[torch.Tensor] | None, list[torch.Tensor]]:
    """(calibration inputs (B, T), recovery windows (B, T + 1)) from the shards' training split."""
    if settings.calib_shards is None:
        return None, []
    seq_len = min(settings.seq_len, model.config.max_seq_len)
    calibration = calibration_windows(settings.calib_shards, settings.calib_batches, settings.calib_batch_size,
                                      seq_len, settings.seed)
    train = PackedBatches(load_shards(settings.calib_shards).train, settings.calib_batch_size, seq_len, seed=settings.seed + 1)
    recovery = [torch.cat([x, y[:, -1:]], dim=1) for x, y in map(train.batch, range(settings.recover_steps))]
    return calibration, recovery


__all__ = ["PruneSettings", "prune_checkpoint"]
