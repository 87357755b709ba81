"""The refusal every exporter makes of a weight that is NaN or inf.

Such a weight makes the logits that read it NaN in whatever loads the export
(llama.cpp, transformers), in any dtype, so no writer here makes a file of
it; the error names the tensor, counts its bad values and shows the first,
so that the model's weights can be fixed before exporting again.
"""
from __future__ import annotations

import torch


def check_finite(name: str, tensor: torch.Tensor, consequence: str) -> None:
    """ValueError if `tensor` holds NaN or inf: `name` (what the caller calls it), how many of
    its values are not finite, the first (its index in `tensor`, row-major), and `consequence`."""
    values = tensor.detach()  # a parameter: reading it needs no autograd
    bad = ~torch.isfinite(values)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: {int(bad.sum())} of its values are not finite (the first, at {where}, is "
                         f"{float(values[where])}); {consequence}")


__all__ = ["check_finite"]
