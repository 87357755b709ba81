"""Human feedback reaches training: pairs stored in the feedback store, exported as
prompt/chosen/rejected JSONL, are what the reward-model and DPO objectives read."""
import json

import pytest
import torch

from heron.align.data import encode_pairs
from heron.align.objectives import preference_objective, reward_objective
from heron.align.heads import with_scalar_head
from heron.align.synthetic import RepeatTask
from heron.core import ModelConfig, Transformer
from heron.store import FeedbackStore
from heron.tokenizer import train_tokenizer


def test_exported_pairs_train_the_reward_model_and_dpo(tmp_path):
    task = RepeatTask()
    pairs = task.preference_pairs(12, seed=0)
    rows = [{"prompt": p["prompt"] if i % 2 else p["prompt"][0]["content"],  # chat messages or plain text
             "chosen": p["chosen"], "rejected": p["rejected"]} for i, p in enumerate(pairs)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FeedbackStore.open(tmp_path / "feedback.db", create=True) as store:
        store.import_jsonl(source, annotator="alice")
        store.export_pairs(tmp_path / "pairs.jsonl")
    exported = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert {r["annotator"] for r in exported} == {"alice"} and len(exported) == len(rows)

    tokenizer = train_tokenizer([task.response(w, 3) + " Say a few times." for w in task.words] * 4,
                                vocab_size=300, progress=False)
    chosen, rejected = encode_pairs(tokenizer, exported, max_len=64)
    for row, record in zip(range(len(exported)), exported):
        reply = chosen.ids[row][chosen.mask[row].bool()].tolist()
        assert tokenizer.decode(reply) == record["chosen"]  # the end-of-turn token is skipped as special
        prompt = record["prompt"] if isinstance(record["prompt"], str) else record["prompt"][0]["content"]
        assert prompt in tokenizer.decode(chosen.ids[row].tolist())

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=64))
    rows_ = torch.arange(4)
    rm_losses, rm_metrics = reward_objective(with_scalar_head(model), chosen, rejected)(rows_)
    dpo_losses, _ = preference_objective(model, chosen, rejected, "simpo")(rows_)
    assert rm_losses.shape == dpo_losses.shape == (4,) and torch.isfinite(rm_losses).all()
    assert torch.isfinite(dpo_losses).all() and set(rm_metrics) == {"accuracy", "margin"}


def test_beta_is_each_losss_strength_and_orpo_holds_its_own_nll():
    """IPO's tau and ORPO's lambda come from preference.beta (they were fixed at 0.1 whatever
    beta said), and ORPO does not add the NLL anchor a second time."""
    from heron.align.losses import ipo_loss, orpo_loss
    from heron.align.recipe import PreferenceSection
    from heron.align.objectives import reply_logprobs

    task = RepeatTask()
    tokenizer = train_tokenizer([task.response(w, 3) + " Say a few times." for w in task.words] * 4,
                                vocab_size=300, progress=False)
    chosen, rejected = encode_pairs(tokenizer, task.preference_pairs(4, seed=0), max_len=64)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                    max_seq_len=64)).eval()
    rows = torch.arange(4)
    with torch.no_grad():
        total, mean, _ = reply_logprobs(model, chosen.take(rows).concat(rejected.take(rows)))
    (pc, pr), (mc, mr) = total.chunk(2), mean.chunk(2)
    reference = (pc - 1.0, pr + 1.0)
    for beta in (0.1, 2.0):
        with torch.no_grad():
            ipo = preference_objective(model, chosen, rejected, "ipo", beta=beta, reference=reference)(rows)[0]
            orpo = preference_objective(model, chosen, rejected, "orpo", beta=beta)(rows)[0]
        torch.testing.assert_close(ipo, ipo_loss(pc, pr, *reference, tau=beta))
        torch.testing.assert_close(orpo, orpo_loss(mc, mr, -mc, lam=beta))
    assert PreferenceSection(loss="orpo").sft_weight == 0 and PreferenceSection().sft_weight == 1
    with pytest.raises(ValueError, match="sft_weight: ORPO's loss already holds the chosen reply's NLL"):
        PreferenceSection(loss="orpo", sft_weight=1.0)


def test_simpo_gets_its_papers_scale_and_a_margin_of_its_own():
    """SimPO's beta scales per-token mean log-probs (~20x smaller than DPO's sums): left unset it is
    2.0, not DPO's 0.1, which made its fixed margin gamma 0.5 a target of 5 nats a token."""
    from heron.align.recipe import PreferenceSection

    assert (PreferenceSection().beta, PreferenceSection().gamma) == (0.1, None)
    assert (PreferenceSection(loss="simpo").beta, PreferenceSection(loss="simpo").gamma) == (2.0, 0.5)
    assert PreferenceSection(loss="simpo", beta=2.5, gamma=1.4).gamma == 1.4
    with pytest.raises(ValueError, match="gamma: SimPO's target margin; loss 'dpo' has none"):
        PreferenceSection(loss="dpo", gamma=1.0)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_report_the_length_normalised_reward_they_optimise(monkeypatch, loss):
    """A 4-token chosen reply at -1 nat a token (sum -4) against a 1-token rejected one at -2 (sum -2):
    SimPO's reward beta * mean log pi (Meng et al. 2024, eq. 4) prefers the chosen reply, so with
    beta 2 the rewards are -2 and -4, the margin 2, the accuracy 1. From the sums (-8 and -4) the
    metrics said the opposite of what the loss was training."""
    from heron.align import objectives
    from heron.align.data import Replies

    total, mean = t(-4.0, -2.0), t(-1.0, -2.0)  # (chosen, rejected) of the one pair
    monkeypatch.setattr(objectives, "reply_logprobs", lambda model, replies: (total, mean, torch.zeros(())))
    reply = Replies(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), torch.tensor([1]))
    _, metrics = preference_objective(torch.nn.Linear(1, 1), reply, reply, loss, beta=2.0)(torch.arange(1))
    assert {name: value.tolist() for name, value in metrics.items()} == {
        "reward_chosen": [-2.0], "reward_rejected": [-4.0], "margin": [2.0], "accuracy": [1.0]}


def t(*values):
    return torch.tensor(values, dtype=torch.float32)
