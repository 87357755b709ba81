"""Helpers for the compression tests (a module with a unique name): tiny models and a tiny
checkpoint-plus-shards pair for the command-line tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from heron.core import ModelConfig, Transformer
from heron.train.checkpoint import save_model_folder

V = 256  # the tiny models' vocabulary


def tiny(seed: int = 0, **overrides) -> Transformer:
    """A 2-layer d-64 model in eval mode, with weights large enough (init_std 0.1) to matter."""
    torch.manual_seed(seed)
    config = ModelConfig(**{"vocab_size": V, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64,
                            "init_std": 0.1, **overrides})
    return Transformer(config).eval()


def token_ids(n: int, T: int, seed: int) -> torch.Tensor:
    """(n, T) random token ids of the tiny models' vocabulary."""
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def checkpoint_and_shards(root: Path) -> tuple[Path, Path]:
    """(a checkpoint of a tiny random model, a shard folder of counting sequences) under root."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, d_ff=128))
    save_model_folder(root / "ckpt", model)
    shards = root / "shards"  # the layout data/shards.py documents: raw uint16 ids plus meta.json
    shards.mkdir()
    meta: dict = {"format": 1, "dtype": "uint16"}
    for split, ids in {"train": np.arange(4000) % V, "val": np.arange(500) % V}.items():
        ids.astype("<u2").tofile(shards / f"{split}_000000.bin")
        meta[split] = {"tokens": len(ids), "shards": [{"file": f"{split}_000000.bin", "tokens": len(ids)}]}
    (shards / "meta.json").write_text(json.dumps(meta))
    return root / "ckpt", shards
