"""Alignment's per-token log-probabilities from the head loss against the whole logits.

Every alignment loss (DPO and its family, PPO, GRPO, SFT) weighs the
log-probabilities of the reply tokens, one per position. `align.logprobs`
takes them from the model's head loss with `reduction="none"`
(core/head_loss.py): the (tokens, vocabulary) logits and their log-softmax
are never made whole, and prompt positions skip the head. The other way, as
the alignment code did before 2026-11-30, is `log_softmax` over the model's
logits, gathered at the next tokens.

One DPO policy step both ways: log-probabilities of the chosen and rejected
replies, the DPO loss against fixed reference log-probabilities (Heron
caches the reference's), backward, AdamW. The `small` preset with a LLaMA-2
sized vocabulary (32,000), PAIRS pairs of SEQ_LEN tokens whose first half is
the prompt. Memory: the peak-RSS rise of one step, fresh process each.
Speed: steps of both, interleaved, in one process.

    python benchmarks/bench_logprobs.py [--smoke] [--no-write]
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from common import setup_torch, two_way_step_main
from heron.align.logprobs import logprobs_and_aux, token_logprobs
from heron.align.losses import dpo_loss
from heron.models.presets import build_model
from heron.train.optim import build_optimizer
from heron.train.recipe import OptimSection

PRESET, VOCAB = "small", 32000
PAIRS, SEQ_LEN = 4, 512  # 8 sequences: logits of 4096 x 32000, 500 MiB in fp32
# The new way, then the old.
WAYS = {"head": "log-probs from the head loss", "logits": "log-probs from the whole logits"}


def through_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) the reply tokens' log-probabilities from the whole logits' log-softmax."""
    return token_logprobs(model(ids).logits[:, :-1], ids[:, 1:]) * mask[:, 1:]


def dpo_step(way: str) -> Callable[[], None]:
    """One DPO policy step on a fresh model, the log-probabilities taken `way`'s way."""
    setup_torch()
    model = build_model(PRESET, vocab_size=VOCAB).train()
    optimizer = build_optimizer(model, OptimSection())
    ids = torch.randint(0, VOCAB, (2 * PAIRS, SEQ_LEN))  # chosen rows, then rejected
    mask = torch.zeros(2 * PAIRS, SEQ_LEN)
    mask[:, SEQ_LEN // 2:] = 1.0  # the replies: the second half of each row
    reference = torch.randn(2 * PAIRS) - SEQ_LEN // 2 * 10.0  # summed log-probs, as a cached reference's

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        per_token = logprobs_and_aux(model, ids, mask)[0] if way == "head" else through_logits(model, ids, mask)
        summed = per_token.sum(1)  # (2P,)
        loss = dpo_loss(summed[:PAIRS], summed[PAIRS:], reference[:PAIRS], reference[PAIRS:]).mean()
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    how = (f"one DPO policy step (forward, DPO loss, backward, AdamW), {PRESET} preset with vocabulary {VOCAB}, "
           f"{PAIRS} pairs of {SEQ_LEN} tokens (prompt half, reply half), fp32")
    notes = [f"Logits of the batch: {2 * PAIRS * SEQ_LEN} x {VOCAB}, "
             f"{2 * PAIRS * SEQ_LEN * VOCAB * 4 / 2**20:.0f} MiB in fp32; the head loss makes the logits of "
             f"the reply positions only, in chunks, and makes them again in the backward."]
    two_way_step_main(__doc__, __file__, dpo_step, "dpo_step", WAYS, how, "logprobs",
                      "Alignment log-probabilities: head loss vs whole logits", notes)


if __name__ == "__main__":
    main()
