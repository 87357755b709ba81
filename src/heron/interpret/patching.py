"""Activation patching: run a prompt with some activations taken from another run.

Causal tracing (Meng et al. 2022, ROME, section 2.1) and activation patching
(Wang et al. 2022, IOI, section 3): run a clean prompt once and record its
activations; run a corrupted prompt of the same length with one piece of the
clean activations put back; a metric on the logits says how much of the
clean behaviour that piece restores (0 = the corrupted run, 1 = the clean run).

`patch` is the primitive. The sweeps, `patch_positions` (each layer and
position) and `patch_heads` (each layer and attention head), batch many
patched runs into one forward: row r of a batch is the corrupted prompt with
case r's slice of the clean run patched in, as a bool mask over the
activation. Rows are independent runs for dense models and dropless MoE; an
MoE with a capacity factor lets rows of one batch compete for expert slots.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from heron.core import Transformer, attach_hooks
from heron.core.hooks import HookFn
from heron.core.modes import evaluating
from heron.interpret.cache import check_position, check_tokens, run_with_cache
from heron.interpret.routing import moe_blocks

# Anything a tensor can be indexed with, or a bool mask (see `patch`).
Index = int | slice | torch.Tensor | tuple
# A source activation replacing a hook's whole activation, or only activation[index].
Patch = torch.Tensor | tuple[Index, torch.Tensor]
# logits (B, T, V) -> (B,): one value per run.
Metric = Callable[[torch.Tensor], torch.Tensor]

# Block hook points laid out (B, T, features): the ones a position can be patched in.
POSITION_HOOKS = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
    "attn.hook_z",
    "mlp.hook_post",
)
_ALL = -1  # a case's position or head that means every one


@torch.no_grad()
def patch(model: Transformer, ids: torch.Tensor, patches: Mapping[str, Patch]) -> torch.Tensor:
    """Logits (B, T, V) of `model` on `ids` (B, T) with named activations replaced.

    Each patch is a source activation that broadcasts to the hook's activation
    (a (1, T, d) activation of a clean run patches every row of a batch):
    `tensor` replaces the whole activation; `(index, tensor)` replaces only
    `activation[index]`, with `tensor[index]`. `index` is anything a tensor can
    be indexed with, or a bool mask with as many dimensions as the activation
    that broadcasts to it (True = patched; (B, T, 1) picks positions per row).
    An empty `patches` is the plain forward, bit for bit. Runs in eval mode and
    without gradients, as run_with_cache does: with gradients on, a quantised
    layer takes its differentiable reference path, and its logits would differ
    from run_with_cache's by rounding (~1e-7), not be equal.
    """
    fns = {name: _replacer(name, p) for name, p in patches.items()}
    with evaluating(model), attach_hooks(model, fns):
        return model(ids).logits


def _replacer(name: str, p: Patch) -> HookFn:
    index, source = p if isinstance(p, tuple) else (None, p)

    def replace(activation: torch.Tensor, _name: str) -> torch.Tensor:
        try:
            full = source.to(activation).expand_as(activation)
        except RuntimeError:
            raise ValueError(
                f"patches[{name!r}]: source of shape {tuple(source.shape)} does not broadcast "
                f"to the activation's {tuple(activation.shape)}"
            ) from None
        if index is None:
            return full.contiguous()  # a copy when broadcast over the batch; the caller's tensor otherwise
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            if index.dim() != activation.dim():
                raise ValueError(
                    f"patches[{name!r}]: a bool mask needs the activation's {activation.dim()} dimensions "
                    f"(size 1 broadcasts), got shape {tuple(index.shape)}"
                )
            return torch.where(index.to(activation.device), full, activation)  # selects: no arithmetic on either
        out = activation.clone()
        out[index] = full[index]
        return out

    return replace


def logit_diff(correct: int, incorrect: int, position: int = -1) -> Metric:
    """The metric logits[correct] - logits[incorrect] at `position` (the last by
    default), one value per run: IOI's logit difference (Wang et al. 2022, section 3)."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] == 1:  # not a vocabulary: a scalar head's one score per position
            raise ValueError("logit_diff: the model gives one score per position (head 'scalar', a reward or "
                             "value model), not next-token logits to take a difference of; use the score itself "
                             "as the metric, e.g. lambda out: out[:, -1, 0]")
        check_tokens("logit_diff: correct", correct, logits.shape[-1])
        check_tokens("logit_diff: incorrect", incorrect, logits.shape[-1])
        check_position("logit_diff: position", position, logits.shape[1])
        at = logits[:, position]  # (B, V)
        return at[:, correct] - at[:, incorrect]  # (B,)

    return metric


def normalised(values: torch.Tensor, clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """(values - corrupted) / (clean - corrupted): 0 where a patch leaves the
    corrupted run's metric, 1 where it restores the clean run's."""
    if clean == corrupted:
        raise ValueError(f"metric: equal on the clean and corrupted runs ({float(clean)}), nothing to normalise by")
    return (values - corrupted) / (clean - corrupted)


def patch_positions(
    model: Transformer,
    clean: torch.Tensor,  # (T,) or (1, T)
    corrupted: torch.Tensor,  # (T,) or (1, T)
    metric: Metric,
    *,
    hook: str = "hook_resid_pre",
    normalise: bool = True,
    chunk_size: int = 32,
) -> torch.Tensor:
    """(n_layers, T): the metric with `blocks.{layer}.{hook}` of the clean run
    patched into the corrupted run at one position. The default hook is
    ROME's causal trace of the residual stream; `hook` is one of POSITION_HOOKS.
    `chunk_size` patched runs share one forward."""
    _check_position_hook(model, hook)
    n_layers, T = model.config.n_layers, _check_pair(clean, corrupted)
    layer, position = _grid(n_layers, T)
    cases = (layer, position, torch.full_like(layer, _ALL))  # all features of the activation
    return _sweep(model, clean, corrupted, metric, hook, cases, normalise, chunk_size).view(n_layers, T)


def patch_heads(
    model: Transformer,
    clean: torch.Tensor,  # (T,) or (1, T)
    corrupted: torch.Tensor,  # (T,) or (1, T)
    metric: Metric,
    *,
    per_position: bool = False,
    normalise: bool = True,
    chunk_size: int = 32,
) -> torch.Tensor:
    """(n_layers, n_heads), or (n_layers, n_heads, T) per position: the metric
    with one head's output (its slice of `blocks.{layer}.attn.hook_z`, before
    the `out` projection) patched from the clean run at every position, or at
    one position. `chunk_size` patched runs share one forward."""
    c, T = model.config, _check_pair(clean, corrupted)
    if per_position:
        layer, head, position = _grid(c.n_layers, c.n_heads, T)
    else:
        layer, head = _grid(c.n_layers, c.n_heads)
        position = torch.full_like(layer, _ALL)
    values = _sweep(model, clean, corrupted, metric, "attn.hook_z", (layer, position, head), normalise, chunk_size)
    return values.view(c.n_layers, c.n_heads, *([T] if per_position else []))


def _sweep(
    model: Transformer,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric: Metric,
    hook: str,
    cases: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # layer, position, head: (N,) each, or _ALL
    normalise: bool,
    chunk_size: int,
) -> torch.Tensor:
    """(N,): the metric of each case's patched run, `chunk_size` runs per forward."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    device, head_dim = next(model.parameters()).device, model.config.resolved_head_dim
    clean, corrupted = clean.reshape(1, -1).to(device), corrupted.reshape(1, -1).to(device)  # (1, T)
    names = [f"blocks.{i}.{hook}" for i in range(model.config.n_layers)]
    with torch.no_grad(), evaluating(model):
        clean_run, sources = run_with_cache(model, clean, names)
        values = []
        for start in range(0, len(cases[0]), chunk_size):
            chunk = tuple(c[start : start + chunk_size].to(device) for c in cases)
            patches = _case_masks(chunk, names, sources, head_dim)
            logits = patch(model, corrupted.expand(len(chunk[0]), -1), patches)  # (n, T, V)
            values.append(_evaluate(metric, logits))
        values = torch.cat(values)  # (N,)
        if not normalise:
            return values
        corrupted_logits = model(corrupted).logits
    return normalised(values, _evaluate(metric, clean_run.logits)[0], _evaluate(metric, corrupted_logits)[0])


def _case_masks(
    cases: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # layer, position, head: (n,) each, or _ALL
    names: list[str],
    sources: Mapping[str, torch.Tensor],  # name -> (1, T, F)
    head_dim: int,
) -> dict[str, Patch]:
    """One bool mask per hooked layer: row r patches case r's slice, in its own layer only.
    A mask keeps size 1 along positions or features that no case picks from."""
    layer, position, head = cases
    _, T, F = sources[names[0]].shape
    rows = torch.ones(len(layer), 1, 1, dtype=torch.bool, device=layer.device)  # (n, T or 1, F or 1)
    if (position != _ALL).any():
        at = position[:, None] == torch.arange(T, device=position.device)  # (n, T)
        rows = rows & (at | (position[:, None] == _ALL))[:, :, None]
    if (head != _ALL).any():
        head_of_feature = torch.arange(F, device=head.device) // head_dim  # (F,): hook_z is (n_heads * hd)
        rows = rows & ((head[:, None] == head_of_feature) | (head[:, None] == _ALL))[:, None, :]
    return {names[i]: ((layer == i)[:, None, None] & rows, sources[names[i]]) for i in layer.unique().tolist()}


def _evaluate(metric: Metric, logits: torch.Tensor) -> torch.Tensor:
    values = metric(logits)
    if not isinstance(values, torch.Tensor) or values.shape != (logits.shape[0],):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"metric: expected one value per run, shape ({logits.shape[0]},), got {shape}")
    return values


def _check_pair(clean: torch.Tensor, corrupted: torch.Tensor) -> int:
    """T, the prompts' common length; each prompt (T,) or (1, T)."""
    for arg, ids in (("clean", clean), ("corrupted", corrupted)):
        if ids.dim() not in (1, 2) or (ids.dim() == 2 and ids.shape[0] != 1):
            raise ValueError(f"{arg}: expected one prompt, (T,) or (1, T), got {tuple(ids.shape)}")
        if ids.shape[-1] == 0:
            raise ValueError(f"{arg}: empty input")
    T, T_corrupted = clean.shape[-1], corrupted.shape[-1]
    if T != T_corrupted:
        raise ValueError(
            f"corrupted: {T_corrupted} tokens against clean's {T}; patching needs prompts of the same length"
        )
    return T


def _check_position_hook(model: Transformer, hook: str) -> None:
    if hook not in POSITION_HOOKS:
        raise ValueError(f"hook: expected one of {', '.join(POSITION_HOOKS)}, got {hook!r}")
    if hook != "mlp.hook_post":
        return
    moe = moe_blocks(model)
    if moe:
        raise ValueError(f"hook: the MoE layers (blocks {', '.join(map(str, moe))}) have no mlp.hook_post: their "
                         "experts' hidden activations are laid out by assignment, not by position; patch "
                         "hook_mlp_out, the layer's output, instead")
    bare = [i for i, block in enumerate(model.blocks) if block.mlp is None]
    if bare:
        raise ValueError(f"hook: the attention-only layers (blocks {', '.join(map(str, bare))}) have no MLP, so no "
                         "mlp.hook_post; patch hook_mlp_out (zeros there) or the attention's hooks instead")


def _grid(*sizes: int) -> tuple[torch.Tensor, ...]:
    """Every combination of indices into `sizes`, the last varying fastest: (prod(sizes),) each."""
    axes = torch.meshgrid(*(torch.arange(n) for n in sizes), indexing="ij")
    return tuple(axis.reshape(-1) for axis in axes)
