"""A decoding step's small operations through Heron's compiled kernels
(csrc/step.c: why there), for core/token_step.py.

Each function here returns None where the kernels were not built (no C
compiler at install), and its callers then keep torch's ops. The kernels
take fp32 CPU tensors only; each caller checks what it hands over, since a
kernel reads raw memory and cannot check for itself.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from heron.core.attention import Attention
from heron.core.kv_cache import KVCache
from heron.core.linear import STREAM_ROWS, Linear, is_input_major, streams
from heron.core.mlp import MLP
from heron.core.moe import MoE
from heron.core.norms import RMSNorm

MAX_HEAD_DIM = 512  # the widest head the attention kernel takes (csrc/step.c)
Rope = tuple[torch.Tensor, torch.Tensor] | None  # this step's RoPE rows: (1, hd), or (B, ..., hd) one a row


@functools.cache
def step_kernels() -> ModuleType | None:
    """Heron's step kernels (csrc/step.c) where they were built, else None."""
    try:
        from heron.core import _step
    except ImportError:
        return None
    return _step


def _fp32_cpu(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu"


def rms_norm_step(norm: RMSNorm) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`norm`'s forward for fp32 inference through the kernel (other inputs through
    the module); None without the kernels, or for a norm without a gain or eps."""
    kernel = step_kernels()
    weight, eps = norm.weight, norm.eps
    if kernel is None or weight is None or eps is None or not _fp32_cpu(weight):
        return None
    width = weight.shape[0]

    def normed(x: torch.Tensor) -> torch.Tensor:
        if not _fp32_cpu(x) or x.shape[-1] != width:
            return norm.forward(x)
        rows = x.contiguous()
        y = torch.empty_like(rows)
        kernel.rms_norm(rows.data_ptr(), rows.numel() // width, width, weight.data_ptr(), y.data_ptr(), eps)
        return y
    return normed


def embedding_step(embed: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """ids (B,) -> their rows (B, 1, d) of a plain `nn.Embedding`'s fp32 table through the
    kernel, which reads the rows through the table's strides: a table tied to an output
    head laid out input-major (core/linear.py) is read in place, where torch's lookup took
    ~30 us for one 512-wide row of the `small` preset. Other ids (not int64) through the
    module; None without the kernels or for another module."""
    kernel = step_kernels()
    if kernel is None or type(embed) is not nn.Embedding or embed.max_norm is not None:
        return None
    table = embed.weight

    def rows(ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype != torch.int64 or not _fp32_cpu(table) or ids.device.type != "cpu":
            return embed.forward(ids[:, None])
        ids = ids.contiguous()
        (vocab, width), (row_stride, column_stride) = table.shape, table.stride()
        y = torch.empty(ids.shape[0], 1, width)
        kernel.embed(ids.data_ptr(), ids.shape[0], table.data_ptr(), vocab, width, row_stride, column_stride,
                     y.data_ptr())
        return y
    return rows


def attend_new_token(
    qkv: torch.Tensor,  # (B, 1, (n_q + 2 n_kv) hd): the qkv product's output
    heads: tuple[int, int],  # n_q, n_kv
    head_dim: int,
    rope: Rope,
    q_factor: float | None,
    cache: KVCache,
    layer: int,
) -> torch.Tensor | None:
    """A dense attention layer for one new token per row, from its qkv product to
    the input of its out product (B, 1, n_q hd): RoPE on q and k, k and v written
    into the cache at its length, attention over the cache (padding keys hidden),
    as `Attention.forward` computes it to fp32 rounding. None where the kernel
    cannot take it (no kernels, another dtype or device, too wide a head);
    the caller then runs torch's ops. The caller advances the cache."""
    kernel = step_kernels()
    keys, values, key_mask = cache.keys[layer], cache.values[layer], cache.key_mask
    if kernel is None or head_dim > MAX_HEAD_DIM or not (_fp32_cpu(qkv) and _fp32_cpu(keys)):
        return None
    n_q, n_kv = heads
    B = qkv.shape[0]
    qkv = qkv.contiguous()
    cos = sin = None
    if rope is not None:
        cos, sin = (t.contiguous() for t in rope)
        if not _fp32_cpu(cos):
            return None
    y = torch.empty(B, 1, n_q * head_dim)
    kernel.attend(qkv.data_ptr(), B, n_q, n_kv, head_dim,
                  0 if cos is None else cos.data_ptr(), 0 if sin is None else sin.data_ptr(),
                  0 if cos is None or cos.numel() == head_dim else head_dim,
                  keys.data_ptr(), values.data_ptr(), keys.shape[2], cache.length,
                  0 if key_mask is None else key_mask.data_ptr(), 0 if key_mask is None else key_mask.shape[1],
                  y.data_ptr(), torch.get_num_threads(), 1.0 if q_factor is None else q_factor)
    return y


def offered_product(module: nn.Module) -> object | None:
    """The product a layer other than `Linear` offers the whole-layer kernel: its `step_product()`
    (a quantised linear's: compress/qlinear.py), a capsule csrc/product.h describes, which holds
    the memory it reads; None where it offers none. A layer that offers one has a `bias`, a
    tensor or None, which the kernel adds."""
    own = getattr(module, "step_product", None)
    return None if own is None else own()


def _product_weights(module: nn.Module) -> tuple[object, list[torch.Tensor]] | None:
    """A product of a layer as `LayerStep`'s kernel takes it: the address of a `Linear`'s fp32
    weight laid out input-major (its (K, N) transpose row-major), or the product the module
    offers; with the tensors that must outlive the call. None where it is neither (torch's
    quantised linears among them, whose `bias` is a method), or its bias is not fp32 on the CPU."""
    if type(module) is Linear:
        if not (_fp32_cpu(module.weight) and is_input_major(module.weight)):
            return None
        transposed = module.weight.detach().t()
        weights, held = transposed.data_ptr(), [transposed]
    else:
        weights, held = offered_product(module), []
        if weights is None:
            return None
    if module.bias is not None and not _fp32_cpu(module.bias):
        return None
    return weights, held


def _expert_products(moe: MoE) -> tuple[list[object], list[object], int, list[torch.Tensor]] | None:
    """A MoE's experts as `LayerStep`'s kernel takes them: each expert's up (d -> 2 ff for SwiGLU, else
    ff) and down (ff -> d) product (no bias), ff, and the tensors that must outlive the calls. A MoE that holds its experts
    in another form offers them (`step_products()`, in this form: a quantised MoE's,
    compress/quant_moe.py); core's stacked fp32 weights (E, K, N) are each expert's weight laid out
    input-major already. None where neither."""
    own = getattr(moe, "step_products", None)
    if own is not None:
        return own()
    up, down = moe.up, moe.down
    if not (_fp32_cpu(up) and _fp32_cpu(down) and up.is_contiguous() and down.is_contiguous()):
        return None
    return [w.data_ptr() for w in up], [w.data_ptr() for w in down], down.shape[1], [up, down]


ACTIVATIONS = {"swiglu": 0, "gelu": 1, "gelu_tanh": 2}  # core/mlp.py's kinds as the kernel numbers them
WINDOWS = ("sliding", "dilated")  # the sparse patterns the kernel attends under (a window of recent keys)


def _feed_forward_takes(mlp: nn.Module) -> bool:
    """Whether the kernel runs this feed-forward: an MLP (SwiGLU or GELU), or a MoE of such experts (a
    shared one too, or none), every product one it takes."""
    if type(mlp) is MLP:
        return mlp.kind in ACTIVATIONS and all(_product_weights(m) is not None for m in (mlp.up, mlp.down))
    if not isinstance(mlp, MoE) or mlp.kind not in ACTIVATIONS or not _fp32_cpu(mlp.router.weight):
        return False
    shared = mlp.shared
    if shared is not None and not (type(shared) is MLP and shared.kind == mlp.kind and _feed_forward_takes(shared)):
        return False
    return _expert_products(mlp) is not None


def _norms_take(norms: list[nn.Module]) -> bool:
    """Whether the kernel runs these norms of a layer: all Heron's RMSNorm, or all torch's LayerNorm
    over the last dimension, with fp32 gains."""
    if all(type(n) is RMSNorm for n in norms):
        return all(n.weight is not None and n.eps is not None and _fp32_cpu(n.weight) for n in norms)
    return all(type(n) is nn.LayerNorm and n.weight is not None and len(n.normalized_shape) == 1
               and _fp32_cpu(n.weight) and (n.bias is None or _fp32_cpu(n.bias)) for n in norms)


class LayerStep:
    """The whole of a plain `Block` for one new token per row in one kernel call (csrc/step.c:
    why): x (B, 1, d) -> (B, 1, d), as `Block.forward` computes it to fp32 rounding, the keys
    and values written into the cache as `attend_new_token` writes them. Plain (`takes`):
    RMSNorm or LayerNorm norms, dense attention, a sliding or dilated window (over a row's
    real tokens, its ring cache too) or any other sparse pattern (the keys a step mask of the
    cache picks: `KVCache.step_mask`), an MLP (SwiGLU or GELU) or a MoE of such
    experts (`MoE.decode_step`'s numbers, its routing statistics left as it leaves them), every product
    either a `Linear` over an fp32 CPU weight laid out input-major (`set_decode_layout` with
    the streaming kernel) or a layer that offers its product to the kernel (`offered_product`:
    a quantised linear). qk_norm's per-head RMSNorms (Qwen3) run there too.

    A call returns None for more rows than the streaming kernel takes (STREAM_ROWS), another
    dtype, or a MoE that would not decode them (`MoE.decodes`), and the caller then runs the
    block's parts. It holds the weights as they are when it is made, their memory read through
    raw addresses, as the rest of a `TokenStep` does."""

    def __init__(self, block: nn.Module) -> None:
        attn, mlp, norms = block.attn, block.mlp, (block.attn_norm, block.mlp_norm)
        self.moe = mlp if isinstance(mlp, MoE) else None
        dense = () if self.moe is not None else (mlp.up, mlp.down)
        products = [_product_weights(m) for m in (attn.qkv, attn.out, *dense)]
        biases = [m.bias for m in (attn.qkv, attn.out, *dense)]
        product_at = [at for (weights, _), b in zip(products, biases) for at in (weights, 0 if b is None else b.data_ptr())]
        norm_biases = [getattr(n, "bias", None) for n in norms]  # LayerNorm's (RMSNorm has none)
        self.held = [*(p for _, held in products for p in held), *biases, *(n.weight for n in norms), *norm_biases]
        n_q, n_kv, _ = attn.heads
        ff = 1 if self.moe is not None else mlp.down.in_features  # a MoE's experts' widths are its own
        self.weights = (attn.qkv.in_features, ff, n_q, n_kv, attn.head_dim,
                        norms[0].weight.data_ptr(), norms[1].weight.data_ptr(), *product_at, *(0,) * (8 - len(product_at)),
                        int(block.parallel), float(norms[0].eps), float(norms[1].eps),
                        1.0 if attn.q_factor is None else attn.q_factor, *self._qk_norms(attn),
                        int(type(norms[0]) is nn.LayerNorm), *(0 if b is None else b.data_ptr() for b in norm_biases),
                        ACTIVATIONS[mlp.kind], *self._window(attn))
        self.moe_weights = None if self.moe is None else self._moe_weights(self.moe)
        self.layer, self.head_dim, self.use_rope = attn.layer, attn.head_dim, attn.use_rope
        # strided, fixed or bigbird: the kernel attends to the keys of a step mask (KVCache.step_mask)
        self.picked = attn.pattern if attn.pattern is not None and attn.pattern.kind not in WINDOWS else None

    @staticmethod
    def _window(attn: Attention) -> tuple[int, int]:
        """The kernel's window entries: a sliding or dilated window's keys and dilation; 0 for the
        others (dense, or a pattern whose keys `KVCache.step_mask` picks)."""
        pattern = attn.pattern
        if pattern is None or pattern.kind not in WINDOWS:
            return 0, 1
        return pattern.window, pattern.dilation if pattern.kind == "dilated" else 1

    def _qk_norms(self, attn: Attention) -> tuple[int, int, float]:
        """The kernel's qk_norm entries: the q and k norms' gains and their eps, or none."""
        if attn.q_norm is None:
            return 0, 0, 0.0
        self.held += [attn.q_norm.weight, attn.k_norm.weight]
        return attn.q_norm.weight.data_ptr(), attn.k_norm.weight.data_ptr(), float(attn.q_norm.eps)

    def _moe_weights(self, moe: MoE) -> tuple:
        """The kernel's MoE entries (csrc/step.c, LAYER_MOE) but the per-call outputs."""
        ups, downs, ff, experts_held = _expert_products(moe)
        shared, center, router = moe.shared, moe.router_center, moe.router.weight
        self.held += [router, center, *experts_held]
        shared_entries = (0, 0, 0, 0, 0)
        if shared is not None:
            (up, up_held), (down, down_held) = _product_weights(shared.up), _product_weights(shared.down)
            self.held += [*up_held, *down_held, shared.up.bias, shared.down.bias]
            bias_at = [0 if b is None else b.data_ptr() for b in (shared.up.bias, shared.down.bias)]
            shared_entries = (shared.down.in_features, up, bias_at[0], down, bias_at[1])
        return (moe.settings.n_experts, moe.settings.top_k, ff, router.data_ptr(),
                0 if center is None else center.data_ptr(), float(moe.settings.routed_scale), tuple(ups), tuple(downs),
                *shared_entries)

    @staticmethod
    def takes(block: nn.Module) -> bool:
        """Whether the block is plain (class note) and the kernels are here to run it."""
        kernel = step_kernels()
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if (kernel is None or not streams() or type(attn) is not Attention or mlp is None
                or attn.head_dim > MAX_HEAD_DIM):
            return False
        if not _norms_take([block.attn_norm, block.mlp_norm]):
            return False
        q_norm, k_norm = attn.q_norm, attn.k_norm  # qk_norm (Qwen3): RMSNorms of one eps on every q and k head
        if q_norm is not None and not (type(q_norm) is RMSNorm and _norms_take([q_norm, k_norm])
                                       and q_norm.eps == k_norm.eps):
            return False
        return all(_product_weights(m) is not None for m in (attn.qkv, attn.out)) and _feed_forward_takes(mlp)

    def __call__(self, x: torch.Tensor, rope: Rope, cache: KVCache) -> torch.Tensor | None:
        B = x.shape[0]
        keys, values, key_mask = cache.keys[self.layer], cache.values[self.layer], cache.key_mask
        if B > STREAM_ROWS or not (_fp32_cpu(x) and _fp32_cpu(keys)) or (self.use_rope and not _fp32_cpu(rope[0])):
            return None
        x = x.contiguous()
        moe = None
        if self.moe is not None:
            if not self.moe.decodes(x.view(B, -1)):
                return None
            settings = self.moe.settings
            probs, experts = torch.empty(B, settings.n_experts), torch.empty(B, settings.top_k, dtype=torch.int64)
            moe = (*self.moe_weights, probs.data_ptr(), experts.data_ptr())
        if self.picked is not None:  # the keys the pattern lets this token see, padding left out
            key_mask = cache.step_mask(self.picked)
        y = torch.empty_like(x)
        cos, sin = (t.contiguous() for t in rope) if self.use_rope else (None, None)
        mask_stride = 0 if key_mask is None or key_mask.shape[0] == 1 else key_mask.shape[1]  # 0: one row for all
        step_kernels().layer(
            self.weights, x.data_ptr(), y.data_ptr(), B, keys.data_ptr(), values.data_ptr(), keys.shape[2],
            cache.length, 0 if key_mask is None else key_mask.data_ptr(), mask_stride,
            0 if cos is None else cos.data_ptr(), 0 if sin is None else sin.data_ptr(),
            0 if cos is None or cos.numel() == self.head_dim else self.head_dim, torch.get_num_threads(), moe,
            int(keys.shape[2] != cache.max_len))  # a ring of the window's last keys
        if moe is not None:
            self.moe.record_routing(probs, experts)
        return y
