"""Causal self-attention: multi-head, grouped-query and multi-query."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from heron.core.config import ModelConfig
from heron.core.hooks import HookPoint
from heron.core.kv_cache import KVCache
from heron.core.linear import Linear
from heron.core.norms import RMSNorm
from heron.core.rope import apply_rope, token_major
from heron.core.sparse import allowed, sparse_attention, token_index


class Attention(nn.Module):
    """Self-attention through `scaled_dot_product_attention`.

    q, k and v come from one fused `qkv` linear. Query heads share key/value
    heads in groups of n_heads // n_kv_heads (Ainslie et al. 2023, GQA);
    n_kv_heads == 1 is multi-query attention (Shazeer 2019). With qk_norm each
    query and key head is RMS-normalised over its head_dim before RoPE, one
    gain for all query heads and one for all key heads (Qwen3).
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        pattern = config.attention_pattern(layer)
        self.pattern = None if pattern.kind == "dense" else pattern  # see core/sparse.py
        self.n_heads = config.n_heads
        self.n_kv_heads = config.resolved_kv_heads
        self.head_dim = config.resolved_head_dim
        self.use_rope = config.positions == "rope"
        # Every engine scales q.k by 1/sqrt(hd); another scale is folded into q once.
        self.q_factor = None if config.attn_scale is None else config.attn_scale * math.sqrt(self.head_dim)
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.heads = (self.n_heads, self.n_kv_heads, self.n_kv_heads)  # the qkv output's q, k, v heads
        self.qkv = Linear(config.d_model, q_width + 2 * kv_width, bias=config.qkv_bias)
        self.out = Linear(q_width, config.d_model, bias=config.out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.hook_q = HookPoint()  # (B, n_heads, T, hd), after qk_norm, before RoPE
        self.hook_k = HookPoint()  # (B, n_kv_heads, T, hd), after qk_norm, before RoPE
        self.hook_v = HookPoint()  # (B, n_kv_heads, T, hd)
        self.hook_pattern = HookPoint()  # (B, n_heads, T, S), keys in position order: computed only when hooked
        self.hook_z = HookPoint()  # (B, T, n_heads * hd): heads' outputs before `out`

    def forward(
        self,
        x: torch.Tensor,  # (B, T, d)
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,  # (B, 1, T, S) bool, True = may attend; None = causal
        cache: KVCache | None,
        key_mask: torch.Tensor | None = None,  # (B, S) bool, False = padding
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # Split along heads in the (B, T, heads, hd) layout qkv writes, and RoPE q and k there:
        # the backward then hands qkv its gradient by one concatenation, where slicing a
        # transposed view zero-fills, copies and transposes it (3-4% of a `small` layer's
        # forward and backward). The numbers are the same, bit for bit.
        rows = self.qkv(x).view(B, T, -1, self.head_dim)  # (B, T, nh + 2 nkv, hd)
        qk_rows, v_rows = rows.split((self.n_heads + self.n_kv_heads, self.n_kv_heads), dim=2)
        projected_q, projected_k = qk_rows.transpose(1, 2).split(self.heads[:2], dim=1)
        v = v_rows.transpose(1, 2)
        if self.q_norm is not None:
            projected_q, projected_k = self.q_norm(projected_q), self.k_norm(projected_k)
        q, k, v = self.hook_q(projected_q), self.hook_k(projected_k), self.hook_v(v)  # (B, nh | nkv | nkv, T, hd)
        if self.use_rope:
            cos, sin = rope
            if q is projected_q and k is projected_k and self.q_norm is None:  # views of qk_rows: one pass over both
                q_k = apply_rope(qk_rows, token_major(cos), token_major(sin))  # (B, T, nh + nkv, hd)
                q, k = q_k.transpose(1, 2).split(self.heads[:2], dim=1)
            else:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.q_factor is not None:
            q = q * self.q_factor
        if self.pattern is not None:
            y = self._sparse(q, k, v, cache, key_mask)
        else:
            if cache is not None:
                k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
            y = self._attend(q, k, v, mask, is_causal=mask is None and cache is None)
        y = self.hook_z(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        return self.out(y)  # (B, T, d)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        """(B, nh, T, hd). A single new query with no padding sees every cached key: no mask at all."""
        if self.hook_pattern.active:
            return self._explicit_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads
        )

    def _sparse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention under this layer's sparse pattern, a rule on real-token indices.

        A whole sequence (training, or a prefill into an empty cache) runs the
        blocked engines; queries after cached tokens (decoding) attend to the
        keys the cache returns, under the rule's mask over those keys only.
        """
        T = q.shape[2]
        past = cache.length if cache is not None else 0
        if past == 0 and not self.hook_pattern.active:
            y = sparse_attention(q, k, v, self.pattern, key_mask)
            if cache is not None:
                cache.update_sparse(self.layer, k, v)
            return y
        if cache is None:
            index = token_index(key_mask, T, q.device)  # (B or 1, T)
            query_index = key_index = index
            real = key_mask
        else:
            k, v, tokens = cache.update_sparse(self.layer, k, v)  # (B, nkv, S, hd), tokens (S,)
            if self.hook_pattern.active:  # a ring holds keys in slot order: the pattern's in position order
                order = tokens.argsort()
                k, v, tokens = k[:, :, order], v[:, :, order], tokens[order]
            index = cache.token_index(past + T)  # (B or 1, past + T)
            query_index, key_index = index[:, past:], index[:, tokens]
            real = cache.key_mask[:, tokens] if cache.key_mask is not None else None
        mask = allowed(self.pattern, query_index[:, :, None], key_index[:, None, :])  # (B, T, S)
        if real is not None:
            mask = mask & real[:, None, :]
        mask = mask | ~mask.any(-1, keepdim=True)  # a padding query with nothing to see: anything, not NaN
        return self._attend(q, k, v, mask.unsqueeze(1), is_causal=False)

    def _explicit_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention with the probabilities materialised, for the pattern hook."""
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, S, hd)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, nh, T, S)
        if mask is None:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        pattern = self.hook_pattern(scores.masked_fill(~mask, float("-inf")).softmax(dim=-1))
        return pattern @ v  # (B, nh, T, hd)
