"""Attention heads: their patterns, plots of them, and scores that name what a head does.

Patterns are read at `blocks.{i}.attn.hook_pattern` (B, H, T, S). The scores
are TransformerLens's head detectors, after Olsson et al. 2022 ("In-context
Learning and Induction Heads", section 2), measured on random tokens repeated
once, `repeated_tokens`: a sequence x_0 .. x_{L-1} x_0 .. x_{L-1} of period L.

- induction: the mean attention from each query t in the second half to key
  t - L + 1, the token after the previous occurrence of the current token.
  An induction head attends there and copies what it finds.
- previous_token: the mean attention from each query t >= 1 to key t - 1.

    scores = head_scores(model, repeated_tokens(32, 16, vocab), period=16)
    find_heads(scores["induction"])   # FoundHeads(heads=((1, 2),), ..., margin=0.8)
    plot_attention_patterns(attention_patterns(model, ids), "out/", tokens=[...])
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from heron.core.transformer import Transformer
from heron.govern.figures import new_figure, save_png
from heron.interpret.cache import run_with_cache
from heron.interpret.plots import token_label

Head = tuple[int, int]  # (layer, head)
DEFAULT_THRESHOLD = 0.4  # a head whose score reaches this is reported (chance is ~1/T for near-uniform attention)


# ----- patterns and plots ---------------------------------------------------------


def attention_patterns(model: Transformer, ids: torch.Tensor,
                       layers: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """{layer: (B, H, T, T) attention probabilities} on `ids` (B, T), every layer by
    default. A negative layer counts from the end, as in Python; the keys are the
    layers' indices (layers=[-1] of a 4-layer model gives {3: ...}). An empty
    `layers` is refused: it would return {} and every caller would show nothing."""
    n = model.config.n_layers
    if layers is not None and len(layers) == 0:
        raise ValueError(f"layers: empty selection; pass at least one layer index (valid: {-n}..{n - 1}), "
                         "or None for every layer")
    outside = [i for i in layers or () if not -n <= i < n]
    if outside:
        raise ValueError(f"layers: {outside[0]} is outside the model's {n} layers (valid: {-n}..{n - 1})")
    layers = range(n) if layers is None else [i % n for i in layers]
    names = [f"blocks.{i}.attn.hook_pattern" for i in layers]
    _, cache = run_with_cache(model, ids, names)
    return {i: cache[name] for i, name in zip(layers, names)}


def plot_attention(pattern: torch.Tensor, path: str | Path, *, tokens: Sequence[str] | None = None,
                   title: str = "") -> Path:
    """One PNG of a layer's heads side by side, each a (T, S) grid of query rows
    and key columns, from `pattern` (H, T, S); `tokens` label both axes."""
    if pattern.dim() != 3:
        raise ValueError(f"pattern: expected (H, T, S), got {tuple(pattern.shape)}")
    H, T, S = pattern.shape
    if tokens is not None and len(tokens) != S:
        raise ValueError(f"tokens: {len(tokens)} labels for {S} key positions")
    cols = min(H, 4)
    rows = -(-H // cols)
    cell = 1.2 + 0.16 * S
    fig, axes = new_figure(rows, cols, figsize=(cols * cell, rows * cell + 0.4), squeeze=False)
    values = pattern.detach().float().cpu().numpy()
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.set_axis_off()
            continue
        ax.imshow(values[h], vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
        if tokens is not None:
            labels = [token_label(t) for t in tokens]
            ax.set_xticks(range(S), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(T), labels[S - T:], fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)


def plot_attention_patterns(patterns: Mapping[int, torch.Tensor], folder: str | Path, *,
                            tokens: Sequence[str] | None = None, row: int = 0) -> list[Path]:
    """`folder/layer_{i}.png` for each layer of `patterns` ({layer: (B, H, T, S)}),
    showing batch row `row`."""
    folder = Path(folder)
    return [plot_attention(p[row], folder / f"layer_{i}.png", tokens=tokens, title=f"layer {i}")
            for i, p in sorted(patterns.items())]


# ----- scores ------------------------------------------------------------------------


def repeated_tokens(batch_size: int, period: int, vocab_size: int, *, seed: int = 0,
                    generator: torch.Generator | None = None, repeats: int = 2) -> torch.Tensor:
    """(batch_size, repeats * period) long: `period` distinct random tokens, then the
    same again. Distinct, so each later token has exactly one earlier occurrence,
    `period` positions back. `generator` (when given) is used instead of `seed`."""
    if not 1 <= period <= vocab_size:
        raise ValueError(f"period: {period} distinct tokens need 1 <= period <= vocab_size ({vocab_size})")
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    first = torch.rand(batch_size, vocab_size, generator=generator).argsort(dim=-1)[:, :period]  # (B, L)
    return first.repeat(1, repeats)


def induction_score(pattern: torch.Tensor, period: int) -> torch.Tensor:
    """(H,): mean of pattern[b, h, t, t - period + 1] over rows b and queries
    t >= period, from `pattern` (B, H, T, T) on a sequence of that period."""
    T = _check_square(pattern)
    if not 1 <= period < T:
        raise ValueError(f"period: {period} leaves no repeated query in {T} positions")
    stripe = pattern.diagonal(offset=1 - period, dim1=-2, dim2=-1)  # (B, H, T - period + 1): queries period-1 ..
    return stripe[..., 1:].mean(dim=(0, 2))


def previous_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """(H,): mean of pattern[b, h, t, t - 1] over rows b and queries t >= 1, from `pattern` (B, H, T, T)."""
    if _check_square(pattern) < 2:
        raise ValueError("pattern: a previous token needs at least 2 positions")
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))


def _check_square(pattern: torch.Tensor) -> int:
    if pattern.dim() != 4 or pattern.shape[-1] != pattern.shape[-2]:
        raise ValueError(f"pattern: expected (B, H, T, T) from a forward without cache, got {tuple(pattern.shape)}")
    return pattern.shape[-1]


# Score name -> fn(pattern (B, H, T, T), period) -> (H,).
SCORES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "induction": induction_score,
    "previous_token": lambda pattern, _period: previous_token_score(pattern),
}


def head_scores(model: Transformer, ids: torch.Tensor, period: int) -> dict[str, torch.Tensor]:
    """{score name: (n_layers, n_heads)} of every SCORES entry on `ids` (B, T) of period `period`."""
    patterns = attention_patterns(model, ids)
    return {name: torch.stack([score(patterns[i], period) for i in sorted(patterns)])
            for name, score in SCORES.items()}


@dataclass(frozen=True)
class FoundHeads:
    """The heads whose score reaches a threshold, and how clearly they stand out."""

    heads: tuple[Head, ...]  # (layer, head) at or above the threshold, best first; () when none
    best: Head  # the highest-scoring head, found or not
    best_score: float
    # The weakest found head's score minus the strongest other head's (with no head
    # found, the best head's minus the runner-up's): a gap between the found set and
    # every other head, so two induction heads do not hide each other.
    margin: float
    threshold: float


def find_heads(scores: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> FoundHeads:
    """The heads of `scores` (n_layers, n_heads) at or above `threshold`."""
    if scores.dim() != 2 or scores.numel() < 2:
        raise ValueError(f"scores: expected (n_layers, n_heads) with at least two heads, got {tuple(scores.shape)}")
    flat = scores.detach().float().flatten()
    order = flat.argsort(descending=True).tolist()
    n_heads = scores.shape[1]
    found = [i for i in order if flat[i] >= threshold]
    top = found or order[:1]
    rest = [i for i in order if i not in top]
    margin = float(flat[top[-1]] - flat[rest[0]]) if rest else float(flat[top[-1]] - threshold)
    return FoundHeads(heads=tuple(divmod(i, n_heads) for i in found), best=divmod(order[0], n_heads),
                      best_score=float(flat[order[0]]), margin=margin, threshold=threshold)


def detect_heads(model: Transformer, *, period: int = 16, batch_size: int = 32, seed: int = 0,
                 threshold: float = DEFAULT_THRESHOLD) -> dict[str, FoundHeads]:
    """{score name: FoundHeads} on `batch_size` sequences of `period` random tokens repeated once."""
    ids = repeated_tokens(batch_size, period, model.config.vocab_size, seed=seed).to(model.embed.weight.device)
    return {name: find_heads(s, threshold) for name, s in head_scores(model, ids, period).items()}


__all__ = [
    "DEFAULT_THRESHOLD", "SCORES", "FoundHeads", "Head", "attention_patterns", "detect_heads", "find_heads",
    "head_scores", "induction_score", "plot_attention", "plot_attention_patterns", "previous_token_score",
    "repeated_tokens",
]
