"""Log-probabilities of given tokens under a model: what every alignment loss consumes."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from heron.core.head_loss import head_cross_entropy, next_token_targets


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, t]) under logits[b, t]: logits (B, T, V), labels (B, T) -> (B, T), in fp32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, labels.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                      attention_mask: torch.Tensor | None = None,
                      token_mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs (B, T - 1) of ids[:, 1:] given what precedes each, zeroed where
    mask[:, 1:] (B, T; 1 on response tokens) is 0. Sum over dim 1 for a sequence's
    log-probability; divide by mask[:, 1:].sum(1) for its per-token mean. `temperature`:
    under softmax(logits / temperature), the distribution replies sampled at it came from."""
    return logprobs_and_aux(model, ids, mask, attention_mask, token_mask, temperature)[0]


def logprobs_and_aux(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                     attention_mask: torch.Tensor | None = None,
                     token_mask: torch.Tensor | None = None,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logprobs` (B, T - 1) and the forward's auxiliary loss (scalar, fp32): a
    Mixture-of-Experts model's load-balancing and router z-losses, zero for a dense one.
    A policy in training adds the aux loss to its objective, as pre-training does, so
    that fine-tuning keeps the experts' load balanced. token_mask (B, T) bool: the real
    tokens, which alone the aux loss counts (`Replies.tokens`: right padding left out)."""
    # Each position's target is the next token where the mask counts it: the model's head
    # then never makes the (B, T, V) logits, nor their log-softmax (core/head_loss.py),
    # and positions outside the replies (prompts, padding) cost nothing in it.
    targets = next_token_targets(ids, mask != 0)  # (B, T)
    tempered = None if temperature == 1.0 else partial(_tempered_nll, temperature=temperature)
    out = model(ids, attention_mask=attention_mask, token_mask=token_mask, targets=targets,
                reduction="none" if tempered is None else "sum", head_loss=tempered)
    return -out.loss[:, :-1] * mask[:, 1:].to(torch.float32), out.aux_loss.float()


def _tempered_nll(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, T) -log softmax(head(hidden) / temperature)[target], 0 where the target is IGNORE_INDEX:
    the scores of replies sampled at that temperature (PPO and GRPO, as TRL scores them); fused
    where the head allows, no logits made (core/head_loss.py)."""
    return head_cross_entropy(hidden, head, targets, "none", temperature)


__all__ = ["logprobs_and_aux", "sequence_logprobs", "token_logprobs"]
