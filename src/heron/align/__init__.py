"""Alignment: objectives as pure tensor functions, and the log-probabilities they consume."""
from heron.align.logprobs import sequence_logprobs, token_logprobs
from heron.align.losses import (
    AdaptiveKLController,
    FixedKLController,
    bradley_terry_loss,
    dpo_loss,
    gae,
    grpo_advantages,
    grpo_loss,
    ipo_loss,
    kl_estimate,
    kl_penalised_rewards,
    kto_loss,
    masked_mean,
    orpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
    simpo_loss,
)

__all__ = [
    "AdaptiveKLController", "FixedKLController", "bradley_terry_loss", "dpo_loss", "gae", "grpo_advantages",
    "grpo_loss", "ipo_loss", "kl_estimate", "kl_penalised_rewards", "kto_loss", "masked_mean", "orpo_loss",
    "ppo_policy_loss", "ppo_value_loss", "sequence_logprobs", "sft_loss", "simpo_loss", "token_logprobs",
]
