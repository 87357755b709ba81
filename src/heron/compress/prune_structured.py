"""Structured pruning: remove MLP channels, attention heads or MoE experts,
returning a NEW, smaller `Transformer` whose config states the new sizes (so
it saves, loads and runs as a plain Heron checkpoint, and really is faster).

    small = prune_mlp_channels(model, 0.25, calibration=ids)   # d_ff: 1536 -> 1152
    small = prune_heads(model, 0.25, calibration=ids)          # whole GQA groups
    small = prune_experts(model, keep=6, calibration=ids)      # least-routed experts go

Every layer loses the same number (a ModelConfig has one d_ff, one n_heads),
each layer choosing its own least important ones. The `remove_*` functions
take explicit per-layer index lists; the `prune_*` functions score and call them.

Importance scores, each the size of what removing the part takes away from
the layer's output on the calibration tokens:
- MLP channel j: ‖h_j‖₂ · ‖W_down[:, j]‖₂, h_j the hidden activation over the
  tokens. This is exactly the Frobenius norm of channel j's contribution
  h_j ⊗ W_down[:, j]: Wanda's |W|·‖X‖ (Sun et al. 2023) for a whole column;
  FLAP (An et al. 2024) scores channels the same way with a variance.
- Head group g (a key/value head with its query heads): ‖Z_g W_out,gᵀ‖_F,
  the norm of the group's contribution through the output projection.
- Expert: how many (token, slot) assignments the router gave it: the
  routing-frequency criterion (heavy-hitter counting, Muzio et al. 2024,
  SEER-MoE). Searching expert subsets by output error (Lu et al. 2024) is
  costlier and not done here.
Without calibration, weight-only proxies: ‖W_down[:, j]‖ · ‖W_up[j]‖ (and
the gate row's norm for SwiGLU); ‖W_v,g‖_F · ‖W_out,g‖_F.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import torch

from heron.compress.calibration import calibration_batches
from heron.core.config import ModelConfig
from heron.core.modes import evaluating
from heron.core.moe import MoE
from heron.core.transformer import Transformer
from heron.train.checkpoint import load_weights

Calibration = torch.Tensor | Iterable[torch.Tensor] | None


def keep_highest(scores: torch.Tensor, fraction: float, what: str = "fraction") -> torch.Tensor:
    """Sorted indices (n_keep,) of the parts to keep: all but the round(fraction * n)
    lowest scores. A fraction that rounds to none or to all of them removed is an error
    naming `what`: keeping one part instead would prune less than asked, unsaid
    (with one key/value head, nothing at all)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"{what}: expected a value in [0, 1), got {fraction!r}")
    n = scores.numel()
    if fraction > 0 and n == 1:
        raise ValueError(f"{what}: each layer has only one, which must stay; nothing can be removed "
                         f"(leave {what} unset)")
    if fraction > 0 and round(fraction * n) == 0:
        raise ValueError(f"{what}: {fraction:g} of {n} rounds to none removed; the smallest step here is {1 / n:.3g}")
    if round(fraction * n) >= n:
        raise ValueError(f"{what}: {fraction:g} of {n} rounds to all {n} removed; at least one must stay "
                         f"(give at most {(n - 1) / n:.3g})")
    n_keep = n - round(fraction * n)
    return scores.argsort(descending=True, stable=True)[:n_keep].sort().values


def _check_kept(keep: dict[int, torch.Tensor], n: int, parts: str) -> None:
    """Each layer's kept indices must be distinct parts in range, at least one: a repeated
    index would copy a part (its output counted twice), one out of range would fail deep
    inside the slicing, an empty list would leave a layer with none."""
    for layer, idx in keep.items():
        values = idx.tolist()
        if not values or len(set(values)) != len(values) or not all(0 <= j < n for j in values):
            raise ValueError(f"keep: layer {layer} keeps {parts} {values}; expected 1 to {n} distinct indices "
                             f"in 0..{n - 1}")


def _rebuild(model: Transformer, config: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """A new Transformer(config) on the model's device and dtype holding `state`."""
    reference = next(model.parameters())
    with torch.device("meta"):
        new = Transformer(config)
    new.to_empty(device=reference.device).to(reference.dtype)
    new.tie_weights()
    new.reset_buffers()
    load_weights(new, state, source="pruned state dict")
    return new.train(model.training)


def _run(model: Transformer, calibration: Calibration, fns: dict[str, Callable], batch_size: int) -> None:
    """Forward every calibration batch with read-only hooks attached, in eval mode."""
    with evaluating(model), torch.no_grad(), model.hooks(fns):
        for ids in calibration_batches(calibration, batch_size):
            model(ids)


def _dense_layers(model: Transformer) -> list[int]:
    return [i for i in range(model.config.n_layers) if model.config.feed_forward_kind(i) == "dense"]


# ----- MLP channels ----------------------------------------------------------------


def mlp_channel_scores(model: Transformer, calibration: Calibration = None,
                       batch_size: int = 8) -> dict[int, torch.Tensor]:
    """{dense layer: (d_ff,) importance of each hidden channel} (module note)."""
    layers = _dense_layers(model)
    sq = {i: torch.zeros(model.config.resolved_d_ff) for i in layers}
    if calibration is not None:
        def add(i: int) -> Callable:
            def fn(h: torch.Tensor, _name: str) -> None:  # h (..., d_ff); returns None: the activation is kept
                sq[i].add_(h.detach().float().square().flatten(0, -2).sum(0).cpu())
            return fn
        _run(model, calibration, {f"blocks.{i}.mlp.hook_post": add(i) for i in layers}, batch_size)
    scores = {}
    for i in layers:
        mlp = model.blocks[i].mlp
        down = mlp.down.weight.detach().float().cpu().norm(dim=0)  # (d_ff,)
        if calibration is not None:
            scores[i] = sq[i].sqrt() * down
        else:
            rows = mlp.up.weight.detach().float().cpu().norm(dim=1)  # (width,)
            scores[i] = down * (rows.reshape(2, -1).prod(0) if mlp.kind == "swiglu" else rows)
    return scores


def remove_mlp_channels(model: Transformer, keep: dict[int, torch.Tensor]) -> Transformer:
    """A copy keeping channels keep[i] (the same count in every dense layer) of each dense MLP.

    SwiGLU's fused `up` holds the gate half then the up half: channel j is
    rows j and d_ff + j, removed together. MoE layers are unchanged (their
    width is pinned in moe.d_ff, which may have followed d_ff before).
    """
    c, layers = model.config, _dense_layers(model)
    if sorted(keep) != layers or len({len(k) for k in keep.values()}) != 1:
        raise ValueError(f"keep: expected the same number of channels for each dense layer {layers}")
    _check_kept(keep, c.resolved_d_ff, "channels")
    ff, new_ff = c.resolved_d_ff, len(next(iter(keep.values())))
    state = dict(model.state_dict())
    for i, idx in keep.items():
        rows = torch.cat([idx, idx + ff]) if c.mlp == "swiglu" else idx
        _keep_units(state, f"blocks.{i}.mlp.", "up", "down", rows, idx)
    if new_ff == ff:
        return _rebuild(model, c, state)
    changes: dict[str, object] = {"d_ff": new_ff}
    if c.moe is not None and c.moe.d_ff is None:
        changes["moe"] = {**dataclasses.asdict(c.moe), "d_ff": c.resolved_expert_d_ff}
    return _rebuild(model, c.replace(**changes), state)


def prune_mlp_channels(model: Transformer, fraction: float, calibration: Calibration = None, *,
                       batch_size: int = 8) -> Transformer:
    """A copy without the round(fraction * d_ff) least important hidden channels of every dense MLP."""
    scores = mlp_channel_scores(model, calibration, batch_size)
    if not scores:
        raise ValueError("mlp_channels: the model has no dense MLP layers to prune (mlp_channels prunes dense "
                         "MLPs; for MoE layers prune experts)")
    return remove_mlp_channels(model, {i: keep_highest(s, fraction, "mlp_channels") for i, s in scores.items()})


# ----- attention heads ---------------------------------------------------------------


def head_group_scores(model: Transformer, calibration: Calibration = None, batch_size: int = 8) -> list[torch.Tensor]:
    """Per layer, (n_kv_heads,) importance of each key/value group with its query heads."""
    c = model.config
    n_kv, width = c.resolved_kv_heads, c.n_heads * c.resolved_head_dim
    outs = [b.attn.out.weight.detach().float().cpu().reshape(c.d_model, n_kv, width // n_kv) for b in model.blocks]
    if calibration is None:
        kv_width = n_kv * c.resolved_head_dim  # v's rows are the last kv_width of the fused qkv
        values = [b.attn.qkv.weight.detach().float().cpu()[-kv_width:] for b in model.blocks]
        return [v.reshape(n_kv, -1).norm(dim=1) * o.norm(dim=(0, 2)) for v, o in zip(values, outs)]
    sq = [torch.zeros(n_kv) for _ in model.blocks]

    def add(i: int) -> Callable:
        def fn(z: torch.Tensor, _name: str) -> None:
            z = z.detach().float().cpu().reshape(-1, n_kv, width // n_kv)  # (n, g, G*hd): a group's heads are adjacent
            sq[i].add_(torch.einsum("ngk,dgk->ngd", z, outs[i]).square().sum(dim=(0, 2)))
        return fn

    _run(model, calibration, {f"blocks.{i}.attn.hook_z": add(i) for i in range(c.n_layers)}, batch_size)
    return [s.sqrt() for s in sq]


def remove_head_groups(model: Transformer, keep: Sequence[torch.Tensor]) -> Transformer:
    """A copy keeping key/value groups keep[layer] (the same count per layer).

    Query head h reads key/value head h // (n_heads / n_kv_heads) (GQA's
    repeat_interleave), so group g is kv head g with query heads g*G .. g*G+G-1:
    their q, k and v rows of `qkv` and their columns of `out` go together.
    """
    c = model.config
    n_kv, hd = c.resolved_kv_heads, c.resolved_head_dim
    G = c.n_heads // n_kv
    if len(keep) != c.n_layers or len({len(k) for k in keep}) != 1:
        raise ValueError(f"keep: expected the same number of groups for each of the {c.n_layers} layers")
    _check_kept(dict(enumerate(keep)), n_kv, "key/value groups")
    n_keep = len(keep[0])
    state = dict(model.state_dict())
    for i, groups in enumerate(keep):
        q = (groups[:, None] * G * hd + torch.arange(G * hd)).flatten()  # query rows of the kept groups
        kv = (groups[:, None] * hd + torch.arange(hd)).flatten()
        rows = torch.cat([q, c.n_heads * hd + kv, (c.n_heads + n_kv) * hd + kv])
        _keep_units(state, f"blocks.{i}.attn.", "qkv", "out", rows, q)
    if n_keep == n_kv:
        return _rebuild(model, c, state)
    config = c.replace(n_heads=n_keep * G, n_kv_heads=None if c.n_kv_heads is None else n_keep, head_dim=hd)
    return _rebuild(model, config, state)


def prune_heads(model: Transformer, fraction: float, calibration: Calibration = None, *,
                batch_size: int = 8) -> Transformer:
    """A copy without the round(fraction * n_kv_heads) least important groups of every layer."""
    scores = head_group_scores(model, calibration, batch_size)
    return remove_head_groups(model, [keep_highest(s, fraction, "heads") for s in scores])


# ----- MoE experts -----------------------------------------------------------------------


def expert_counts(model: Transformer, calibration: Calibration, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """{MoE layer: (n_experts,) assignments routed to each expert} over the calibration tokens."""
    layers = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoE)]
    counts = {i: torch.zeros(model.config.moe.n_experts, dtype=torch.long) for i in layers}

    def add(i: int) -> Callable:
        def fn(load: torch.Tensor, _name: str) -> None:  # load (n_experts,); returns None: read-only
            counts[i].add_(load.cpu())
        return fn

    _run(model, calibration, {f"blocks.{i}.mlp.hook_expert_load": add(i) for i in layers}, batch_size)
    return counts


def remove_experts(model: Transformer, keep: dict[int, torch.Tensor]) -> Transformer:
    """A copy keeping experts keep[layer] (the same count in every MoE layer): their
    router rows and stacked up/down weights."""
    c = model.config
    layers = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoE)]
    if sorted(keep) != layers or len({len(k) for k in keep.values()}) != 1:
        raise ValueError(f"keep: expected the same number of experts for each MoE layer {layers}")
    _check_kept(keep, c.moe.n_experts, "experts")
    n_keep = len(next(iter(keep.values())))
    if n_keep < c.moe.top_k:
        raise ValueError(f"keep: {n_keep} experts cannot serve top_k={c.moe.top_k}")
    state = dict(model.state_dict())
    for i, idx in keep.items():
        for name in ("router.weight", "up", "down"):
            state[f"blocks.{i}.mlp.{name}"] = state[f"blocks.{i}.mlp.{name}"][idx]
    moe = {**dataclasses.asdict(c.moe), "n_experts": n_keep}  # the width (d_ff / top_k) is unchanged
    return _rebuild(model, c.replace(moe=moe) if n_keep != c.moe.n_experts else c, state)


def prune_experts(model: Transformer, keep: int, calibration: Calibration, *, batch_size: int = 8) -> Transformer:
    """A copy keeping the `keep` most-routed experts of every MoE layer (ties: lower index).
    Errors name `keep` as `experts`, the PruneSettings field it comes from."""
    if not any(isinstance(b.mlp, MoE) for b in model.blocks):
        raise ValueError(f"experts: the model has no MoE layers; keeping {keep} experts per layer applies to MoE "
                         "models only")
    moe = model.config.moe
    if not moe.top_k <= keep <= moe.n_experts:  # each token is routed to top_k distinct experts
        raise ValueError(f"experts: expected {moe.top_k}..{moe.n_experts} experts kept per layer (the model has "
                         f"{moe.n_experts}, routing each token to top_k={moe.top_k}), got {keep}")
    if calibration is None:
        raise ValueError("calibration: expert pruning counts routing on calibration token ids")
    counts = expert_counts(model, calibration, batch_size)
    chosen = {i: c.float().argsort(descending=True, stable=True)[:keep].sort().values for i, c in counts.items()}
    return remove_experts(model, chosen)


def _keep_units(state: dict[str, torch.Tensor], prefix: str, writer: str, reader: str,
                rows: torch.Tensor, cols: torch.Tensor) -> None:
    """Keep the `writer` linear's output rows (weight and bias) and the `reader` linear's
    matching input columns: the units between two linears that pruning keeps."""
    for name in (f"{writer}.weight", f"{writer}.bias"):
        if prefix + name in state:
            state[prefix + name] = state[prefix + name][rows]
    state[f"{prefix}{reader}.weight"] = state[f"{prefix}{reader}.weight"][:, cols]


__all__ = [
    "expert_counts", "head_group_scores", "keep_highest", "mlp_channel_scores", "prune_experts", "prune_heads",
    "prune_mlp_channels", "remove_experts", "remove_head_groups", "remove_mlp_channels",
]
