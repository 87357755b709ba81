"""Mixture-of-Experts routing: which tokens go to which expert, and each expert's load.

The router's probabilities are read at each MoE layer's `hook_router_probs`
and turned into choices by the layer's own `route` (core/moe.py), so what is
reported is what the model dispatches (in eval, where no token is dropped).

    report = routing(model, batches)
    report.load            # (MoE layers, E) share of assignments per expert
    report.top_tokens(0)   # per expert of the first MoE layer: its most routed token ids
    plot_load(report, "load.png")
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from heron.core.hooks import attach_hooks
from heron.core.modes import evaluating
from heron.core.moe import MoE, route
from heron.core.transformer import Transformer
from heron.govern.figures import new_figure, save_png


@dataclass(frozen=True)
class RoutingReport:
    """Routing over every token of the batches, per MoE layer (in block order)."""

    layers: list[int]  # block index of each MoE layer
    counts: torch.Tensor  # (L, E) long: assignments routed to each expert
    token_counts: torch.Tensor  # (L, V, E) long: assignments of each token id to each expert
    tokens: int  # tokens seen

    @property
    def load(self) -> torch.Tensor:
        """(L, E) each expert's share of its layer's assignments (rows sum to 1)."""
        return self.counts.float() / self.counts.sum(dim=1, keepdim=True).clamp(min=1)

    @property
    def max_load(self) -> torch.Tensor:
        """(L,) the busiest expert's load over the mean load (1 = perfectly balanced)."""
        return self.load.amax(dim=1) * self.counts.shape[1]

    def top_tokens(self, layer: int, k: int = 10) -> list[list[tuple[int, int]]]:
        """Per expert of MoE layer `layer` (its position in `layers`): up to k
        (token id, assignments) pairs, most routed first; tokens never routed there are left out."""
        counts = self.token_counts[layer]  # (V, E)
        top = counts.topk(min(k, counts.shape[0]), dim=0)  # values, indices: (k, E)
        return [[(int(i), int(c)) for c, i in zip(top.values[:, e], top.indices[:, e]) if c > 0]
                for e in range(counts.shape[1])]


def moe_blocks(model: Transformer) -> list[int]:
    """The indices of the blocks whose feed-forward is a Mixture of Experts."""
    return [i for i, block in enumerate(model.blocks) if isinstance(block.mlp, MoE)]


@torch.no_grad()
def routing(model: Transformer, batches: Iterable[torch.Tensor]) -> RoutingReport:
    """Route every token of the (B, T) batches, in eval mode, and count, per MoE
    layer, which expert each assignment goes to, overall and per token id."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("model: has no Mixture-of-Experts layer to analyse")
    experts, vocab = model.blocks[blocks[0]].mlp.settings.n_experts, model.config.vocab_size
    counts = torch.zeros(len(blocks), experts, dtype=torch.long)
    token_counts = torch.zeros(len(blocks), vocab, experts, dtype=torch.long)
    current: dict[str, torch.Tensor] = {}
    seen = 0

    def record(probs: torch.Tensor, name: str) -> None:  # (B, T, E)
        layer = blocks.index(int(name.split(".")[1]))
        _, chosen = route(probs.flatten(0, 1), model.blocks[blocks[layer]].mlp.settings.top_k)  # (N, k)
        ids = current["ids"].flatten().repeat_interleave(chosen.shape[1])  # (N * k,) token of each assignment
        counts[layer] += torch.bincount(chosen.flatten().cpu(), minlength=experts)
        token_counts[layer].index_put_((ids, chosen.flatten().cpu()), torch.ones_like(ids), accumulate=True)

    hooks = {f"blocks.{i}.mlp.hook_router_probs": record for i in blocks}
    with evaluating(model), attach_hooks(model, hooks):
        for ids in batches:
            ids = torch.as_tensor(ids)
            if ids.dim() != 2:
                raise ValueError(f"batches: expected (B, T) token ids, got shape {tuple(ids.shape)}")
            current["ids"] = ids.cpu()
            model(ids.to(next(model.parameters()).device))
            seen += ids.numel()
    return RoutingReport(blocks, counts, token_counts, seen)


def plot_load(report: RoutingReport, path: str | Path) -> Path:
    """A heat map of each expert's load per MoE layer, as a PNG; returns the path."""
    load = report.load.numpy()  # (L, E)
    fig, ax = new_figure(figsize=(1.2 + 0.45 * load.shape[1], 1.0 + 0.45 * load.shape[0]))
    image = ax.imshow(load, cmap="viridis", vmin=0, aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("block")
    ax.set_xticks(range(load.shape[1]))
    ax.set_yticks(range(load.shape[0]), [str(i) for i in report.layers])
    ax.set_title(f"share of assignments per expert ({report.tokens} tokens)")
    fig.colorbar(image, ax=ax, label="load")
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


__all__ = ["RoutingReport", "moe_blocks", "plot_load", "routing"]
