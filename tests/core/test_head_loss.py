"""The fused head loss against the plain one: F.cross_entropy over F.linear's logits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from heron.core import ModelConfig, Transformer
from heron.core import head_loss
from heron.core.head_loss import (IGNORE_INDEX, REDUCTIONS, fusable_weight, head_cross_entropy, linear_cross_entropy,
                                  next_token_targets)
from heron.core.gemm import ROW_QUANTUM
from heron.core.linear import Linear


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows, so a few dozen rows make several chunks and a ragged last one."""
    monkeypatch.setattr(head_loss, "MIN_CHUNK_ROWS", 7)
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 1)


def plain(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def loss_and_grads(loss_fn, hidden, weight, targets, reduction: str = "sum", scale: float | torch.Tensor = 1.0):
    """(loss, hidden's gradient, weight's) with `scale` as the loss's incoming gradient:
    a number for the summed loss, one per position (targets' shape) for reduction "none"."""
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = loss_fn(hidden, weight, targets, reduction=reduction)
    (loss * scale).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


def incoming(reduction: str, shape: tuple[int, ...], gen: torch.Generator) -> float | torch.Tensor:
    """An incoming gradient other than 1, as the loop's 1 / tokens is, or one per
    position (signed, as a DPO loss weighs chosen and rejected tokens)."""
    return 0.37 if reduction == "sum" else torch.randn(shape, generator=gen)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, vocab, ignored", [((3, 11), 50, 0.0), ((2, 20), 300, 0.3), ((45,), 13, 0.9),
                                                   ((4, 5), 64, 1.0)])
def test_equals_cross_entropy_over_the_logits(small_chunks, shape, vocab, ignored, reduction) -> None:
    gen = torch.Generator().manual_seed(len(shape) * vocab)
    hidden = torch.randn(*shape, 16, generator=gen)
    weight = torch.randn(vocab, 16, generator=gen)
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < ignored] = IGNORE_INDEX
    scale = incoming(reduction, shape, gen)
    expected = loss_and_grads(plain, hidden, weight, targets, reduction, scale)
    fused = loss_and_grads(linear_cross_entropy, hidden, weight, targets, reduction, scale)
    for name, want, got in zip(("loss", "hidden grad", "weight grad"), expected, fused):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    if reduction == "none":  # ignored positions: exactly zero, as F.cross_entropy gives
        assert torch.equal(fused[0][targets == IGNORE_INDEX], torch.zeros(int((targets == IGNORE_INDEX).sum())))
    with torch.no_grad():  # the loss alone, no gradient products
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, reduction), expected[0],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_a_frozen_side_gets_no_gradient_and_the_other_the_same(small_chunks, reduction) -> None:
    gen = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(20, 8, generator=gen), torch.randn(30, 8, generator=gen)
    targets = torch.randint(0, 30, (20,), generator=gen)
    scale = incoming(reduction, (20,), gen)
    _, want_h, want_w = loss_and_grads(plain, hidden, weight, targets, reduction, scale)
    for trainable in ("hidden", "weight"):
        h = hidden.clone().requires_grad_(trainable == "hidden")
        w = weight.clone().requires_grad_(trainable == "weight")
        (linear_cross_entropy(h, w, targets, reduction) * scale).sum().backward()
        assert (h.grad is None) == (trainable == "weight") and (w.grad is None) == (trainable == "hidden")
        got, want = (h.grad, want_h) if trainable == "hidden" else (w.grad, want_w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_large_logits_stay_finite(small_chunks, reduction) -> None:
    """Logits far beyond exp's range: the running maximum keeps the softmax finite."""
    hidden = torch.tensor([[300.0, 0.0], [0.0, -250.0]] * 5)
    weight = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([1, 0] * 5)
    expected = loss_and_grads(plain, hidden, weight, targets, reduction)
    fused = loss_and_grads(linear_cross_entropy, hidden, weight, targets, reduction)
    # Rows (300, 0) score (300, -300, 0) and want -300: 600 nats each; rows (0, -250) score
    # (0, 0, -250) and want 0: log 2 each.
    assert float(fused[0].sum()) == pytest.approx(5 * 600 + 5 * math.log(2), rel=1e-6)
    for want, got in zip(expected, fused):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_under_bf16_autocast_the_products_round_as_linear_does(small_chunks, reduction) -> None:
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(30, 32, generator=gen), torch.randn(40, 32, generator=gen) * 0.2
    targets = torch.randint(0, 40, (30,), generator=gen)
    scale = 1.0 if reduction == "sum" else torch.rand((30,), generator=gen) + 0.5  # positive: sums stay large
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(plain, hidden, weight, targets, reduction, scale)
        fused = loss_and_grads(linear_cross_entropy, hidden, weight, targets, reduction, scale)
    assert fused[0].dtype == torch.float32 and fused[2].dtype == torch.float32
    # fp32: the fused loss rounds like bf16, not fp32
    exact = loss_and_grads(plain, hidden, weight, targets, reduction, scale)
    got, want, fp32 = float(fused[0].sum()), float(expected[0].sum()), float(exact[0].sum())
    assert got == pytest.approx(want, rel=2e-3)
    assert abs(got - fp32) > abs(got - want)
    for want, got in zip(expected[1:], fused[1:]):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"targets \(4,\) do not match the hidden states' \(5,\)"):
        linear_cross_entropy(torch.randn(5, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"head weight \(10, 6\) does not take width 8"):
        linear_cross_entropy(torch.randn(5, 8), torch.randn(10, 6), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"reduction 'mean' is not one of \('sum', 'none'\)"):
        linear_cross_entropy(torch.randn(5, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long), "mean")


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, **overrides)
    return Transformer(config).train()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tied", [True, False])
def test_transformer_targets_give_the_loss_and_gradients_of_its_logits(small_chunks, tied, reduction) -> None:
    model = make_model(tie_embeddings=tied)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (3, 12), generator=gen)
    y = torch.roll(x, -1, dims=1)
    y[0, :5] = IGNORE_INDEX  # a prompt, as SFT masks it
    scale = incoming(reduction, (3, 12), gen)

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        out = model(x, targets=y, reduction=reduction) if fused else model(x)
        loss = out.loss if fused else plain_loss(out.logits, y, reduction)
        assert (out.logits is None) == fused
        (loss * scale).sum().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (want, want_grads), (got, got_grads) = run(False), run(True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


class SwappedHead(nn.Module):
    """A head that is not the plain linear layer (as a quantised or adapted one is)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + 0.5


def plain_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_a_swapped_head_is_called_as_a_module(reduction) -> None:
    model = make_model(tie_embeddings=False).eval()
    model.lm_head = SwappedHead(model.lm_head)
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = plain_loss(model(x).logits, x, reduction)
        torch.testing.assert_close(model(x, targets=x, reduction=reduction).loss, want)
    with pytest.raises(ValueError, match="reduction: 'mean' is not one of"):
        model(x, targets=x, reduction="mean")
    with pytest.raises(ValueError, match="reduction: 'none' reduces the loss, which needs targets"):
        model(x, reduction="none")


def test_a_scalar_head_has_no_next_token_loss() -> None:
    model = make_model(head="scalar", tie_embeddings=False)
    with pytest.raises(ValueError, match="head 'scalar' has no next-token loss"):
        model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long))


def test_next_token_targets_shift_by_one_and_skip_what_is_not_counted() -> None:
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    I = IGNORE_INDEX  # noqa: E741
    assert next_token_targets(ids).tolist() == [[6, 7, 8, I], [2, 3, 4, I]]
    counted = torch.tensor([[True, True, False, True], [False, False, True, True]])
    assert next_token_targets(ids, counted).tolist() == [[6, I, 8, I], [I, 3, 4, I]]


class AddingLinear(Linear):
    """A subclass of the linear layer whose forward adds to the product (as an adapter's does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.5


def tied_head() -> nn.Module:
    """A head whose weight is an embedding's parameter, as `tie_embeddings` makes it."""
    head = Linear(16, 40, bias=False)
    head.weight = nn.Embedding(40, 16).weight
    return head


def hooked(head: nn.Module) -> nn.Module:
    """The head with a forward hook that scales its logits."""
    head.register_forward_hook(lambda _module, _args, out: out * 1.5)
    return head


# The heads whose product with `fusable_weight(head)` is what head(x) computes: fused.
FUSED_HEADS = {"Linear": lambda: Linear(16, 40, bias=False), "nn.Linear": lambda: nn.Linear(16, 40, bias=False),
               "tied Linear": tied_head}
# The heads a loss must call as modules (a quantised one: tests/compress/test_distill_loss.py).
CALLED_HEADS = {"Linear with a bias": lambda: Linear(16, 40), "nn.Linear with a bias": lambda: nn.Linear(16, 40),
                "a subclass": lambda: AddingLinear(16, 40, bias=False),
                "a module around a Linear": lambda: SwappedHead(Linear(16, 40, bias=False)),
                "a hooked Linear": lambda: hooked(Linear(16, 40, bias=False))}


@pytest.mark.parametrize("name", [*FUSED_HEADS, *CALLED_HEADS])
def test_fusable_weight_takes_exactly_the_bias_free_linear_layers(name) -> None:
    torch.manual_seed(0)
    head = {**FUSED_HEADS, **CALLED_HEADS}[name]()
    assert fusable_weight(head) is (head.weight if name in FUSED_HEADS else None)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", [*FUSED_HEADS, *CALLED_HEADS])
def test_head_cross_entropy_is_the_logits_way_for_every_head(small_chunks, monkeypatch, name, reduction,
                                                             temperature) -> None:
    """Fused for the heads `fusable_weight` takes, through the module for the rest: either
    way the loss and the gradients (hidden states, every head parameter) of the logits."""
    torch.manual_seed(0)
    head = {**FUSED_HEADS, **CALLED_HEADS}[name]()
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 11, 16, generator=gen)
    targets = torch.randint(0, 40, (3, 11), generator=gen)
    targets[0, :4] = IGNORE_INDEX
    scale = incoming(reduction, (3, 11), gen)
    fused_calls = []
    monkeypatch.setattr(head_loss, "linear_cross_entropy", lambda *a: fused_calls.append(a) or linear_cross_entropy(*a))

    def run(fn):
        head.zero_grad(set_to_none=True)
        h = hidden.clone().requires_grad_()
        loss = fn(h)
        (loss * scale).sum().backward()
        return loss.detach(), h.grad, *(p.grad for p in head.parameters())

    def logits_way(h: torch.Tensor) -> torch.Tensor:
        return plain_loss(head(h).float() / temperature, targets, reduction)

    want = run(logits_way)
    got = run(lambda h: head_cross_entropy(h, head, targets, reduction, temperature))
    assert len(fused_calls) == (name in FUSED_HEADS)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# (the head, given a fresh model's width and vocabulary; whether the fused loss takes it)
MODEL_HEADS = {"Linear": (lambda d, v: Linear(d, v, bias=False), True),
               "nn.Linear": (lambda d, v: nn.Linear(d, v, bias=False), True),
               "with a bias": (lambda d, v: nn.Linear(d, v), False),
               "a hooked Linear": (lambda d, v: hooked(Linear(d, v, bias=False)), False)}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", MODEL_HEADS)
def test_the_transformer_fuses_the_heads_fusable_weight_takes_and_no_other(small_chunks, monkeypatch, name,
                                                                           reduction) -> None:
    """A bias-free nn.Linear head is fused as heron's Linear is; a head with a bias, or one
    with a forward hook (which the fused loss would skip), gives its logits' loss."""
    model = make_model(tie_embeddings=False)
    make_head, fusable = MODEL_HEADS[name]
    torch.manual_seed(3)
    model.lm_head = make_head(32, 97)
    fused_calls = []
    monkeypatch.setattr(head_loss, "linear_cross_entropy", lambda *a: fused_calls.append(a) or linear_cross_entropy(*a))
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = plain_loss(model(x).logits, x, reduction)
        got = model(x, targets=x, reduction=reduction).loss
    assert len(fused_calls) == fusable
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("vocab", "share", "rows"), [(32000, 1, 512), (8192, 1, 2048), (8192, 3, 640), (50257, 2, 256)])
def test_chunks_take_whole_quanta_of_rows_for_onednn(vocab, share, rows):
    # 2**24 logits over 32,000 words is 524 rows: oneDNN would take 512 and MKL the other 12
    h, weight = torch.empty(4096, 8), torch.empty(vocab, 8)
    taken, buffer = head_loss.chunking(h, weight, share)
    assert (taken, tuple(buffer.shape)) == (rows, (rows, vocab))
    assert taken % ROW_QUANTUM == 0
    assert head_loss.chunking(h[:100], weight, share)[0] == min(100, rows)  # fewer rows than a chunk: all of them
