"""Alignment objectives as pure tensor functions, one per paper.

Every function takes log-probabilities, rewards or values that the caller
computed (`align.logprobs`) and returns losses; none touches a model, so each
reads on its own and is checked against hand-computed numbers. Shapes: B
sequences, T tokens; `mask` (B, T) is 1.0 on the tokens that count (the
response) and 0.0 elsewhere. A new objective is a new function here.

Preference losses return per-pair losses (B,) so that the caller chooses the
reduction (a plain mean, or a sum for exact gradient accumulation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (all of them, or along `dim`)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


# ----- supervised fine-tuning and reward models ------------------------------------------------


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the assistant's tokens only (Ouyang et al. 2022, InstructGPT, sec. 3.5):
    logits (B, T, V) predict labels (B, T); the mean over positions where mask (B, T) is 1."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)
    return masked_mean(nll, mask.to(nll.dtype))


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Reward-model loss -log sigmoid(r_chosen - r_rejected) per pair (B,): the Bradley-Terry
    (1952) likelihood of the human choice, as in Ouyang et al. 2022, eq. 1."""
    return -F.logsigmoid(chosen - rejected)


# ----- direct preference objectives -------------------------------------------------------------


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), per pair (B,), from summed sequence log-probs:
    -log sigmoid(beta * [(log pi_c - log ref_c) - (log pi_r - log ref_r)]).
    label_smoothing eps > 0 is conservative DPO (Mitchell 2023): the preference label is
    taken to be flipped with probability eps."""
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17), per pair (B,): (h - 1/(2 tau))^2 with
    h = (log pi_c - log ref_c) - (log pi_r - log ref_r); a squared loss that does not
    push the margin to infinity on deterministic preferences."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return (h - 1 / (2 * tau)) ** 2


def simpo_loss(policy_chosen_mean: torch.Tensor, policy_rejected_mean: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), per pair (B,), from length-normalised (mean per token)
    log-probs and no reference model: -log sigmoid(beta * (mean_c - mean_r) - gamma)."""
    return -F.logsigmoid(beta * (policy_chosen_mean - policy_rejected_mean) - gamma)


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, reference_point: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 8), per example (B,), from unpaired feedback.

    policy, ref (B,) summed log-probs of each response; desirable (B,) bool. With the
    implied reward r = log pi - log ref and the reference point z0 (an estimate of
    KL(pi || ref), e.g. over mismatched prompt/response pairs; detached and clamped at 0 here):
    desirable: lambda_D (1 - sigmoid(beta (r - z0))); undesirable: lambda_U (1 - sigmoid(beta (z0 - r))).
    """
    reward = policy - ref
    z0 = reference_point.detach().clamp(min=0)
    good = desirable_weight * (1 - torch.sigmoid(beta * (reward - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - reward)))
    return torch.where(desirable, good, bad)


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, chosen_nll: torch.Tensor,
              lam: float = 0.1) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eqs. 6-7), per pair (B,): the SFT loss on the chosen response
    plus lam * -log sigmoid(log odds(chosen) - log odds(rejected)), where odds(y) = P / (1 - P)
    of the length-normalised likelihood P = exp(mean log-prob). No reference model."""
    def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
        return mean_logp - torch.log1p(-torch.exp(mean_logp).clamp(max=1 - 1e-6))

    return chosen_nll - lam * F.logsigmoid(log_odds(chosen_mean) - log_odds(rejected_mean))


# ----- policy-gradient objectives ---------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    rewards, values, mask (B, T), the response's tokens contiguous where mask is 1; the
    value after the last response token is 0 (the episode ends). Returns (advantages,
    returns = advantages + values), each (B, T), zero off the mask.
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = torch.where(m.bool(), values[:, t], next_value)
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated, as a masked mean over
    tokens; all inputs (B, T). Also returns the fraction of tokens whose clipped term was
    the smaller (its gradient is cut) and the approximate KL to the sampling policy,
    detached, for logging."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    stats = {"clip_fraction": masked_mean((clipped < unclipped).float(), mask).detach(),  # the clipped term ruled
             "approx_kl": masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask).detach()}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped value loss (the OpenAI baselines form, used by InstructGPT's PPO):
    0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2), masked mean; inputs (B, T)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman 2020, "Approximating
    KL divergence"): k1 = log pi - log ref (unbiased, can be negative); k3 = exp(log ref -
    log pi) - (log ref - log pi) - 1 (unbiased and never negative; GRPO's estimator)."""
    log_ratio = ref_logprobs - logprobs
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"kind: {kind!r} is not 'k1' or 'k3'")


def kl_penalised_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """InstructGPT's per-token reward (Ouyang et al. 2022, eq. 2; Ziegler et al. 2019):
    -kl_coef * (log pi - log ref) on every response token, plus the sequence score (B,) on
    its last token. Returns (B, T), zero off the mask."""
    rewards = -kl_coef * kl_estimate(logprobs, ref_logprobs, "k1") * mask
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()  # (B, T): each row's final token
    return rewards + last * scores[:, None]


class _KLCoefficient:
    """A KL coefficient whose value a resumed run restores (`align.resume`)."""

    coef: float

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = state["coef"]


class FixedKLController(_KLCoefficient):
    """A constant KL coefficient."""

    def __init__(self, coef: float) -> None:
        self.coef = coef

    def update(self, kl: float, n_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController(_KLCoefficient):
    """Ziegler et al. 2019, sec. 2.2: steer the KL coefficient so the observed KL tracks
    `target`: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.coef *= 1 + error * n_steps / self.horizon


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, DeepSeekMath, sec. 4.1.2): rewards (G, n)
    for G prompts with n sampled completions each, normalised within each group:
    (r - mean) / (std + eps). A group whose completions all score alike gets exactly 0: its mean
    is rounded (seven 0.1s average to 0.1 plus an ulp; 1e6 + 0.1 in fp32 to 1/16 less), and that
    rounding over std 0 + eps would hand every completion one large advantage of one sign."""
    if rewards.shape[1] < 2:
        raise ValueError(f"rewards: a group needs at least 2 completions, got shape {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)  # (G, 1)
    std = rewards.std(dim=1, keepdim=True)  # (G, 1)
    alike = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # (G, 1): nothing to prefer
    return torch.where(alike, 0.0, (rewards - mean) / (std + eps))


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2,
              beta: float = 0.04) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO (Shao et al. 2024, eq. 3), negated: per token, the PPO-clipped surrogate with the
    completion's advantage (B,) minus beta * the k3 KL to the reference; averaged over each
    completion's tokens (the paper's 1/|o_i|), then over completions. Inputs (B, T)."""
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    kl = kl_estimate(logprobs, ref_logprobs, "k3")
    per_token = -(surrogate - beta * kl)
    loss = masked_mean(per_token, mask, dim=1).mean()
    return loss, {"kl": masked_mean(kl, mask).detach()}


__all__ = [
    "AdaptiveKLController", "FixedKLController", "bradley_terry_loss", "dpo_loss", "gae", "grpo_advantages",
    "grpo_loss", "ipo_loss", "kl_estimate", "kl_penalised_rewards", "kto_loss", "masked_mean", "orpo_loss",
    "ppo_policy_loss", "ppo_value_loss", "sft_loss", "simpo_loss",
]
