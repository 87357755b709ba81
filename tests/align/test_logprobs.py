"""Alignment's log-probabilities, read from the model's per-position head loss, against
a log-softmax over the whole logits: the same values and the same gradients."""
import pytest
import torch
from torch import nn

from heron.align import sequence_logprobs, token_logprobs
from heron.core import ModelConfig, Transformer
from heron.core.linear import Linear


def logits_way(model: Transformer, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return token_logprobs(model(ids).logits[:, :-1], ids[:, 1:]) * mask[:, 1:]


@pytest.mark.parametrize("tied", [True, False])
def test_sequence_logprobs_equal_the_log_softmax_of_the_logits(tied) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                                    tie_embeddings=tied)).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (3, 12), generator=gen)
    mask = torch.zeros(3, 12)
    mask[0, 4:] = 1.0  # prompt of 4, reply to the end
    mask[1, 2:9] = 1.0  # prompt of 2, reply of 7, right padding after it
    mask[2, 6:] = 1.0
    weights = torch.randn(3, 11, generator=gen)  # a per-token weighting, signed (as DPO's chosen vs rejected)

    def run(fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logprobs = fn(model, ids, mask)
        (logprobs * weights).sum().backward()
        return logprobs.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    (want, want_grads), (got, got_grads) = run(logits_way), run(sequence_logprobs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[mask[:, 1:] == 0] == 0) and torch.all(got[mask[:, 1:] == 1] < 0)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_tempered_logprobs_are_those_of_the_distribution_sampled_at_that_temperature() -> None:
    """PPO and GRPO sample replies at a temperature, so they score them under softmax(logits / T)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, max_seq_len=16))
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 10)
    mask[:, 3:] = 1.0
    for temperature in (0.5, 2.0):
        want = token_logprobs(model(ids).logits[:, :-1] / temperature, ids[:, 1:]) * mask[:, 1:]
        got = sequence_logprobs(model, ids, mask, temperature=temperature)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, sequence_logprobs(model, ids, mask))


def hooked_linear(d: int, vocab: int) -> nn.Module:
    """A bias-free Linear head with a forward hook that scales its logits."""
    head = Linear(d, vocab, bias=False)
    head.register_forward_hook(lambda _module, _args, out: out * 1.5)
    return head


HEADS = {"nn.Linear": lambda d, v: nn.Linear(d, v, bias=False), "with a bias": nn.Linear,
         "a hooked Linear": hooked_linear}


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("head", HEADS)
def test_every_head_scores_as_its_logits_do(head, temperature) -> None:
    """Fused or not (core/head_loss.py's `fusable_weight` decides, for the plain and the
    tempered scores alike), the log-probabilities are those of the head's own logits: a
    head with a forward hook is called, not fused past its hook."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, max_seq_len=16,
                                    tie_embeddings=False))
    model.lm_head = HEADS[head](32, 61)
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 10)
    mask[:, 3:] = 1.0
    with torch.no_grad():
        want = token_logprobs(model(ids).logits[:, :-1] / temperature, ids[:, 1:]) * mask[:, 1:]
        got = sequence_logprobs(model, ids, mask, temperature=temperature)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
