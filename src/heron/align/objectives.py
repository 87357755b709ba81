"""Objectives for `align.loop.fit`: SFT, the reward model and the DPO family.

Each builder closes over a model and its tokenised data and returns a
function from example rows to per-example losses and metrics; the losses
themselves are the pure functions of `align.losses`. DPO-family runs read
the reference model's log-probabilities from a cache written once
(`reference_logprobs`), so the reference model need not stay in memory.

A Mixture-of-Experts model in training adds its auxiliary losses (load
balancing, router z-loss) to every example's loss, as pre-training does, and
reports its routing statistics (`moe_*`) beside the objective's metrics; a
dense model's aux loss is zero and it reports none. SFT and the reward model
route as pre-training does; the DPO family, like PPO and GRPO, trains its
policy under inference routing (`core.modes.inference_routing`), as its
reference is scored, so at the first step the policy is its reference exactly.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from heron.align.data import Replies
from heron.align.logprobs import logprobs_and_aux
from heron.align.loop import Objective
from heron.align.losses import bradley_terry_loss, dpo_loss, ipo_loss, kto_loss, orpo_loss, simpo_loss
from heron.core.modes import inference_routing
from heron.core.moe import moe_stats
from heron.store.atomic import write_bytes_atomic

PREFERENCE_LOSSES = ("dpo", "ipo", "simpo", "orpo")
NEEDS_REFERENCE = ("dpo", "ipo")


def reply_logprobs(model: nn.Module, replies: Replies) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, mean) over each reply's tokens of their log-probabilities, each (N,), and the
    forward's auxiliary loss (scalar; zero for a dense model)."""
    per_token, aux = logprobs_and_aux(model, replies.ids, replies.mask, token_mask=replies.tokens())  # (N, T - 1), ()
    total = per_token.sum(1)
    return total, total / replies.mask[:, 1:].sum(1), aux


def rewards(reward_model: nn.Module, replies: Replies) -> torch.Tensor:
    """(N,) the scalar head's output at each row's last token (the reply's end-of-turn)."""
    return _rewards_and_aux(reward_model, replies)[0]


def _rewards_and_aux(reward_model: nn.Module, replies: Replies) -> tuple[torch.Tensor, torch.Tensor]:
    out = reward_model(replies.ids, token_mask=replies.tokens())
    return out.logits[torch.arange(len(replies)), replies.last, 0], out.aux_loss.float()  # (N,), ()


def routing_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The routing statistics of `model`'s last forward (`moe_stats`), each () fp32 and
    detached, as `moe_<name>`; {} for a dense model. PPO and GRPO log them per step."""
    return {f"moe_{name}": value.detach().float() for name, value in moe_stats(model).items()}


def routing_metrics(model: nn.Module, n: int) -> dict[str, torch.Tensor]:
    """`routing_statistics` as values for each of n examples."""
    return {name: value.expand(n) for name, value in routing_statistics(model).items()}


def sft_objective(model: nn.Module, replies: Replies) -> Objective:
    """Mean negative log-likelihood of each reply's tokens (assistant tokens only)."""
    def objective(rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, mean, aux = reply_logprobs(model, replies.take(rows))
        return aux - mean, routing_metrics(model, len(rows))

    return objective


def reward_objective(reward_model: nn.Module, chosen: Replies, rejected: Replies) -> Objective:
    """Bradley-Terry loss on (chosen, rejected) pairs; metrics: accuracy and reward margin."""
    def objective(rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (good, good_aux), (bad, bad_aux) = (_rewards_and_aux(reward_model, s.take(rows)) for s in (chosen, rejected))
        metrics = {"accuracy": (good > bad).float(), "margin": (good - bad).detach(),
                   **routing_metrics(reward_model, len(rows))}
        return bradley_terry_loss(good, bad) + (good_aux + bad_aux) / 2, metrics

    return objective


def preference_objective(policy: nn.Module, chosen: Replies, rejected: Replies, loss: str = "dpo", *,
                         beta: float = 0.1, reference: tuple[torch.Tensor, torch.Tensor] | None = None,
                         sft_weight: float = 0.0, **loss_args: float) -> Objective:
    """One of the DPO family on (chosen, rejected) pairs. dpo and ipo need the reference's summed
    log-probs (chosen, rejected), each (N,); simpo and orpo use none. `beta` is each loss's
    strength: DPO's and SimPO's beta, IPO's tau, ORPO's lambda. Metrics: the implicit
    rewards of both sides, beta * (log pi - log ref) summed over the reply (dpo, ipo) or beta *
    the mean log pi per token (simpo, orpo: what their losses compare), their margin, and
    accuracy (margin > 0).

    sft_weight > 0 adds that multiple of the chosen reply's per-token negative log-likelihood
    (DPO+NLL, Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 1). DPO
    alone only sets the two replies' likelihoods apart; on small models both fall together and
    the freed probability drifts to tokens neither reply uses (on the synthetic task, pure DPO
    turned replies into random bytes). The NLL term anchors the chosen reply."""
    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"loss: {loss!r} is not one of {', '.join(PREFERENCE_LOSSES)}")
    if (loss in NEEDS_REFERENCE) != (reference is not None):
        raise ValueError(f"reference: {loss} {'needs' if loss in NEEDS_REFERENCE else 'takes no'} reference log-probs")

    def objective(rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        both = chosen.take(rows).concat(rejected.take(rows))
        with inference_routing(policy):  # as the reference was scored (reference_logprobs)
            total, mean, aux = reply_logprobs(policy, both)  # one forward, both sides
        (pc, pr), (mc, mr) = total.chunk(2), mean.chunk(2)
        if loss in NEEDS_REFERENCE:
            rc, rr = reference[0][rows], reference[1][rows]
            losses = (dpo_loss(pc, pr, rc, rr, beta=beta, **loss_args) if loss == "dpo"
                      else ipo_loss(pc, pr, rc, rr, tau=beta, **loss_args))
            good, bad = (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()
        else:
            losses = (simpo_loss(mc, mr, beta=beta, **loss_args) if loss == "simpo"
                      else orpo_loss(mc, mr, -mc, lam=beta, **loss_args))
            # SimPO's implicit reward (Meng et al. 2024, eq. 4), length-normalised as its loss reads it
            # (ORPO's odds too): a sum would rank a long chosen reply below a short rejected one.
            good, bad = (beta * mc).detach(), (beta * mr).detach()
        losses = losses - sft_weight * mc + aux
        return losses, {"reward_chosen": good, "reward_rejected": bad, "margin": good - bad,
                        "accuracy": (good > bad).float(), **routing_metrics(policy, len(rows))}

    return objective


def kto_objective(policy: nn.Module, replies: Replies, desirable: torch.Tensor, reference: torch.Tensor, *,
                  beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Objective:
    """KTO on unpaired feedback: each reply marked desirable (N,) bool or not, with the reference's
    summed log-probs (N,). The reference point z0 is the micro-batch's mean implied reward
    log pi - log ref, detached and clamped at 0: an estimate of KL(pi || ref) from the batch
    itself (the paper estimates it on mismatched prompt/reply pairs of the batch). So, unlike
    the other objectives, its loss depends on how a batch is split: grad_accum changes z0
    (TRL's KTO, which estimates z0 per micro-batch too, behaves alike)."""
    def objective(rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with inference_routing(policy):  # as the reference was scored (reference_logprobs)
            total, _, aux = reply_logprobs(policy, replies.take(rows))
        implied = total - reference[rows]
        losses = kto_loss(total, reference[rows], desirable[rows], implied.mean(), beta=beta,
                          desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        return losses + aux, {"reward": (beta * implied).detach(), **routing_metrics(policy, len(rows))}

    return objective


@torch.no_grad()
def reference_logprobs(model: nn.Module, replies: Replies, batch_size: int = 16) -> torch.Tensor:
    """(N,) summed reply log-probs under `model`, in batches."""
    model.eval()
    return torch.cat([reply_logprobs(model, replies.take(torch.arange(i, min(i + batch_size, len(replies)))))[0]
                      for i in range(0, len(replies), batch_size)])


def cached_reference_logprobs(model: nn.Module, chosen: Replies, rejected: Replies,
                              cache_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference_logprobs` of both sides, computed once per (reference model, data) and read
    back from <cache_dir>/reference-<hash>.safetensors afterwards. The model is its config and
    its weights: the same weights under another config (heads, RoPE base) are another model."""
    digest = hashlib.sha256(model.config.to_json().encode())
    for tensor in (*model.state_dict().values(), chosen.ids, chosen.mask, rejected.ids, rejected.mask):
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    file = Path(cache_dir) / f"reference-{digest.hexdigest()[:16]}.safetensors"
    if file.is_file():
        stored = safetensors.torch.load_file(file)
        return stored["chosen"], stored["rejected"]
    values = {"chosen": reference_logprobs(model, chosen), "rejected": reference_logprobs(model, rejected)}
    write_bytes_atomic(file, safetensors.torch.save(values))  # a temp of its own: two runs may share the cache
    return values["chosen"], values["rejected"]


__all__ = [
    "PREFERENCE_LOSSES", "cached_reference_logprobs", "kto_objective", "preference_objective", "reference_logprobs",
    "reply_logprobs", "reward_objective", "rewards", "routing_metrics", "routing_statistics", "sft_objective",
]
