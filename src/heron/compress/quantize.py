"""Quantise a Transformer's weights in place: which layers, by which method.

    model = quantize_model(model, "int4", "gptq", calibration=ids, group_size=128)

The linears inside each block (attention qkv and out, MLP up and down, a MoE's
shared expert) become `QuantLinear`s; the token embedding and the output head
become int8 rows by default (`embeddings`), stored once when tied. A MoE
layer becomes a `QuantMoE`: each expert's up and down matrices are quantised
as linears are (calibrated on the rows routed to that expert), and the
router stays fp32.

Calibrated methods follow GPTQ's sequential recipe (Frantar et al. 2022,
section 4, and the reference's --true-sequential): block by block, each
linear is quantised on inputs that have already passed through the quantised
layers before it, so later layers correct for earlier rounding.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from heron.compress.awq import awq_quantize
from heron.compress.calibration import (
    BLOCK_LINEARS,
    EXPERT_INPUTS,
    block_experts,
    block_linears,
    calibration_batches,
    feed,
    feed_experts,
    find_module,
    first_block_inputs,
    input_reader,
)
from heron.compress.gptq import HessianAccumulator, gptq_quantize
from heron.compress.qlinear import QuantEmbedding, QuantLinear, is_quantized
from heron.compress.quant_moe import QuantMoE
from heron.compress.schemes import SCHEMES, Scheme, get_scheme, quantize_rtn
from heron.core.moe import MoE
from heron.core.transformer import Transformer

METHODS = ("rtn", "gptq", "awq")
# Linears of a block, in the order data flows through them (true-sequential order).
KEEP_FP32 = ("fp32", None)


@dataclass(frozen=True)
class QuantizeSettings:
    """How `quantize_model` quantises; checked before any work."""

    scheme: str = "int8"
    method: str = "rtn"
    group_size: int = 128  # int4 only: input columns per scale and zero point
    act_order: bool = False  # GPTQ only: quantise columns in order of decreasing Hessian diagonal
    embeddings: str | None = "int8"  # scheme of the token embedding and output head; "fp32" or None keeps them
    percdamp: float = 0.01  # GPTQ dampening, a fraction of the mean Hessian diagonal
    block_size: int = 128  # GPTQ lazy-update block (columns)
    awq_grid: int = 20  # AWQ: α on this many points of [0, 1]
    awq_rows: int = 4096  # AWQ: calibration rows kept per layer (output errors are means; a sample suffices)
    batch_size: int = 8  # calibration sequences per forward
    symmetric: bool = False  # int4 only: llama.cpp Q4_0's grid (zero point 8, signed scale) for exact GGUF export

    def check(self, calibrated: bool) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme: unknown {self.scheme!r}; known: {', '.join(SCHEMES)}")
        if self.method not in METHODS:
            raise ValueError(f"method: unknown {self.method!r}; known: {', '.join(METHODS)}")
        if self.embeddings not in KEEP_FP32 and self.embeddings not in SCHEMES:
            raise ValueError(f"embeddings: unknown {self.embeddings!r}; known: fp32, {', '.join(SCHEMES)}")
        if self.symmetric and self.scheme != "int4":
            raise ValueError(f"symmetric: applies to scheme 'int4' only, not {self.scheme!r}")
        if self.act_order and self.method != "gptq":
            raise ValueError(f"act_order: applies to method 'gptq' only, not {self.method!r}")
        if self.method != "rtn" and not calibrated:
            raise ValueError(f"calibration: method {self.method!r} needs calibration token ids")
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"percdamp: expected a value in [0, 1), got {self.percdamp}")
        for name in ("block_size", "awq_rows", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.awq_grid < 2:  # α = 0 and α = 1 at least (awq_quantize), said before any calibration work
            raise ValueError(f"awq_grid: expected at least 2 points of [0, 1], got {self.awq_grid}")
        self.weight_scheme()  # an invalid group size names itself

    def weight_scheme(self) -> Scheme:
        return get_scheme(self.scheme, self.group_size, self.symmetric)

    def embedding_scheme(self) -> Scheme | None:
        return None if self.embeddings in KEEP_FP32 else get_scheme(self.embeddings, self.group_size, self.symmetric)


def quantize_model(
    model: Transformer,
    scheme: str = "int8",
    method: str = "rtn",
    calibration: torch.Tensor | Iterable[torch.Tensor] | None = None,
    *,
    group_size: int = 128,
    act_order: bool = False,
    embeddings: str | None = "int8",
    progress: bool = True,
    **options: Any,
) -> Transformer:
    """Swap `model`'s linears (and embeddings) for quantised ones, in place;
    returns the model in eval mode.

    calibration: token ids, (n, T) or an iterable of (B, T) batches; needed by
    "gptq" and "awq", ignored by "rtn". options: the other QuantizeSettings
    fields (percdamp, block_size, awq_grid, awq_rows, batch_size, symmetric).
    """
    settings = QuantizeSettings(scheme, method, group_size, act_order, embeddings, **options)
    settings.check(calibrated=calibration is not None)
    if is_quantized(model):
        raise ValueError("model: already quantised; quantise the full-precision model instead")
    targets = block_linears(model)
    weights = settings.weight_scheme()
    for name, layer in targets.items():
        weights.check(layer.out_features, layer.in_features, name)
    for name, stack in block_experts(model).items():  # (E, K, N): every expert an (N, K) matrix
        weights.check(stack.shape[2], stack.shape[1], name)
    _check_embeddings(model, settings)
    batches = calibration_batches(calibration, settings.batch_size) if method != "rtn" else []
    model.eval()
    report: dict[str, Any] = {}
    with torch.no_grad():
        if method == "rtn":
            moe_blocks = [block for block in model.blocks if isinstance(block.mlp, MoE)]
            with tqdm(total=len(targets) + len(moe_blocks), disable=not progress, desc=f"rtn {scheme}",
                      unit="layer") as bar:
                for name, layer in targets.items():
                    swap_module(model, name, _rtn_linear(layer.weight, weights, layer.bias))
                    bar.update()
                for block in moe_blocks:  # a MoE layer's experts count as one layer
                    up, down = ([_rtn_linear(w, weights) for w in _expert_matrices(block.mlp, suffix)]
                                for suffix in EXPERT_INPUTS)
                    block.mlp = QuantMoE.from_moe(block.mlp, model.config, up, down)
                    bar.update()
        else:
            report = _quantize_sequentially(model, batches, settings, progress)
        _quantize_embeddings(model, settings.embedding_scheme())
    model.quantization = {  # read by save_quantized for quantization.json
        **weights.describe(), "method": method, "act_order": act_order, "embeddings": settings.embeddings or "fp32",
        "calibration_tokens": sum(b.numel() for b in batches), "layers": report,
    }
    return model


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at a dotted name."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _rtn_linear(w: torch.Tensor, scheme: Scheme, bias: torch.Tensor | None = None) -> QuantLinear:
    """A layer holding W (N, K) rounded to nearest."""
    codes, params = quantize_rtn(w, scheme)
    return QuantLinear.from_codes(codes, params, scheme, bias=bias)


def _expert_matrices(moe: MoE, suffix: str) -> list[torch.Tensor]:
    """Each expert's (N out, K in) matrix of the stacked weight at `suffix` ("mlp.up"
    or "mlp.down", as EXPERT_INPUTS names them), as views: the stack is (E, K, N)."""
    return [w.T for w in moe.get_parameter(suffix.removeprefix("mlp."))]


# ----- calibrated methods: sequential, block by block -------------------------


def _quantize_sequentially(
    model: Transformer, batches: Sequence[torch.Tensor], settings: QuantizeSettings, progress: bool
) -> dict[str, Any]:
    scheme, report = settings.weight_scheme(), {}
    inputs = first_block_inputs(model, batches)  # [(args, kwargs)] per batch
    bar = tqdm(list(enumerate(model.blocks)), disable=not progress, desc=f"{settings.method} {settings.scheme}",
               unit="block")
    for i, block in bar:
        for suffix in BLOCK_LINEARS:
            layer = find_module(block, suffix)
            if not isinstance(layer, nn.Linear):
                continue
            name = f"blocks.{i}.{suffix}"
            reader = input_reader(block, suffix)
            inputs_seen = _inputs(settings, layer.in_features, len(inputs))
            feed(block, reader, inputs, inputs_seen.add)
            if inputs_seen.rows == 0:
                raise RuntimeError(f"{type(reader).__name__} was never called: no calibration inputs for "
                                   f"{settings.method}")
            new, report[name] = _calibrated_layer(layer.weight.detach(), layer.bias, inputs_seen, scheme, settings)
            swap_module(model, name, new)
        if isinstance(block.mlp, MoE):
            block.mlp, report[f"blocks.{i}.mlp.experts"] = _calibrated_experts(
                model, i, block, inputs, scheme, settings)
        inputs = [((block(*args, **kwargs),) + args[1:], kwargs) for args, kwargs in inputs]  # the next block's
    return report


class _RowSample:
    """Up to `per_batch` rows of every batch of inputs a layer sees (AWQ's calibration sample)."""

    def __init__(self, per_batch: int) -> None:
        self.per_batch, self.samples, self.rows = per_batch, [], 0

    def add(self, x: torch.Tensor) -> None:
        self.samples.append(_sample_rows(x, self.per_batch, len(self.samples)))
        self.rows += self.samples[-1].shape[0]


def _inputs(settings: QuantizeSettings, in_features: int, batches: int) -> HessianAccumulator | _RowSample:
    """What the method keeps of a layer's calibration inputs: GPTQ's Hessian, AWQ's row sample."""
    if settings.method == "gptq":
        return HessianAccumulator(in_features)
    return _RowSample(math.ceil(settings.awq_rows / batches))


def _calibrated_layer(
    w: torch.Tensor, bias: torch.Tensor | None, inputs_seen: HessianAccumulator | _RowSample, scheme: Scheme,
    settings: QuantizeSettings,
) -> tuple[QuantLinear, dict[str, float]]:
    """A quantised layer for weight w (N, K) from what its calibration inputs left (`_inputs`)."""
    if isinstance(inputs_seen, HessianAccumulator):
        codes, params = gptq_quantize(w, inputs_seen.H, scheme, block_size=settings.block_size,
                                      percdamp=settings.percdamp, act_order=settings.act_order)
        return QuantLinear.from_codes(codes, params, scheme, bias=bias), {"rows": inputs_seen.rows}
    result = awq_quantize(w, torch.cat(inputs_seen.samples), scheme, grid=settings.awq_grid, bias=bias)
    new = QuantLinear.from_codes(result.codes, result.params, scheme, bias=bias, input_scale=result.input_scale)
    return new, {"alpha": result.alpha, "mse": result.error, "rtn_mse": result.rtn_error}


def _calibrated_experts(
    model: Transformer, i: int, block: nn.Module, inputs: list[tuple[tuple, dict]], scheme: Scheme,
    settings: QuantizeSettings,
) -> tuple[QuantMoE, dict[str, list[int]]]:
    """Block i's MoE with its experts quantised, and the calibration rows each
    expert saw. Each expert matrix is calibrated on the rows routed to its
    expert (`feed_experts`), up before down; the quantised up's numbers are
    written back into the stack first, so down sees the activations the
    quantised model makes (true-sequential, as for linears). An expert routed
    no calibration token is rounded to nearest, with a warning."""
    layers: dict[str, list[QuantLinear]] = {}
    rows: dict[str, list[int]] = {}
    for suffix in EXPERT_INPUTS:
        matrices = _expert_matrices(block.mlp, suffix)
        seen = [_inputs(settings, w.shape[1], len(inputs)) for w in matrices]
        feed_experts(block, suffix, inputs, [s.add for s in seen])
        layers[suffix], rows[suffix] = [], [s.rows for s in seen]
        for e, (w, inputs_seen) in enumerate(zip(matrices, seen)):
            if inputs_seen.rows:
                layer, _ = _calibrated_layer(w.detach(), None, inputs_seen, scheme, settings)
            else:
                warnings.warn(f"blocks.{i}.{suffix}: expert {e} was routed no calibration tokens; "
                              f"rounded to nearest instead of {settings.method}", stacklevel=4)
                layer = _rtn_linear(w.detach(), scheme)
            if settings.method == "awq" and layer.input_scale is None:  # one layout for every expert: scale 1
                layer = QuantLinear.from_codes(*layer.unpacked(), scheme, input_scale=torch.ones(w.shape[1]))
            w.copy_(layer.weight)
            layers[suffix].append(layer)
    quantized = QuantMoE.from_moe(block.mlp, model.config, *(layers[suffix] for suffix in EXPERT_INPUTS))
    return quantized, rows


def _sample_rows(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Up to `count` rows of x (..., K), chosen at random but reproducibly."""
    x = x.reshape(-1, x.shape[-1]).float()  # (n, K)
    if x.shape[0] <= count:
        return x
    keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return x[keep]


# ----- embeddings and output head ----------------------------------------------


def _check_embeddings(model: Transformer, settings: QuantizeSettings) -> None:
    scheme = settings.embedding_scheme()
    if scheme is not None:
        scheme.check(model.config.vocab_size, model.config.d_model, "the embedding")


def _quantize_embeddings(model: Transformer, scheme: Scheme | None) -> None:
    """Token embedding and ("lm") output head by round-to-nearest, one row per
    token; a tied pair becomes one table the head reads too. A scalar head
    (one output) stays fp32."""
    if scheme is None:
        return
    tied = model.lm_head.weight is model.embed.weight
    codes, params = quantize_rtn(model.embed.weight.detach(), scheme)
    model.embed = QuantEmbedding.from_codes(codes, params, scheme)
    if tied:
        model.lm_head = tie_head(model.embed)
    elif model.config.head == "lm":
        codes, params = quantize_rtn(model.lm_head.weight.detach(), scheme)
        model.lm_head = QuantLinear.from_codes(codes, params, scheme)


def tie_head(embedding: QuantEmbedding) -> QuantLinear:
    """An output head that reads the embedding's packed tensors (the same
    tensor objects, so they are stored once and loaded once)."""
    head = QuantLinear(embedding.embedding_dim, embedding.num_embeddings, embedding.scheme)
    for name, tensor in embedding.packed().items():
        setattr(head, name, tensor)
    return head


__all__ = [
    "METHODS", "QuantizeSettings", "quantize_model",
    "swap_module", "tie_head",
]
