"""Run a model once and keep the activations of chosen hook points.

`run_with_cache(model, ids, ["blocks.*.hook_resid_post"])` attaches a
recording function to each selected hook point (core/hooks.py), runs the
forward pass without gradients and returns its output with an
`ActivationCache` of detached tensors, as TransformerLens' `run_with_cache`
does. Names are exact hook names, globs (`blocks.*.attn.hook_z`) or compiled
regular expressions; a pattern that matches nothing is an error naming it.

Before running, the bytes every selected activation will take are estimated
from the config and the input shape (`activation_bytes`), so a request that
would not fit fails with the biggest entries named instead of running out of
memory halfway through.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from heron.core.config import ModelConfig
from heron.core.hooks import hook_points, unknown_hook_hint
from heron.core.modes import evaluating
from heron.core.transformer import Transformer, TransformerOutput, check_next_token_head

Selection = str | re.Pattern[str] | Sequence[str | re.Pattern[str]] | None


# ----- choosing hook points ------------------------------------------------------


def select_hooks(model: nn.Module, names: Selection = None) -> list[str]:
    """The hook names `names` selects, in the order of `hook_points(model)`.

    None selects every hook point. A string is an exact name, or a glob when it
    holds * ? or [ (fnmatch: `*` also crosses dots); a compiled `re.Pattern`
    must match a whole name. A pattern that selects nothing raises KeyError
    with the closest names, like `attach_hooks` does for a misspelt name.
    """
    available = list(hook_points(model))
    if names is None:
        return available
    patterns = [names] if isinstance(names, (str, re.Pattern)) else list(names)
    chosen: set[str] = set()
    for pattern in patterns:
        matched = [n for n in available if _matches(pattern, n)]
        if not matched:
            raise KeyError(_no_match_message(pattern, available))
        chosen.update(matched)
    return [n for n in available if n in chosen]


def _matches(pattern: str | re.Pattern[str], name: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    return fnmatch.fnmatchcase(name, pattern) if any(c in pattern for c in "*?[") else name == pattern


def _no_match_message(pattern: str | re.Pattern[str], available: list[str]) -> str:
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    return f"no hook point matches {text!r}{unknown_hook_hint(text, available)}"


def resid_names(model: Transformer) -> list[str]:
    """The residual stream at every depth: each block's resid_pre, then the
    last block's resid_post (n_layers + 1 names), what the logit lens reads."""
    n = model.config.n_layers
    return [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]


# ----- sizes before running ------------------------------------------------------


@dataclass(frozen=True)
class _Dims:
    """Sizes an activation's shape is made of, for one (B, T) input."""

    B: int
    T: int
    d: int
    H: int  # query heads
    KV: int  # key/value heads
    hd: int
    ff: int  # dense MLP width
    E: int  # experts (MoE layers)
    A: int  # MoE assignments, B * T * top_k: nothing is dropped in eval mode (core/moe.py)
    expert_ff: int


# Shape of each hook point kind: its name below `blocks.{i}.` (or the top-level name).
# Mirrors the shape comments beside each HookPoint in core/; tests check every entry
# against a real forward pass.
_SHAPES: dict[str, Callable[[_Dims], tuple[int, ...]]] = {
    "hook_embed": lambda s: (s.B, s.T, s.d),
    "hook_resid_pre": lambda s: (s.B, s.T, s.d),
    "hook_attn_out": lambda s: (s.B, s.T, s.d),
    "hook_resid_mid": lambda s: (s.B, s.T, s.d),
    "hook_mlp_out": lambda s: (s.B, s.T, s.d),
    "hook_resid_post": lambda s: (s.B, s.T, s.d),
    "attn.hook_q": lambda s: (s.B, s.H, s.T, s.hd),
    "attn.hook_k": lambda s: (s.B, s.KV, s.T, s.hd),
    "attn.hook_v": lambda s: (s.B, s.KV, s.T, s.hd),
    "attn.hook_pattern": lambda s: (s.B, s.H, s.T, s.T),
    "attn.hook_z": lambda s: (s.B, s.T, s.H * s.hd),
    "mlp.hook_post": lambda s: (s.B, s.T, s.ff),
    "mlp.shared.hook_post": lambda s: (s.B, s.T, s.expert_ff),
    "mlp.hook_router_logits": lambda s: (s.B, s.T, s.E),
    "mlp.hook_router_probs": lambda s: (s.B, s.T, s.E),
    "mlp.hook_router_entropy": lambda s: (s.B, s.T),
    "mlp.hook_expert_load": lambda s: (s.E,),
    "mlp.hook_expert_dropped": lambda s: (s.E,),
    "mlp.hook_expert_in": lambda s: (s.A, s.d),
    "mlp.hook_expert_post": lambda s: (s.A, s.expert_ff),
}
# Kinds whose dtype is not the model's: the router works in fp32, counts are long.
_DTYPES: dict[str, torch.dtype] = {
    "mlp.hook_router_logits": torch.float32,
    "mlp.hook_router_probs": torch.float32,
    "mlp.hook_router_entropy": torch.float32,
    "mlp.hook_expert_load": torch.int64,
    "mlp.hook_expert_dropped": torch.int64,
}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def activation_bytes(model: Transformer, batch_size: int, seq_len: int, names: Selection = None) -> dict[str, int]:
    """Bytes each selected activation takes for a (batch_size, seq_len) input with
    no KV cache, from the config alone (nothing runs). A hook point of a kind
    the table does not know is counted as one residual-width activation."""
    c, dtype = model.config, model.embed.weight.dtype
    dims = _dims(c, batch_size, seq_len)
    sizes = {}
    for name in select_hooks(model, names):
        block = _BLOCK.fullmatch(name)
        kind = block.group(2) if block else name
        shape = _SHAPES.get(kind, _SHAPES["hook_resid_post"])(dims)
        element = torch.empty((), dtype=_DTYPES.get(kind, dtype)).element_size()
        sizes[name] = element * _numel(shape)
    return sizes


def _dims(c: ModelConfig, batch: int, seq_len: int) -> _Dims:
    moe = c.moe
    return _Dims(
        B=batch, T=seq_len, d=c.d_model, H=c.n_heads, KV=c.resolved_kv_heads, hd=c.resolved_head_dim,
        ff=c.resolved_d_ff, E=moe.n_experts if moe else 0, A=batch * seq_len * (moe.top_k if moe else 0),
        expert_ff=c.resolved_expert_d_ff if moe else 0,
    )


# Sizes that are all different, so an axis of a shape from _SHAPES is known by its size.
_DISTINCT = _Dims(B=2, T=3, d=5, H=7, KV=11, hd=13, ff=17, E=19, A=23, expert_ff=29)


def position_axis(name: str) -> int | None:
    """The axis of hook point `name`'s activation that runs over input positions, with
    the batch first and features last: 1 for (B, T, ...), 2 for per-head (B, H, T, hd)
    and the pattern's queries (B, H, T, S); None where no axis does (a MoE layer's
    assignments (A, d) and counts (E,), the per-token entropy (B, T) with no features).
    A name the table does not know is taken as (B, T, d), as `activation_bytes` does."""
    block = _BLOCK.fullmatch(name)
    shape = _SHAPES.get(block.group(2) if block else name, _SHAPES["hook_resid_post"])(_DISTINCT)
    if len(shape) < 3 or shape[0] != _DISTINCT.B or _DISTINCT.T not in shape[1:-1]:
        return None
    return shape.index(_DISTINCT.T)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def check_budget(sizes: Mapping[str, int], max_bytes: int) -> None:
    """ValueError naming the total and the five biggest activations when
    `sizes` (name -> bytes) add up to more than max_bytes."""
    total = sum(sizes.values())
    if total <= max_bytes:
        return
    biggest = sorted(sizes.items(), key=lambda item: -item[1])[:5]
    listed = ", ".join(f"{name} {_human(n)}" for name, n in biggest)
    raise ValueError(
        f"caching {len(sizes)} activations needs {_human(total)} ({total} bytes), over max_bytes "
        f"{_human(max_bytes)} ({max_bytes} bytes); biggest: {listed}. Select fewer hook points, "
        "or run a smaller batch or a shorter input"
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ----- the cache -----------------------------------------------------------------


class ActivationCache(Mapping[str, torch.Tensor]):
    """Hook name -> activation (detached), with helpers that know the model's shapes."""

    def __init__(self, activations: dict[str, torch.Tensor], config: ModelConfig) -> None:
        self._acts = activations
        self.config = config

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._acts:
            close = difflib.get_close_matches(name, self._acts, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"{name!r} is not in this cache (it holds {len(self._acts)} hook points){hint}")
        return self._acts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def __repr__(self) -> str:
        return f"ActivationCache({list(self._acts)})"

    def to(self, device: torch.device | str) -> ActivationCache:
        return ActivationCache({n: a.to(device) for n, a in self._acts.items()}, self.config)

    def resid(self, depth: int) -> torch.Tensor:
        """(B, T, d) the residual stream entering block `depth`; depth n_layers
        is the last block's output. The same tensor under either of its names
        (resid_post of block i is resid_pre of block i + 1; hook_embed is
        resid_pre of block 0), so the cache needs only one of them."""
        n = self.config.n_layers
        if not 0 <= depth <= n:
            raise IndexError(f"depth {depth} is outside 0..{n}")
        names = [f"blocks.{depth}.hook_resid_pre"] if depth < n else []
        names += [f"blocks.{depth - 1}.hook_resid_post"] if depth > 0 else ["hook_embed"]
        for name in names:
            if name in self._acts:
                return self._acts[name]
        raise KeyError(f"the cache holds no residual stream at depth {depth}: select {' or '.join(names)}")

    def stack_resid(self) -> torch.Tensor:
        """(n_layers + 1, B, T, d): the residual stream entering each block, then
        the last block's output (select them with `resid_names(model)`)."""
        return torch.stack([self.resid(i) for i in range(self.config.n_layers + 1)])

    def heads(self, layer: int) -> torch.Tensor:
        """(B, T, n_heads, head_dim): each head's output before `out`, from hook_z.
        A layer the model does not have is an IndexError with the valid range, as in
        `resid`, rather than a KeyError suggesting other hook names."""
        n = self.config.n_layers
        if not 0 <= layer < n:
            raise IndexError(f"layer {layer} is outside the model's {n} layers (valid: 0..{n - 1})")
        z = self[f"blocks.{layer}.attn.hook_z"]  # (B, T, nh * hd)
        return z.unflatten(-1, (self.config.n_heads, self.config.resolved_head_dim))


# ----- arguments every lens checks -----------------------------------------------


def check_tokens(arg: str, tokens: int | torch.Tensor, vocab_size: int) -> None:
    """ValueError naming `arg` when a token id (or any of a tensor of them) is
    outside the vocabulary, instead of an IndexError from deep inside a lens."""
    ids = torch.as_tensor(tokens)
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.numel():
        raise ValueError(f"{arg}: token id {int(outside[0])} outside the vocabulary (0..{vocab_size - 1})")


def check_target(arg: str, target: int | torch.Tensor, model: Transformer) -> None:
    """check_tokens against what the model's head outputs: a token's logit (head
    "lm"), or for head "scalar" its one output, the score, which is target 0."""
    if model.config.head == "lm":
        check_tokens(arg, target, model.config.vocab_size)
        return
    ids = torch.as_tensor(target)
    if (ids != 0).any():
        raise ValueError(f"{arg}: a model with head {model.config.head!r} has one output, its score, not a "
                         f"vocabulary of next tokens; pass {arg}=0 to explain the score (got {int(ids[ids != 0][0])})")


def check_position(arg: str, position: int, n_tokens: int) -> None:
    """ValueError naming `arg` when `position` does not index one of `n_tokens`
    (negative positions count from the end, as in Python)."""
    if not -n_tokens <= position < n_tokens:
        raise ValueError(f"{arg}: {position} outside the {n_tokens} input tokens "
                         f"(valid: {-n_tokens}..{n_tokens - 1})")


# ----- running -------------------------------------------------------------------


def run_with_cache(
    model: Transformer,
    ids: torch.Tensor,  # (B, T) long
    names: Selection = None,
    *,
    device: torch.device | str | None = None,
    max_bytes: int | None = None,
    attention_mask: torch.Tensor | None = None,  # (B, T) bool, False = padding
) -> tuple[TransformerOutput, ActivationCache]:
    """Run `model` on `ids` in eval mode, without gradients; return its output and the
    selected activations, detached (and moved to `device` when given), in the
    order the forward pass computed them.

    Selecting `attn.hook_pattern` makes attention materialise its
    probabilities (core/attention.py), and selecting a MoE layer's expert hook
    points (`hook_expert_load`, `_dropped`, `_in`, `_post`) sends 16 tokens or
    fewer through batched dispatch instead of the few-token path
    (core/moe.py `decodes`): either changes logits by float rounding only
    (~1e-6). max_bytes bounds the cached activations (not the forward pass's own
    working memory); over it, ValueError before anything runs.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids: expected (B, T), got {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("ids: empty input")
    chosen = select_hooks(model, names)
    if max_bytes is not None:
        check_budget(activation_bytes(model, *ids.shape, chosen), max_bytes)
    acts: dict[str, torch.Tensor] = {}

    def record(x: torch.Tensor, name: str) -> None:
        x = x.detach()
        acts[name] = x if device is None else x.to(device)

    with torch.no_grad(), evaluating(model), model.hooks({name: record for name in chosen}):
        output = model(ids, attention_mask=attention_mask)
    return output, ActivationCache(acts, model.config)  # in the order the forward pass wrote them


__all__ = [
    "ActivationCache", "activation_bytes", "check_budget", "check_next_token_head", "check_position", "check_target",
    "check_tokens", "position_axis", "resid_names", "run_with_cache", "select_hooks",
]
