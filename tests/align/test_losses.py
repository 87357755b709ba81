"""Every objective against numbers worked out by hand (the arithmetic is in the
comments), and DPO against the paper's formula on log-probabilities computed
independently, one prefix at a time."""
import math

import pytest
import torch

from heron.align import (
    AdaptiveKLController,
    bradley_terry_loss,
    dpo_loss,
    gae,
    grpo_advantages,
    grpo_loss,
    ipo_loss,
    kl_estimate,
    kl_penalised_rewards,
    kto_loss,
    orpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
    sft_loss,
    simpo_loss,
)
from heron.core import ModelConfig, Transformer


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def test_sft_counts_only_masked_tokens():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]]])  # (1, 3, 3)
    labels = torch.tensor([[2, 0, 1]])
    mask = t(1, 1, 0)[None]
    # -log softmax: position 0 label 2: log(1 + e + e^2) - 2; position 1: log 3; position 2 is masked.
    expected = ((math.log(1 + math.e + math.e**2) - 2) + math.log(3)) / 2
    assert sft_loss(logits, labels, mask).item() == pytest.approx(expected, rel=1e-6)


def test_bradley_terry():
    # -log sigmoid(2.0 - 0.5) = log(1 + e^-1.5)
    assert bradley_terry_loss(t(2.0), t(0.5)).item() == pytest.approx(softplus(-1.5), rel=1e-6)


def test_dpo_and_conservative_dpo():
    args = (t(-3.0), t(-5.0), t(-4.0), t(-4.0))  # policy chosen, rejected; reference chosen, rejected
    # h = 0.5 * ((-3 + 4) - (-5 + 4)) = 1
    assert dpo_loss(*args, beta=0.5).item() == pytest.approx(softplus(-1.0), rel=1e-6)
    smoothed = 0.9 * softplus(-1.0) + 0.1 * softplus(1.0)
    assert dpo_loss(*args, beta=0.5, label_smoothing=0.1).item() == pytest.approx(smoothed, rel=1e-6)


def test_ipo_is_zero_at_its_target_margin():
    args = (t(-3.0), t(-5.0), t(-4.0), t(-4.0))  # h = 2
    assert ipo_loss(*args, tau=0.25).item() == pytest.approx(0.0, abs=1e-7)  # 1 / (2 tau) = 2
    assert ipo_loss(*args, tau=0.5).item() == pytest.approx(1.0, rel=1e-6)  # (2 - 1)^2


def test_simpo():
    # beta (mean_c - mean_r) - gamma = 2 * 0.5 - 0.5 = 0.5
    assert simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=0.5).item() == pytest.approx(softplus(-0.5), rel=1e-6)


def test_kto_desirable_and_undesirable():
    losses = kto_loss(t(-3.0, -3.0), t(-4.0, -2.0), torch.tensor([True, False]), t(0.5), beta=1.0)
    # rewards 1 and -1; desirable: 1 - sigmoid(1 - 0.5); undesirable: 1 - sigmoid(0.5 - (-1))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.5), 1 - sigmoid(1.5)], rel=1e-6)


def test_kto_weights_each_branch_by_its_own_lambda():
    losses = kto_loss(t(-3.0, -3.0), t(-4.0, -2.0), torch.tensor([True, False]), t(0.5), beta=1.0,
                      desirable_weight=2.0, undesirable_weight=3.0)
    # as above, the desirable loss times lambda_D = 2 and the undesirable one times lambda_U = 3
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert losses.tolist() == pytest.approx([2 * (1 - sigmoid(0.5)), 3 * (1 - sigmoid(1.5))], rel=1e-6)


def test_orpo():
    # odds(0.5) = 1, odds(0.25) = 1/3: -log sigmoid(log 3) = log(4/3); 1.0 + 0.1 * log(4/3)
    loss = orpo_loss(t(math.log(0.5)), t(math.log(0.25)), t(1.0), lam=0.1)
    assert loss.item() == pytest.approx(1.0 + 0.1 * math.log(4 / 3), rel=1e-6)


def test_gae_by_hand_with_prompt_and_padding_masked():
    # Response tokens at positions 1..3: rewards 0, 0, 1; values 0.5, 0.6, 0.7; gamma 1, lambda 0.9.
    # t=3: 1 - 0.7 = 0.3; t=2: (0 + 0.7 - 0.6) + 0.9 * 0.3 = 0.37; t=1: (0.6 - 0.5) + 0.9 * 0.37 = 0.433
    rewards, values, mask = t(9, 0, 0, 1, 9)[None], t(9, 0.5, 0.6, 0.7, 9)[None], t(0, 1, 1, 1, 0)[None]
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    assert advantages[0].tolist() == pytest.approx([0, 0.433, 0.37, 0.3, 0], abs=1e-6)
    assert returns[0].tolist() == pytest.approx([0, 0.933, 0.97, 1.0, 0], abs=1e-6)


def test_gae_discounts_the_bootstrapped_value_by_gamma():
    # The same response with gamma 0.5, lambda 0.9: delta_t = r_t + 0.5 V_{t+1} - V_t, A_t = delta_t + 0.45 A_{t+1}.
    # t=3: 1 + 0 - 0.7 = 0.3; t=2: (0.35 - 0.6) + 0.45 * 0.3 = -0.115; t=1: (0.3 - 0.5) + 0.45 * -0.115 = -0.25175
    rewards, values, mask = t(9, 0, 0, 1, 9)[None], t(9, 0.5, 0.6, 0.7, 9)[None], t(0, 1, 1, 1, 0)[None]
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=0.9)
    assert advantages[0].tolist() == pytest.approx([0, -0.25175, -0.115, 0.3, 0], abs=1e-6)
    assert returns[0].tolist() == pytest.approx([0, 0.24825, 0.485, 1.0, 0], abs=1e-6)


def test_ppo_policy_loss_clips_by_hand():
    old = t(-1.0, -1.0, -1.0)[None]
    new = old + torch.log(t(1.5, 0.5, 0.5))[None]  # ratios 1.5, 0.5, 0.5
    advantages = t(1.0, 1.0, -1.0)[None]
    # min(1.5, 1.2) = 1.2; min(0.5, 0.8) = 0.5; min(-0.5, -0.8) = -0.8 -> loss -(1.2 + 0.5 - 0.8) / 3
    loss, stats = ppo_policy_loss(new, old, advantages, torch.ones(1, 3), clip=0.2)
    assert loss.item() == pytest.approx(-0.3, rel=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)  # tokens 1 and 3 took the clipped term


def test_ppo_value_loss_clips_by_hand():
    # unclipped (1 - 2)^2 = 1; clipped 0.5 + 0.2 = 0.7: (0.7 - 2)^2 = 1.69; 0.5 * max = 0.845
    loss = ppo_value_loss(t(1.0)[None], t(0.5)[None], t(2.0)[None], torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(0.845, rel=1e-6)


def test_kl_estimators():
    logp, ref = t(math.log(0.5)), t(math.log(0.25))
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2), rel=1e-6)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 + math.log(0.5) * -1 - 1, rel=1e-5)
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(logp, ref, "k2")


def test_kl_estimators_are_unbiased_on_samples():
    """Over many samples from p, both estimators average to KL(p || q) computed exactly."""
    p, q = t(0.7, 0.2, 0.1), t(0.4, 0.4, 0.2)
    exact = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k3"):
        estimate = kl_estimate(p.log()[samples], q.log()[samples], kind).mean().item()
        assert estimate == pytest.approx(exact, abs=3e-3), kind


def test_kl_penalised_rewards_put_the_score_on_the_last_response_token():
    logp, ref, mask = t(0, 0.2, 0.4, 0)[None], torch.zeros(1, 4), t(0, 1, 1, 0)[None]
    rewards = kl_penalised_rewards(t(2.0), logp, ref, mask, kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([0, -0.02, -0.04 + 2.0, 0], abs=1e-6)


def test_adaptive_kl_controller():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    controller.update(kl=12.0, n_steps=256)  # error clipped to 0.2: 0.1 * (1 + 0.2 * 256 / 10000)
    assert controller.coef == pytest.approx(0.100512)
    controller.update(kl=6.0, n_steps=256)  # on target: unchanged
    assert controller.coef == pytest.approx(0.100512)


def test_adaptive_kl_controller_clips_a_low_kl_at_minus_0_2():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    controller.update(kl=0.0, n_steps=256)  # error -1 clipped to -0.2: 0.1 * (1 - 0.2 * 256 / 10000)
    assert controller.coef == pytest.approx(0.099488, rel=1e-9)


def test_grpo_advantages_normalise_within_groups():
    advantages = grpo_advantages(t(1, 0, 0, 1, 1, 1, 1, 1).view(2, 4), eps=0.0)
    half = 0.5 / math.sqrt(1 / 3)  # (1 - 0.5) / sample std of (1, 0, 0, 1)
    assert advantages[0].tolist() == pytest.approx([half, -half, -half, half], rel=1e-5)
    assert grpo_advantages(t(1, 1, 1, 1).view(1, 4)).abs().max() == 0  # nothing to prefer
    with pytest.raises(ValueError, match="at least 2"):
        grpo_advantages(t(1.0).view(1, 1))


def test_grpo_advantages_of_a_group_scored_alike_are_zero_whatever_its_means_rounding():
    """Equal rewards whose fp32 mean is not exact: (r - mean) is an ulp or so, std 0, and dividing by
    eps alone gave 1e6 + 0.1 (mean 1/16 off) advantages of -625 each, seven 0.1s ones of -7e-5."""
    rewards = torch.stack([torch.full((3,), 1e6 + 0.1), t(1, 0, 0)])  # (2, 3)
    advantages = grpo_advantages(rewards)
    assert advantages[0].tolist() == [0.0, 0.0, 0.0]
    spread = 1 / math.sqrt(3) + 1e-4  # the sample std of (1, 0, 0), plus eps
    assert advantages[1].tolist() == pytest.approx([2 / 3 / spread, -1 / 3 / spread, -1 / 3 / spread], rel=1e-5)
    assert grpo_advantages(torch.full((1, 7), 0.1)).tolist() == [[0.0] * 7]


def test_grpo_loss_by_hand():
    logp = torch.log(t(0.5, 0.5))[None]
    mask = torch.ones(1, 2)
    loss, _ = grpo_loss(logp, logp, logp, t(1.0), mask, beta=0.04)  # ratio 1, KL 0: -A
    assert loss.item() == pytest.approx(-1.0)
    # reference half as likely: k3 = 0.5 - log 0.5 - 1 per token
    loss, stats = grpo_loss(logp, logp, logp + math.log(0.5), t(1.0), mask, beta=0.04)
    k3 = 0.5 - math.log(0.5) - 1
    assert loss.item() == pytest.approx(-(1 - 0.04 * k3), rel=1e-6) and stats["kl"].item() == pytest.approx(k3)


def test_grpo_loss_averages_each_completion_over_its_own_tokens_then_over_completions():
    # Ratio 1 and KL 0: each token's loss is -A of its completion. Completions of 1 and 3 tokens with
    # A = 2 and 1: the mean of the per-completion means is -(2 + 1) / 2 = -1.5 (one mean over all
    # 4 tokens would give -(2 + 3 * 1) / 4 = -1.25). Masked positions hold values that must not count.
    logp = t(-1.0, -5.0, -9.0, -1.0, -2.0, -3.0).view(2, 3)
    old = t(-1.0, -0.1, -0.2, -1.0, -2.0, -3.0).view(2, 3)
    mask = t(1, 0, 0, 1, 1, 1).view(2, 3)
    loss, stats = grpo_loss(logp, old, old, t(2.0, 1.0), mask, beta=0.04)
    assert loss.item() == pytest.approx(-(2 + 1) / 2, rel=1e-6)
    assert stats["kl"].item() == 0


@torch.no_grad()
def test_dpo_matches_the_paper_on_independently_computed_logprobs():
    """log pi(y | x) summed token by token from one forward per prefix (no shifting or
    masking shared with `sequence_logprobs`), then eq. 7 of Rafailov et al. in plain math."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=23, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
    policy, reference = Transformer(config).eval(), Transformer(config).eval()
    prompt = [3, 5, 7]
    chosen, rejected = [11, 2, 9, 4], [8, 8, 1, 6]
    beta = 0.3

    def logp(model, response):
        total = 0.0
        for i, token in enumerate(response):
            prefix = torch.tensor([prompt + response[:i]])
            total += torch.log_softmax(model(prefix).logits[0, -1], -1)[token].item()
        return total

    h = beta * ((logp(policy, chosen) - logp(reference, chosen)) - (logp(policy, rejected) - logp(reference, rejected)))
    expected = -math.log(1 / (1 + math.exp(-h)))

    ids = torch.tensor([prompt + chosen, prompt + rejected])
    mask = torch.tensor([[0] * len(prompt) + [1] * 4] * 2)
    pol, ref = sequence_logprobs(policy, ids, mask).sum(1), sequence_logprobs(reference, ids, mask).sum(1)
    assert dpo_loss(pol[:1], pol[1:], ref[:1], ref[1:], beta=beta).item() == pytest.approx(expected, rel=1e-5)
