"""A preallocated key/value cache for incremental decoding.

Storage for the whole generation is allocated once; each forward writes its
new keys and values in place and attends over a view of the filled prefix,
so a decode step copies only the new token's keys and values.
"""
from __future__ import annotations

import torch

from heron.core.config import ModelConfig


class KVCache:
    """Keys and values of every layer, (B, n_kv_heads, max_len, head_dim) each.

    `key_mask` (B, max_len) marks real tokens when a batch is left-padded; it
    is None while every position is real.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys
        self.values = values
        self.length = 0
        self.key_mask: torch.Tensor | None = None

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
        shape = (batch_size, config.resolved_kv_heads, max_len, config.resolved_head_dim)
        keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        return cls(keys, values)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_len:
            raise ValueError(
                f"KV cache full: {self.length} cached + {new_tokens} new tokens > max_len {self.max_len}"
            )

    def record_mask(self, new_mask: torch.Tensor | None, new_tokens: int) -> None:
        """Remember which of the new positions are real tokens (B, T) bool."""
        if new_mask is None:
            if self.key_mask is not None:
                self.key_mask[:, self.length : self.length + new_tokens] = True
            return
        if self.key_mask is None:
            self.key_mask = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=new_mask.device)
        self.key_mask[:, self.length : self.length + new_tokens] = new_mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, n_kv, T, hd) and return the filled prefix."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens
