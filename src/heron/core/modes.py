"""Running a model for inference whatever mode its owner left it in."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run the `with` block in eval mode, then put back the mode the model was in.

    Inference (generation, perplexity, every interpret lens, calibration) runs under
    it: in train mode a forward is not the model's inference (MoE capacity drops) and
    changes the model (an MoE router's running mean, `router_center`), and a caller
    mid-training must get its model back in train mode. A model already in eval mode
    is left alone, so a decoding step pays nothing for it."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


__all__ = ["evaluating"]
