"""Scoring rollouts: what PPO and GRPO optimise, taken as the reward gives it and checked.

Known answers: a reward model scores the rollout's own rows (the sampled ids, a cut-off reply
without an end token), so its score is the scalar head's output at each row's last sampled
token; a judge's bool or int scores are numbers; a score that is not finite stops the run
before any step, naming the reply; the reference cache tells two configs of one set of weights apart.
"""
import pytest
import torch

from heron.align.data import Replies, encode_pairs
from heron.align.grpo import GRPOSettings, grpo
from heron.align.heads import with_scalar_head
from heron.align.objectives import cached_reference_logprobs
from heron.align.ppo import PPOSettings, ppo
from heron.align.rollout import Rollout, RewardModel, rollout, score_rollout
from heron.align.synthetic import RepeatTask
from heron.core import ModelConfig, Transformer
from heron.generate import Generator
from heron.tokenizer import train_tokenizer
from heron.train.loop import DivergedError

TASK = RepeatTask()
MAX_LEN = 48


@pytest.fixture(scope="module")
def tokenizer():
    chats = TASK.sft_chats(64, seed=0)
    return train_tokenizer([m["content"] for c in chats for m in c] * 2, vocab_size=300, progress=False)


def policy(tokenizer, **config) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                   max_seq_len=MAX_LEN, **config))


def prompts(n: int):
    return [c[:-1] for c in TASK.sft_chats(n, seed=3)]


def test_a_reward_model_scores_the_sampled_ids_not_their_text_encoded_again(tokenizer):
    """Row 0 ends at its end token; row 1 was cut off at max_new_tokens and holds a byte token that is
    not UTF-8 alone (it decodes to U+FFFD, three tokens when encoded again): each is scored where it ends,
    as sampled. Re-encoding the text scored row 1 with an end token it never sampled, or failed on length.
    A reward model still training is scored in eval mode and handed back in train mode."""
    reward_model = with_scalar_head(policy(tokenizer)).train()
    head = tokenizer.chat_prompt_ids(prompts(1)[0])
    byte = tokenizer.encode("é")[0]  # the first of the two bytes: not a character alone
    tails = [[5, 6, tokenizer.chat_stop_ids[0]], [7, byte]]
    width = len(head) + 3
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width)
    for i, tail in enumerate(tails):
        ids[i, :len(head) + len(tail)] = torch.tensor(head + tail)
        mask[i, len(head):len(head) + len(tail)] = 1.0
    last = torch.tensor([len(head) + len(t) - 1 for t in tails])
    run = Rollout(prompts(1) * 2, [tokenizer.decode(t[:-1]) for t in tails[:1]] + [tokenizer.decode(tails[1])],
                  Replies(ids, mask, last), tokens=5, seconds=1.0)
    scores = score_rollout(RewardModel(reward_model), run)
    assert reward_model.training
    with torch.no_grad():
        out = reward_model.eval()(ids, token_mask=mask.bool() | (torch.arange(width) < len(head)))
    assert torch.allclose(scores, out.logits[torch.arange(2), last, 0], atol=1e-6)
    assert scores.dtype == torch.float32


def test_judges_scores_are_numbers_and_a_score_that_is_not_is_named(tokenizer):
    run = Rollout(prompts(3), ["a", "bb", "ccc"], Replies(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2),
                                                           torch.ones(3, dtype=torch.long)), tokens=3, seconds=1.0)
    assert score_rollout(lambda _p, t: len(t) > 1, run).tolist() == [0.0, 1.0, 1.0]  # correct or not
    assert score_rollout(lambda _p, t: len(t), run).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"reward: nan for reply 1 \('bb'\); a reward must be a finite number"):
        score_rollout(lambda _p, t: float("nan") if t == "bb" else 1.0, run)


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_integer_rewards_train_and_a_nan_reward_stops_the_run_before_any_step(tokenizer, method):
    def run(reward):
        model = policy(tokenizer)
        if method == "grpo":
            grpo(model, policy(tokenizer).eval(), tokenizer, prompts(2), reward,
                 GRPOSettings(steps=1, prompts_per_step=2, group_size=4, max_new_tokens=4, lr=1e-2, progress=False))
        else:
            ppo(model, with_scalar_head(model), policy(tokenizer).eval(), tokenizer, prompts(2), reward,
                PPOSettings(steps=1, prompts_per_step=2, minibatch=2, max_new_tokens=4, progress=False))
        return model

    before = policy(tokenizer).state_dict()
    trained = run(lambda _p, t: len(t) > 6)  # True/False: the usual correctness reward
    assert any(not torch.equal(p, before[n]) for n, p in trained.state_dict().items())
    with pytest.raises(ValueError, match="a reward must be a finite number"):
        run(lambda _p, _t: float("nan"))


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_a_diverging_run_stops_before_its_update_reaches_the_weights(tokenizer, method):
    """lr 1e30, one update a step: step 1's makes the weights ~1e30, finite; the forward after
    step 2's rollout overflows, and the run stops before step 2's update, which would make every
    weight it touches NaN (PPO: the policy's and the value model's, under one optimiser)."""
    model, rows = policy(tokenizer), []
    value_model = with_scalar_head(model)  # PPO's; GRPO has none
    with pytest.raises(DivergedError, match=r"step 2: the (training loss|gradient norm) is (nan|inf)"):
        if method == "grpo":  # the replies' lengths differ within a group: advantages that are not all 0
            grpo(model, policy(tokenizer).eval(), tokenizer, prompts(2), lambda _p, t: len(t) % 3,
                 GRPOSettings(steps=3, prompts_per_step=2, group_size=4, max_new_tokens=4, lr=1e30, progress=False),
                 on_step=rows.append)
        else:
            ppo(model, value_model, policy(tokenizer).eval(), tokenizer, prompts(2), lambda _p, t: len(t) % 3,
                PPOSettings(steps=3, prompts_per_step=2, minibatch=2, epochs=1, max_new_tokens=4, lr=1e30,
                            progress=False), on_step=rows.append)
    assert [row["step"] for row in rows] == [1]
    assert all(torch.isfinite(p).all() for module in (model, value_model) for p in module.parameters())


def test_the_reference_cache_tells_configs_of_the_same_weights_apart(tokenizer, tmp_path):
    chosen, rejected = encode_pairs(tokenizer, TASK.preference_pairs(4, seed=2), MAX_LEN)
    plain = policy(tokenizer).eval()
    other_base = policy(tokenizer, rope_theta=500.0).eval()
    other_base.load_state_dict(plain.state_dict())
    first = cached_reference_logprobs(plain, chosen, rejected, tmp_path)
    second = cached_reference_logprobs(other_base, chosen, rejected, tmp_path)
    assert len(list(tmp_path.glob("reference-*.safetensors"))) == 2
    assert not torch.equal(first[0], second[0])  # computed under its own RoPE, not read back


def test_ppo_shuffles_its_minibatches_by_the_seed_too(tokenizer, monkeypatch):
    orders = {}
    randperm = torch.randperm
    for seed in (0, 1):
        def recorded(*args, seed=seed, **kwargs):
            order = randperm(*args, **kwargs)
            orders.setdefault(seed, []).append(order.tolist())
            return order

        monkeypatch.setattr(torch, "randperm", recorded)
        model = policy(tokenizer)
        ppo(model, with_scalar_head(model), policy(tokenizer).eval(), tokenizer, prompts(4), lambda _p, t: len(t),
            PPOSettings(steps=1, prompts_per_step=4, minibatch=2, max_new_tokens=4, seed=seed, progress=False))
    assert orders[0] != orders[1]


@pytest.mark.parametrize("failure", ["generation", "too long"])
def test_a_rollout_that_raises_hands_the_policy_back_in_its_mode(tokenizer, monkeypatch, failure):
    """Generation stopped by an error (or Ctrl-C), or a rollout refused for its length: the
    policy is back in train mode, the part its owner kept in eval still in eval."""
    def stopped(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Generator, "complete", stopped)
    model = policy(tokenizer).train()
    model.blocks[0].attn.eval()
    before = {name: m.training for name, m in model.named_modules()}
    with pytest.raises(KeyboardInterrupt if failure == "generation" else ValueError):
        rollout(model, tokenizer, prompts(2), 2, max_new_tokens=4 if failure == "generation" else MAX_LEN)
    assert {name: m.training for name, m in model.named_modules()} == before
