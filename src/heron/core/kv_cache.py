"""A preallocated key/value cache for incremental decoding.

Storage for the whole generation is allocated once; each forward writes its
new keys and values in place and attends over a view of the filled prefix,
so a decode step copies only the new token's keys and values.

A layer whose attention pattern has a bounded span (sliding or dilated
windows) keeps only its last `span` keys, in a ring: its memory is bounded by
the window, not by the generation length (only a left-padded batch's
(B, max_len) bool padding mask spans the whole generation).
"""
from __future__ import annotations

import torch

from heron.core.config import AttentionPattern, ModelConfig
from heron.core.sparse import allowed, token_index


class KVCache:
    """Keys and values of every layer, (B, n_kv_heads, slots, head_dim) each,
    where slots is max_len, or a ring of `span` slots for bounded patterns.

    `key_mask` (B, max_len) marks real tokens when a batch is left-padded; it
    is None while every position is real.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], max_len: int) -> None:
        self.keys = keys
        self.values = values
        self.length = 0
        self.key_mask: torch.Tensor | None = None
        self._max_len = max_len
        self._step_masks: dict[tuple[AttentionPattern, int], torch.Tensor] = {}  # `step_mask`'s, this step's

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        if max_len > config.max_seq_len:
            raise ValueError(f"max_len: {max_len} exceeds the model's max_seq_len {config.max_seq_len}")
        keys, values = [], []
        for layer in range(config.n_layers):
            span = config.attention_pattern(layer).span
            slots = max_len if span is None else min(span, max_len)
            shape = (batch_size, config.resolved_kv_heads, slots, config.resolved_head_dim)
            keys.append(torch.empty(shape, dtype=dtype, device=device))
            values.append(torch.empty(shape, dtype=dtype, device=device))
        return cls(keys, values, max_len)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def nbytes(self) -> int:
        """Bytes held for keys and values."""
        return sum(t.nbytes for t in self.keys + self.values)

    def check_room(self, new_tokens: int, rows: int) -> None:
        """ValueError unless `rows` new rows of `new_tokens` tokens fit: the cache's batch size (one
        row written into a cache of several broadcasts into every row, silently; a bigbird layer
        then even ran on) and its room. Once a forward, before any layer writes."""
        if rows != self.batch_size:
            raise ValueError(f"cache: allocated for a batch of {self.batch_size} rows, got an input of {rows}; "
                             "allocate a KVCache for this batch size")
        if self.length + new_tokens > self.max_len:
            raise ValueError(
                f"KV cache full: {self.length} cached + {new_tokens} new tokens > max_len {self.max_len}"
            )

    def record_mask(self, new_mask: torch.Tensor | None, new_tokens: int) -> None:
        """Remember which of the new positions are real tokens (B, T) bool."""
        self._step_masks.clear()
        if new_mask is None:
            if self.key_mask is not None:
                self.key_mask[:, self.length : self.length + new_tokens] = True
            return
        if self.key_mask is None:
            self.key_mask = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=new_mask.device)
        self.key_mask[:, self.length : self.length + new_tokens] = new_mask

    def token_index(self, end: int) -> torch.Tensor:
        """(B or 1, end) long: each cached token's index among its row's real
        tokens, the positions sparse patterns are rules on."""
        mask = self.key_mask[:, :end] if self.key_mask is not None else None
        return token_index(mask, end, self.keys[0].device)

    def step_mask(self, pattern: AttentionPattern) -> torch.Tensor:
        """(B or 1, length + 1) bool, contiguous: the slots 0..length of a whole-length cache that
        the token at position `length` may attend to under `pattern` (its rule on real-token
        indices, padding left out). Every layer of one pattern reads the same, so a step computes
        it once; `record_mask` and `advance` start the next step's."""
        key = (pattern, self.length)
        mask = self._step_masks.get(key)
        if mask is None:
            end = self.length + 1
            index = self.token_index(end)  # (B or 1, end)
            mask = allowed(pattern, index[:, -1:], index)
            if self.key_mask is not None:
                mask = mask & self.key_mask[:, :end]
            mask = self._step_masks[key] = mask.contiguous()
        return mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, n_kv, T, hd) and return the filled prefix."""
        keys, values, T = self.keys[layer], self.values[layer], k.shape[2]
        keys.narrow(2, self.length, T).copy_(k)  # narrow, not indexing: one op, not four, a call
        values.narrow(2, self.length, T).copy_(v)
        return keys.narrow(2, 0, self.length + T), values.narrow(2, 0, self.length + T)

    def update_sparse(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, n_kv, T, hd); return the keys and values
        its queries may need, (B, n_kv, S, hd) each, and the token index of
        each, (S,) long, into `token_index(...)` and `key_mask`."""
        slots = self.keys[layer].shape[2]
        if slots == self.max_len:
            end = self.length + k.shape[2]
            keys, values = self.update(layer, k, v)
            return keys, values, torch.arange(end, device=k.device)
        return self._update_ring(layer, k, v, slots)

    def _update_ring(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token t lives in slot t % slots. One new token is written first and
        attends over the ring (slots >= span, so it loses nothing it needs);
        a chunk of several attends over the old ring plus itself, then the
        chunk's last `slots` tokens are written."""
        start, T = self.length, k.shape[2]
        ring_k, ring_v = self.keys[layer], self.values[layer]
        if T == 1:
            ring_k[:, :, start % slots] = k[:, :, 0]
            ring_v[:, :, start % slots] = v[:, :, 0]
            held = min(start + 1, slots)
            return ring_k[:, :, :held], ring_v[:, :, :held], _ring_tokens(start + 1, slots, k.device)
        held = min(start, slots)
        keys = torch.cat([ring_k[:, :, :held], k], dim=2)  # (B, n_kv, held + T, hd)
        values = torch.cat([ring_v[:, :, :held], v], dim=2)
        tokens = torch.cat([_ring_tokens(start, slots, k.device), torch.arange(start, start + T, device=k.device)])
        kept = torch.arange(max(start, start + T - slots), start + T, device=k.device)  # tokens to keep
        ring_k[:, :, kept % slots] = k[:, :, kept - start]
        ring_v[:, :, kept % slots] = v[:, :, kept - start]
        return keys, values, tokens

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens
        self._step_masks.clear()


def _ring_tokens(length: int, slots: int, device: torch.device) -> torch.Tensor:
    """(min(length, slots),) long: the token held by each filled ring slot once
    `length` tokens have been written: the latest t < length with t % slots == s."""
    s = torch.arange(min(length, slots), device=device)
    return s + (length - 1 - s) // slots * slots
