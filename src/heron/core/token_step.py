"""One new token per row through a Transformer without nn.Module dispatch:
the decoding step, flattened.

Why. On two CPU cores a batch-1 decoding step of the `small` preset spent
about as long on fixed costs as on reading its 120 MB of weights: the same
model at d_model 64, whose weights cost next to nothing to read, still took
~5 ms a step. Little of that was arithmetic: ~540 aten calls a step, and
around them nn.Module's call machinery for ten modules a layer, eleven hook
points a layer and the shape checks and branches of a forward written for
any number of tokens. `TokenStep` runs the same ops in the same order
straight from modules and weights it looks up once per decoder (the weight
blocks of the few-row products included, core/linear.py), so its logits
equal `Transformer.forward`'s bit for bit (tests/core/test_token_step.py).
The d_model-64 step fell to ~2.5 ms, the `small` one from ~10.2 to ~8.1 ms
(interleaved, 2026-11-29).

Where Heron's step kernels are built (core/step_kernels.py, csrc/step.c), a
plain layer (RMSNorm or LayerNorm, dense or sliding/dilated-window attention
with or without qk_norm, an MLP with SwiGLU or GELU or a MoE of such experts, its products fp32 weights laid out for the streaming product or
quantised ones that offer theirs to the kernel) runs in one kernel call, and
the other layers' attention
between its products, their RMSNorms and the embedding lookup run through
kernels too: the same arithmetic summed in another order, so the logits
equal the forward's to fp32 rounding instead of bit for bit. On the Zen 5
host a `small` step's aten calls fell from ~750 to 30, and the step of the
same model at d_model 64 from ~1.0 to ~0.45 ms; decoding the `small`
checkpoints of benchmarks/bench_compress.py ran 1.20x as fast (lockstep,
2026-12-02), 1.13x of it from running each plain layer in one call.

Heron's plain parts run flattened: `Linear`, RMSNorm, LayerNorm, dense
attention (RoPE or not, qk_norm or not, any head grouping, SDPA over the KV cache) and the
dense MLP; a MoE goes straight to its few-token path (`MoE.decode_step`),
and a layer that offers a product made for repeated calls (`decode_product`:
a quantised linear) runs through it. Anything else -- a sparse-attention
layer, a swapped-in module -- runs through its own `forward` with the
arguments `Block` would give it, so every model decodes through here.

It runs only while autograd is off and no hook of any kind is attached to
any module (`ready`): it calls `forward` directly, which runs no module
hooks. Otherwise the decoder calls the model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from heron.core.attention import Attention
from heron.core.kv_cache import KVCache
from heron.core.linear import decoding_product
from heron.core.mlp import MLP
from heron.core.moe import MoE
from heron.core.norms import RMSNorm, rms_norm
from heron.core.rope import apply_rope
from heron.core.step_kernels import LayerStep, attend_new_token, embedding_step, rms_norm_step
from heron.core.transformer import Transformer, causal_padding_mask

Part = Callable[[torch.Tensor], torch.Tensor]  # (B, 1, d_in) -> (B, 1, d_out)
Rope = tuple[torch.Tensor, torch.Tensor] | None


def _norm(module: nn.Module) -> Part:
    """Heron's RMSNorm through the step kernel, or as its arithmetic without it; torch's
    LayerNorm as its arithmetic; anything else as its forward."""
    if type(module) is nn.LayerNorm:
        shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
        return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    if type(module) is not RMSNorm or module.weight is None or module.eps is None:
        return module.forward
    through_kernel = rms_norm_step(module)
    if through_kernel is not None:
        return through_kernel
    weight = module.weight
    eps, width = (torch.tensor(float(v), device=weight.device) for v in (module.eps, weight.shape[0]))
    return lambda x: rms_norm(x, weight, eps, width) if x.dtype == torch.float32 else module.forward(x)


@dataclass(frozen=True)
class _DenseAttention:
    """A dense `Attention` layer's parts for one token per row."""

    layer: int
    qkv: Part
    out: Part
    heads: tuple[int, int, int]  # q, k, v heads in the qkv output
    head_dim: int
    q_factor: float | None
    use_rope: bool
    qk_norms: tuple[Part, Part] | None

    def __call__(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """`Attention.forward` for T = 1 with a cache and no hooks: (B, 1, d).
        Between the two products, the step kernel where it takes the layer (all but
        qk_norm's), else torch's ops."""
        B = x.shape[0]
        n_q, n_kv, _ = self.heads
        qkv = self.qkv(x)  # (B, 1, (nh + 2 nkv) hd)
        if self.qk_norms is None:
            y = attend_new_token(qkv, (n_q, n_kv), self.head_dim, rope if self.use_rope else None, self.q_factor,
                                 cache, self.layer)
            if y is not None:
                return self.out(y)
        heads = qkv.view(B, -1, 1, self.head_dim)  # (B, nh + 2 nkv, 1, hd): one token, no transpose
        if self.qk_norms is not None:  # each normalised, then each rotated, as Attention does
            q, k, v = heads.split(self.heads, dim=1)
            q, k = self.qk_norms[0](q), self.qk_norms[1](k)
            if self.use_rope:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        elif self.use_rope:  # q and k rotated in one pass, as Attention does
            q_k = apply_rope(heads[:, : n_q + n_kv], *rope)  # (B, nh + nkv, 1, hd)
            q, k, v = q_k[:, :n_q], q_k[:, n_q:], heads[:, n_q + n_kv :]
        else:
            q, k, v = heads.split(self.heads, dim=1)
        if self.q_factor is not None:
            q = q * self.q_factor
        k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_kv != n_q)  # (B, nh, 1, hd)
        return self.out(y.reshape(B, 1, n_q * self.head_dim))  # one token: (B, nh, 1, hd) is (B, 1, nh * hd)


def _attention(attn: Attention) -> Callable[..., torch.Tensor]:
    if attn.pattern is not None:  # sparse: the module's own decoding path
        return attn.forward
    qk_norms = None if attn.q_norm is None else (_norm(attn.q_norm), _norm(attn.k_norm))
    dense = _DenseAttention(attn.layer, decoding_product(attn.qkv), decoding_product(attn.out), attn.heads, attn.head_dim,
                            attn.q_factor, attn.use_rope, qk_norms)
    return lambda x, rope, mask, cache, key_mask: dense(x, rope, mask, cache)


def _feed_forward(mlp: nn.Module | None) -> Part | None:
    """The dense MLP as its arithmetic, a MoE through its decoding path;
    anything else (or a MoE that would not decode) as its forward."""
    if isinstance(mlp, MoE):
        step = mlp.decode_step()
        return lambda x: step(x) if mlp.decodes(x.view(-1, x.shape[-1])) else _forward_popping(mlp, x)
    if type(mlp) is not MLP:
        return None if mlp is None else mlp.forward
    return mlp.decode_step()


def _forward_popping(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """A MoE's forward, its (zero) auxiliary loss collected as the model would."""
    y = moe.forward(x)
    moe.pop_aux_loss()
    return y


class TokenStep:
    """`model(ids[:, None], cache=cache).logits[:, -1]`, flattened (module note).

    Built once per decoder: it holds the model's modules and weights as they
    are then, so a module swapped into the model later is not seen.
    """

    def __init__(self, model: Transformer) -> None:
        self.model = model
        # Each module's hook tables (dicts that live as long as the module): `ready` reads them all.
        self.hook_tables = [t for m in model.modules() for t in (m._forward_hooks, m._forward_pre_hooks)]
        self.layers = [(LayerStep(b) if LayerStep.takes(b) else None, _norm(b.attn_norm), _attention(b.attn),
                        None if b.mlp is None else _norm(b.mlp_norm), _feed_forward(b.mlp)) for b in model.blocks]
        self.norm, self.head = _norm(model.norm), decoding_product(model.lm_head)
        self.embed = embedding_step(model.embed) or (lambda ids: model.embed.forward(ids[:, None]))
        self.parallel = model.config.parallel_residual

    def ready(self) -> bool:
        """Whether the step may run: autograd off and no module hook anywhere
        (torch's global module hooks included)."""
        hooks = nn.modules.module
        if torch.is_grad_enabled() or hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
            return False
        return not any(self.hook_tables)

    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """(B, V) next-token logits after ids (B,), whose keys and values it writes into the cache."""
        model, past = self.model, cache.length
        cache.check_room(1, ids.shape[0])
        cache.record_mask(None, 1)
        key_mask = cache.key_mask[:, : past + 1] if cache.key_mask is not None else None
        x = self.embed(ids)  # (B, 1, d)
        if key_mask is None and model.pos_embed is None:  # RoPE's rows as views: no arange, no indexing (~50 us)
            rope = None if model.config.positions != "rope" else (model.rope_cos.narrow(0, past, 1),
                                                                  model.rope_sin.narrow(0, past, 1))  # (1, hd)
        else:
            positions = model.default_positions(past, 1, key_mask, ids.device)  # (1,) or (B, 1)
            if model.pos_embed is not None:
                x = x + model.pos_embed.forward(positions)
            rope = model.rope_for(positions)
        mask = causal_padding_mask(past, 1, key_mask, ids.device) if key_mask is not None else None
        for whole, attn_norm, attention, mlp_norm, mlp in self.layers:
            y = whole(x, rope, cache) if whole is not None else None  # a plain layer in one kernel call
            if y is not None:
                x = y
                continue
            mid = x + attention(attn_norm(x), rope, mask, cache, key_mask)
            if mlp is not None:  # added in Block's order, so the sums round alike
                mid = mid + mlp(mlp_norm(x if self.parallel else mid))
            x = mid
        cache.advance(1)
        return self.head(self.norm(x))[:, -1]  # (B, V)
