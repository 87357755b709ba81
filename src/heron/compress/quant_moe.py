"""A Mixture-of-Experts layer whose experts hold quantised weights.

`QuantMoE` is core's `MoE` (router, routing, losses, hooks and statistics
unchanged) with its stacked expert weights replaced by one `QuantLinear` per
expert and matrix: `experts_up[e]` (d -> the expert's gate and up width) and
`experts_down[e]` (ff -> d), each a layer of its own packed codes, kernel and
input scale (AWQ). Batches run each expert on its own rows, a loop over the
experts and never over tokens; decoding sends a token through its chosen
experts' layers only, so a step reads two experts' codes, not all of them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from heron.compress.qlinear import QuantLinear
from heron.compress.schemes import Scheme
from heron.core.config import ModelConfig
from heron.core.moe import MoE


EXPERT_LISTS = ("experts_up", "experts_down")  # QuantMoE's lists of expert layers


def is_expert_layer(name: str) -> bool:
    """Whether a dotted module name is one of a QuantMoE's expert layers
    (`blocks.0.mlp.experts_up.3`): saved and rebuilt with their MoE, not one by one."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in EXPERT_LISTS


class QuantMoE(MoE):
    """`MoE` with quantised experts; build with `from_moe` or, to load a
    checkpoint into, from the model's config."""

    def __init__(self, config: ModelConfig, scheme: Scheme, *, input_scale: bool = False) -> None:
        d, ff = config.d_model, config.resolved_expert_d_ff
        width = 2 * ff if config.mlp == "swiglu" else ff
        with torch.device("meta"):  # the float experts are dropped, never allocated; the rest is loaded or replaced
            super().__init__(config)
            del self.up, self.down
            n = self.settings.n_experts
            self.experts_up = nn.ModuleList(QuantLinear(d, width, scheme, input_scale=input_scale) for _ in range(n))
            self.experts_down = nn.ModuleList(QuantLinear(ff, d, scheme, input_scale=input_scale) for _ in range(n))
        self.to_empty(device="cpu")

    @classmethod
    def from_moe(cls, moe: MoE, config: ModelConfig, up: list[QuantLinear], down: list[QuantLinear]) -> QuantMoE:
        """`moe`'s router, shared expert and running mean with these expert layers
        (up[e]: d -> width, down[e]: ff -> d)."""
        new = cls(config, up[0].scheme, input_scale=up[0].input_scale is not None)
        new.router, new.shared = moe.router, moe.shared
        if moe.router_center is not None:
            new.router_center = moe.router_center
        new.experts_up, new.experts_down = nn.ModuleList(up), nn.ModuleList(down)
        return new.train(moe.training)

    def reset_parameters(self, std: float, residual_scale: float) -> None:
        """Codes are not initialised; the router's running mean starts at zero."""
        if self.router_center is not None:
            self.router_center.zero_()

    def _layers(self, which: str) -> nn.ModuleList:
        return getattr(self, f"experts_{which}")

    def _expert_product(self, which: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return self._layers(which)[e](x)

    def step_products(self) -> tuple[list[object], list[object], int, list[torch.Tensor]] | None:
        """The experts' products as the core's whole-layer decoding kernel takes them
        (core/step_kernels.py): each expert's up and down `QuantLinear.step_product()`, the
        experts' hidden width, and nothing more to hold (the products hold their codes); None
        where a layer offers none or has a bias, which the kernel would not add."""
        layers = [*self.experts_up, *self.experts_down]
        products = [layer.step_product() for layer in layers]
        if any(p is None for p in products) or any(layer.bias is not None for layer in layers):
            return None
        n = len(self.experts_up)
        return products[:n], products[n:], self.experts_down[0].in_features, []

    def _expert_products(self, which: str) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        return [layer.decode_product() for layer in self._layers(which)]

    def _grouped_product(self, which: str, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        layers = self._layers(which)
        parts = [layer(part) for layer, part in zip(layers, rows.split(counts.tolist())) if len(part)]
        return torch.cat(parts) if parts else rows.new_zeros(0, layers[0].out_features)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective expert weights as MoE stacks them: up (E, d, width), down (E, ff, d)."""
        up = torch.stack([layer.weight.T for layer in self.experts_up])  # (E, d, width)
        down = torch.stack([layer.weight.T for layer in self.experts_down])  # (E, ff, d)
        return up, down


__all__ = ["EXPERT_LISTS", "QuantMoE", "is_expert_layer"]
