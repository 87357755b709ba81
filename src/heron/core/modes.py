"""Running a model for inference whatever mode its owner left it in."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from heron.core.moe import MoE


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run the `with` block in eval mode, then put back the mode the model was in.

    Inference (generation, perplexity, every interpret lens, calibration) runs under
    it: in train mode a forward is not the model's inference (MoE capacity drops) and
    changes the model (an MoE router's running mean, `router_center`), and a caller
    mid-training must get its model back in train mode. A model already in eval mode
    is left alone, so a decoding step pays nothing for it. A submodule the owner kept in
    eval mode, or an enclosing `inference_routing` put there, is handed back in eval mode."""
    with _in_eval([model] if model.training else []):
        yield


@contextmanager
def inference_routing(*models: nn.Module) -> Iterator[None]:
    """Run the `with` block with the models' MoE layers routing as in eval mode, and put
    back the mode each was in; the rest of each model, and gradients, stay as they are.

    Eval-mode routing is the model's inference (core/moe.py): nothing is dropped over
    capacity, and a router that centres its input does so on its running mean, which
    the block leaves where it is, rather than on the batch's. Alignment runs its policy
    under it in training too (align/ppo.py, grpo.py, objectives.py): the policy it
    optimises is then the one that sampled the replies and that the reference is
    scored as, so PPO's first ratio is exactly 1 and DPO's first loss log 2, as in a
    fine-tuning that freezes BatchNorm's statistics. The balancing losses still come
    with every forward that has gradients on. A dense model has no MoE layer: nothing
    changes."""
    layers = [m for model in models for m in model.modules() if isinstance(m, MoE) and m.training]
    with _in_eval(layers):
        yield


@contextmanager
def _in_eval(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run the `with` block with `modules` (each in train mode) in eval mode, then put each
    back in train mode and every submodule that was in eval mode back in eval mode. Restoring
    the flags one by one, not `train()` alone, is what lets `evaluating` and
    `inference_routing` nest either way round: `train()` would also switch on the MoE layers
    an enclosing `inference_routing` had switched off, and the rest of its block would route
    as in training."""
    kept = [m for module in modules for m in module.modules() if not m.training]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module in modules:
            module.train()  # a Transformer's `train` also lays its weights out for training
        for m in kept:
            m.training = False  # this module alone: its submodules have their own entries


__all__ = ["evaluating", "inference_routing"]
