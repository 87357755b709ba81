"""The decoder-only Transformer every Heron model is an instance of."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from heron.core.attention import Attention
from heron.core.config import ModelConfig
from heron.core.head_loss import head_cross_entropy
from heron.core.hooks import HookFn, HookPoint, attach_hooks
from heron.core.kv_cache import KVCache
from heron.core.linear import STREAM_ROWS, Linear, set_decode_layout
from heron.core.mlp import MLP
from heron.core.moe import MoE
from heron.core.norms import make_norm
from heron.core.rope import rope_tables
from heron.core.sparse import token_index


@dataclass
class TransformerOutput:
    """What `Transformer.forward` returns (fields, not a tuple: `out.logits`, `out.loss`)."""

    logits: torch.Tensor | None  # (B, T, V), or (B, 1, V) with last_only; None when given targets
    aux_loss: torch.Tensor  # scalar: auxiliary losses (MoE load balance), zero for dense models
    cache: KVCache | None
    loss: torch.Tensor | None = None  # given targets: fp32 cross-entropy, summed () or (B, T); or a head_loss's


# Scores the final norm's output (B, T, d) through the output head module against the
# targets (B, T): the loss `forward` returns in place of the logits (e.g. distillation's,
# compress/distill_loss.py). The default is `Transformer.head_loss`, cross-entropy.
HeadLoss = Callable[[torch.Tensor, nn.Module, torch.Tensor], torch.Tensor]

# config.feed_forward kinds -> the module a block's `mlp` is; None: the block has none.
FEED_FORWARD_MODULES: dict[str, Callable[[ModelConfig], nn.Module] | None] = {"dense": MLP, "moe": MoE, "none": None}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); with
    `parallel_residual` the MLP reads the block's input too (GPT-NeoX), and
    hook_resid_mid still carries x + attn_out.

    `mlp` is a MoE on the layers `config.feed_forward` marks "moe"; the name
    stays `mlp` so hook names (blocks.3.mlp.hook_router_probs) keep one shape.
    A "none" layer is attention-only (Elhage et al. 2021): no `mlp`, no
    `mlp_norm`, and hook_mlp_out carries zeros, so every block has the same
    hook points and the residual stream is still embed + sum(attn_out + mlp_out).
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        feed_forward = FEED_FORWARD_MODULES[config.feed_forward_kind(layer)]
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = None if feed_forward is None else make_norm(config)
        self.mlp = None if feed_forward is None else feed_forward(config)
        self.parallel = config.parallel_residual
        self.hook_resid_pre = HookPoint()  # (B, T, d)
        self.hook_attn_out = HookPoint()  # (B, T, d)
        self.hook_resid_mid = HookPoint()  # (B, T, d)
        self.hook_mlp_out = HookPoint()  # (B, T, d)
        self.hook_resid_post = HookPoint()  # (B, T, d)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        key_mask: torch.Tensor | None = None,
        counted: torch.Tensor | None = None,  # (B, T) bool: the tokens a MoE's statistics count
    ) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        mid = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.attn_norm(x), rope, mask, cache, key_mask)))
        mlp_in = x if self.parallel else mid
        if self.mlp is None:
            mlp_out = torch.zeros_like(mid)  # (B, T, d)
        elif isinstance(self.mlp, MoE):
            mlp_out = self.mlp(self.mlp_norm(mlp_in), counted)
        else:
            mlp_out = self.mlp(self.mlp_norm(mlp_in))
        return self.hook_resid_post(mid + self.hook_mlp_out(mlp_out))


def token_flags(name: str, mask: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | None:
    """A (B, T) mask of real tokens as bool. Hugging Face tokenizers hand out 0/1 integer masks,
    taken as nonzero = real token; a float mask is refused, as it may be additive (0 / -inf)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a ({batch}, {tokens}) bool tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, tokens):
        raise ValueError(f"{name}: expected shape ({batch}, {tokens}), one flag per input token, "
                         f"got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"{name}: expected bool (False = padding) or 0/1 integers, got {mask.dtype} "
                         "(a float mask may be additive: pass mask == 0 for a 0/-inf one)")
    return mask != 0


class Transformer(nn.Module):
    """A decoder-only Transformer built from a ModelConfig: token (or given) embeddings,
    `n_layers` blocks of attention (each layer's pattern) and feed-forward (dense MLP,
    Mixture of Experts or none), a final norm and the output head. `forward` returns a
    TransformerOutput; every activation worth inspecting passes a named hook point
    (`hooks`, core/hooks.py)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model) if config.positions == "learned" else None
        self.hook_embed = HookPoint()  # (B, T, d): token (+ position) embeddings
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.d_model, config.vocab_size if config.head == "lm" else 1, bias=False)
        self.tie_weights()
        if config.positions == "rope":
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)  # (L, hd)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)  # (L, hd), first half negated
        self.reset_buffers()
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config ties them
        (again after `to_empty`, which allocates each parameter apart)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_buffers(self) -> None:
        """Compute the RoPE tables (derived from the config, never saved), e.g.
        after `to_empty` on a model built on the meta device.

        In the dtype of the model's floating-point parameters, the same numbers
        `.to(dtype)` makes of the fp32 tables: a model rebuilt in bf16 (a bf16
        import, a pruned bf16 model) whose tables stayed fp32 would have
        `apply_rope` promote q and k to fp32 against a bf16 v, and attention fails."""
        if self.config.positions == "rope":
            c, device = self.config, self.rope_cos.device
            dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)
            cos, sin = rope_tables(c.max_seq_len, c.resolved_head_dim, c.rope_theta, c.rope_scaling, c.rotary_dim)
            self.rope_cos, self.rope_sin = cos.to(device, dtype), sin.to(device, dtype)

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, std), with the projections that write to
        the residual stream scaled by 1/sqrt(2 * n_layers) (Radford et al. 2019)."""
        std, residual = self.config.init_std, (2 * self.config.n_layers) ** -0.5
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = residual if name.endswith(("attn.out", "mlp.down", "mlp.shared.down")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MoE):  # stacked expert weights: the same rule, per expert
                module.reset_parameters(std, residual)

    def train(self, mode: bool = True) -> Transformer:
        """Set training mode; training lays the weights back out row-major
        (a batch-1 decode may have made them input-major, core/linear.py),
        where a training step's products run ~8% faster."""
        if mode:
            set_decode_layout(self, rows=STREAM_ROWS + 1)  # more rows than any few-row product takes: row-major
        return super().train(mode)

    def hooks(self, fns: Mapping[str, HookFn] | list[tuple[str, HookFn]]) -> AbstractContextManager[None]:
        """`with model.hooks({"blocks.0.hook_resid_post": fn}): ...`"""
        return attach_hooks(self, fns)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T) long
        *,
        input_embeds: torch.Tensor | None = None,  # (B, T, d): e.g. image or audio prefixes
        positions: torch.Tensor | None = None,  # (T,), (1, T) or (B, T) long
        attention_mask: torch.Tensor | None = None,  # (B, T) bool, False = padding
        cache: KVCache | None = None,
        last_only: bool = False,  # logits for the final position only
        token_mask: torch.Tensor | None = None,  # (B, T) bool: tokens a MoE's statistics count; below
        targets: torch.Tensor | None = None,  # (B, T) long: next tokens, IGNORE_INDEX where none; below
        reduction: str = "sum",  # of the loss given targets: "sum" or "none"
        head_loss: HeadLoss | None = None,  # given targets, the loss in place of cross-entropy; below
    ) -> TransformerOutput:
        """token_mask: the tokens whose routing the MoE layers' statistics,
        balancing losses and centring mean count, False for padding (which is
        routed like any token but weighs nothing there); None: attention_mask
        without a cache, else every token. Right padding needs no attention
        mask (causal attention never looks ahead) but still wants this one:
        alignment passes it.

        targets: return `loss`, the cross-entropy of the logits against them
        summed over the targets kept, in place of the logits, which are then
        never made whole (core/head_loss.py: a training step's largest
        tensors, and on the CPU a few percent of its time). reduction "none":
        each position's, (B, T), 0 where the target is IGNORE_INDEX; minus
        the log-probabilities of the targets, which alignment weighs.

        head_loss: scores the final norm's output with another loss, called as
        head_loss(hidden (B, T, d), self.lm_head, targets): inside the forward,
        so a wrapped model (DDP, FSDP) runs it with its parameters gathered."""
        if targets is None and reduction != "sum":
            raise ValueError(f"reduction: {reduction!r} reduces the loss, which needs targets")
        if targets is None and head_loss is not None:
            raise ValueError("head_loss: given without targets, which it scores the head's output against")
        if head_loss is not None and reduction != "sum":
            raise ValueError(f"reduction: {reduction!r} is cross-entropy's; a head_loss reduces its own loss")
        x = self._embed_tokens(input_ids, input_embeds)  # (B, T, d)
        B, T, _ = x.shape
        attention_mask = token_flags("attention_mask", attention_mask, B, T)
        token_mask = token_flags("token_mask", token_mask, B, T)
        past = cache.length if cache is not None else 0
        if cache is not None:
            cache.check_room(T, B)
            cache.record_mask(attention_mask, T)
        key_mask = cache.key_mask[:, : past + T] if cache is not None and cache.key_mask is not None else attention_mask
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if positions is None:
            positions = self.default_positions(past, T, key_mask, x.device)  # all < past + T: no check needed
        else:
            check_positions(positions, B, T, self.config.max_seq_len)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = self.hook_embed(x)
        rope = self.rope_for(positions)
        mask = causal_padding_mask(past, T, key_mask, x.device) if (cache is not None and T > 1) or key_mask is not None else None
        counted = token_mask if token_mask is not None or cache is not None else attention_mask  # (B, T) or None
        for block in self.blocks:
            x = block(x, rope, mask, cache, key_mask, counted)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        aux = sum((b.mlp.pop_aux_loss() for b in self.blocks if isinstance(b.mlp, MoE)), x.new_zeros(()))
        if targets is not None:
            hidden = self.norm(x)  # (B, T, d)
            if head_loss is not None:
                loss = head_loss(hidden, self.lm_head, targets)
            else:
                loss = self.head_loss(hidden, targets, reduction)
            return TransformerOutput(logits=None, aux_loss=aux, cache=cache, loss=loss)
        logits = self.lm_head(self.norm(x))  # (B, T, V), or (B, T, 1) for a scalar head
        return TransformerOutput(logits=logits, aux_loss=aux, cache=cache)

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """Cross-entropy of the output head on the final norm's output (B, T, d), summed
        or (reduction "none") per position: fused when the head is a plain linear layer,
        else through its logits (a head swapped for a quantised or adapted layer is always
        called as a module; core/head_loss.py's `fusable_weight` decides)."""
        if self.config.head != "lm":
            raise ValueError(f"targets: a model with head {self.config.head!r} has no next-token loss")
        return head_cross_entropy(hidden, self.lm_head, targets, reduction)

    def _embed_tokens(self, input_ids: torch.Tensor | None, input_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (input_embeds is None):
            raise ValueError("pass exactly one of input_ids or input_embeds")
        if input_embeds is not None:
            if input_embeds.dim() != 3 or input_embeds.shape[-1] != self.config.d_model:
                raise ValueError(f"input_embeds: expected (B, T, {self.config.d_model}), got {tuple(input_embeds.shape)}")
            if input_embeds.shape[0] == 0 or input_embeds.shape[1] == 0:
                raise ValueError(f"input_embeds: needs at least one row of at least one token, got "
                                 f"{tuple(input_embeds.shape)}")
            return input_embeds
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids: expected a (B, T) tensor of token ids, got {type(input_ids).__name__} "
                            "(torch.tensor([ids]) makes one)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected (B, T), got {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids: needs at least one row of at least one token, got {tuple(input_ids.shape)}")
        return self.embed(input_ids)

    @staticmethod
    def default_positions(past: int, T: int, key_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """0, 1, 2, ... counted over real tokens only, so left padding shifts nothing:
        the same indices sparse patterns are rules on (`token_index`)."""
        if key_mask is None:
            return torch.arange(past, past + T, device=device)  # (T,)
        return token_index(key_mask, past + T)[:, past:].clamp(min=0)  # (B, T)

    def rope_for(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The RoPE (cos, signed sin) rows of positions (T,) or (B, T), shaped
        to broadcast over heads; None for a model without RoPE."""
        if self.config.positions != "rope":
            return None
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, hd) or (B, T, hd)
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd): broadcast over heads
        return cos, sin


def check_positions(positions: torch.Tensor, B: int, T: int, max_seq_len: int) -> None:
    """ValueError naming `positions` unless they are int64 or int32 indices shaped (T,), (1, T)
    or (B, T) for the input, each in [0, max_seq_len): a negative one would read the RoPE
    table from its end (rope_cos[-3] is a real row) and the rest fail deep inside. One
    host sync for both bounds, paid only for a caller's positions."""
    if positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"positions: expected int64 or int32 indices, got {positions.dtype}")
    if tuple(positions.shape) not in ((T,), (1, T), (B, T)):  # (1, T): Hugging Face's position_ids
        raise ValueError(f"positions: expected ({T},), (1, {T}) or ({B}, {T}) for the input, "
                         f"got {tuple(positions.shape)}")
    if positions.numel():
        low, high = torch.stack(torch.aminmax(positions)).tolist()
        if low < 0:
            raise ValueError(f"positions: {low} is negative")
        if high >= max_seq_len:
            raise ValueError(f"positions: {high} exceeds max_seq_len {max_seq_len}")


def causal_padding_mask(past: int, T: int, key_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(B or 1, 1, T, past + T) bool: causal, and padding keys hidden.

    A query may always see its own key, so a padding row attends to itself
    instead of to nothing (an all-masked row would turn into NaN).
    """
    S = past + T
    query_pos = torch.arange(past, S, device=device).unsqueeze(-1)  # (T, 1)
    key_pos = torch.arange(S, device=device)  # (S,)
    causal = key_pos <= query_pos  # (T, S)
    if key_mask is None:
        return causal[None, None]
    visible = causal & (key_mask[:, None, :] | (key_pos == query_pos))  # (B, T, S)
    return visible.unsqueeze(1)


def check_next_token_head(what: str, model: nn.Module, instead: str) -> None:
    """ValueError naming `what` for a model whose head gives no next-token logits
    (head "scalar": one score per position, a reward or value model), saying what
    works `instead`, rather than a generation, report or metric built on a one-token
    vocabulary (its scores would "sample" token 0 at every step)."""
    head = getattr(getattr(model, "config", None), "head", "lm")
    if head != "lm":
        raise ValueError(f"{what}: a model with head {head!r} gives one score per position, not next-token "
                         f"logits; {instead}")
