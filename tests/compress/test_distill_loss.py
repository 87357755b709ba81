"""The fused distillation loss against the plain one over both models' whole logits:
values and the student's gradients, chunk boundaries, ignored targets, frozen and
swapped heads, autocast, and a Transformer scoring itself with it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress_helpers import V, tiny, token_ids
from heron.align import sequence_logprobs, token_logprobs
from heron.compress.distill import teacher_states
from heron.compress.distill_loss import distillation_loss, linear_distillation_loss
from heron.compress.qlinear import QuantLinear
from heron.compress.schemes import Int8PerChannel, quantize_rtn
from heron.core import head_loss
from heron.core.head_loss import IGNORE_INDEX, fusable_weight, linear_cross_entropy
from heron.core.linear import Linear

D, D_TEACHER, VOCAB = 16, 24, 50


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows, so a few dozen rows make several chunks and a ragged last one."""
    monkeypatch.setattr(head_loss, "MIN_CHUNK_ROWS", 7)
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 1)


def case(seed: int, rows: int = 40):
    """(student hidden (3, rows, D) with gradient, student head, teacher hidden, teacher head
    (with a bias: any module), targets with some ignored)."""
    torch.manual_seed(seed)
    hidden = torch.randn(3, rows, D, requires_grad=True)
    head = Linear(D, VOCAB, bias=False)
    teacher_hidden = torch.randn(3, rows, D_TEACHER)
    teacher_head = nn.Linear(D_TEACHER, VOCAB)
    targets = torch.randint(0, VOCAB, (3, rows))
    targets[0, :5] = IGNORE_INDEX
    targets[2, -3:] = IGNORE_INDEX
    return hidden, head, teacher_hidden, teacher_head, targets


def plain(hidden, head, teacher_hidden, teacher_head, targets, **settings) -> torch.Tensor:
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden).float()
    return distillation_loss(head(hidden).float(), teacher_logits, targets, **settings)


def gradients(loss: torch.Tensor, hidden: torch.Tensor, head: nn.Module) -> list[torch.Tensor]:
    wanted = [t for t in (hidden, head.weight) if t.requires_grad]
    return list(torch.autograd.grad(loss * 1.5, wanted))  # an incoming gradient other than 1


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (2.0, 0.3), (2.0, 1.0), (0.5, 0.0)])
def test_matches_the_plain_loss_values_and_gradients(small_chunks, temperature, alpha):
    hidden, head, teacher_hidden, teacher_head, targets = case(0)
    settings = dict(temperature=temperature, alpha=alpha)
    want = plain(hidden, head, teacher_hidden, teacher_head, targets, **settings)
    got = linear_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, **settings)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for g, w in zip(gradients(got, hidden, head), gradients(want, hidden, head)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_a_wrong_gradient_would_show():
    """The comparison above can fail: the plain loss at another temperature has other gradients."""
    hidden, head, teacher_hidden, teacher_head, targets = case(1)
    got = linear_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, temperature=2.0, alpha=0.5)
    other = plain(hidden, head, teacher_hidden, teacher_head, targets, temperature=1.0, alpha=0.5)
    assert not torch.allclose(gradients(got, hidden, head)[0], gradients(other, hidden, head)[0], atol=1e-3)


def test_ignored_rows_get_no_gradient_and_all_ignored_costs_nothing(small_chunks):
    hidden, head, teacher_hidden, teacher_head, targets = case(2)
    got = linear_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, temperature=2.0, alpha=0.5)
    grad_h = gradients(got, hidden, head)[0]
    assert torch.all(grad_h[targets == IGNORE_INDEX] == 0) and grad_h[targets != IGNORE_INDEX].abs().sum() > 0
    none = torch.full_like(targets, IGNORE_INDEX)
    empty = linear_distillation_loss(hidden, head, teacher_hidden, teacher_head, none, temperature=2.0, alpha=0.5)
    assert empty.item() == 0.0 and all(torch.all(g == 0) for g in gradients(empty, hidden, head))


def test_a_frozen_head_and_no_autograd(small_chunks):
    hidden, head, teacher_hidden, teacher_head, targets = case(3)
    head.weight.requires_grad_(False)
    settings = dict(temperature=2.0, alpha=0.5)
    got = linear_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, **settings)
    want = plain(hidden, head, teacher_hidden, teacher_head, targets, **settings)
    (g,), (w,) = gradients(got, hidden, head), gradients(want, hidden, head)
    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        off = linear_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, **settings)
    assert off.item() == pytest.approx(want.item(), rel=1e-5) and not off.requires_grad


def test_a_swapped_student_head_goes_through_its_logits():
    """A head with a bias (as an adapter or a quantised layer would be: not a bias-free linear)
    is called as a module; the result is the plain loss's, gradient to the bias included."""
    hidden, _, teacher_hidden, teacher_head, targets = case(4)
    head = nn.Linear(D, VOCAB)
    settings = dict(temperature=2.0, alpha=0.5)
    got = linear_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, **settings)
    want = plain(hidden, head, teacher_hidden, teacher_head, targets, **settings)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    got.backward()
    assert head.bias.grad is not None and head.bias.grad.abs().sum() > 0


def test_under_bf16_autocast_the_products_round_as_f_linear_does():
    hidden, head, teacher_hidden, teacher_head, targets = case(5)
    settings = dict(temperature=2.0, alpha=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, **settings)
        student_logits = head(hidden)  # bf16, as autocast makes it
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    want = distillation_loss(student_logits.float(), teacher_logits, targets, **settings)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-3)
    torch.testing.assert_close(gradients(got, hidden, head)[0], gradients(want, hidden, head)[0], rtol=0.05, atol=2e-3)


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=0.0, alpha=0.5), "temperature: must be > 0"),
    (dict(temperature=float("nan"), alpha=0.5), "temperature: must be > 0"),
    (dict(temperature=1.0, alpha=-0.1), "alpha: must be in"),
])
def test_bad_settings_name_the_setting(settings, message):
    hidden, head, teacher_hidden, teacher_head, targets = case(6, rows=4)
    with pytest.raises(ValueError, match=message):
        linear_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, **settings)


def test_mismatched_shapes_are_refused():
    hidden, head, teacher_hidden, teacher_head, targets = case(7, rows=4)
    with pytest.raises(ValueError, match=r"targets \(3, 4\) do not match .* the teacher's \(3, 3\)"):
        linear_distillation_loss(hidden, head, teacher_hidden[:, :3], teacher_head, targets, temperature=1.0,
                                 alpha=0.5)


def test_a_transformer_scores_itself_with_it_as_its_head_loss():
    """Transformer.forward(head_loss=...) hands the final norm's output and the head to the loss:
    the result is the plain loss over both models' logits, and the student's parameters get
    the plain loss's gradients."""
    teacher, student = tiny(seed=0), tiny(seed=1, d_model=32)
    torch.manual_seed(0)
    x = torch.randint(0, V, (2, 12))
    y = x.roll(-1, dims=1)
    teacher_hidden, _ = teacher_states(teacher, x)
    settings = dict(temperature=2.0, alpha=0.5)

    def fused(hidden, head, targets):
        return linear_distillation_loss(hidden, head, teacher_hidden, teacher.lm_head, targets, **settings)

    got = student(x, targets=y, head_loss=fused)
    assert got.logits is None
    got_grads = torch.autograd.grad(got.loss, list(student.parameters()))
    with torch.no_grad():
        teacher_logits = teacher(x).logits
    want = distillation_loss(student(x).logits, teacher_logits, y, **settings)
    want_grads = torch.autograd.grad(want, list(student.parameters()))
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    last = "blocks.1.hook_resid_post"  # the teacher's last block: its final norm's input
    with torch.no_grad():
        assert torch.equal(teacher_hidden, teacher.norm(teacher_states(teacher, x, [last])[1][last]))


def test_a_head_loss_needs_targets_and_no_reduction():
    model = tiny(seed=0)
    x = torch.randint(0, V, (1, 5))

    def loss(hidden, head, targets):
        return F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), reduction="sum")

    with pytest.raises(ValueError, match="head_loss: given without targets"):
        model(x, head_loss=loss)
    with pytest.raises(ValueError, match="reduction: 'none' is cross-entropy's; a head_loss reduces its own"):
        model(x, targets=x, head_loss=loss, reduction="none")
    with torch.no_grad():  # a head loss that is cross-entropy gives the model's own
        assert model(x, targets=x, head_loss=loss).loss.item() == pytest.approx(model(x, targets=x).loss.item(),
                                                                                 rel=1e-5)


def hooked_linear(d: int, vocab: int) -> nn.Module:
    """A bias-free Linear head with a forward hook that scales its logits."""
    head = Linear(d, vocab, bias=False)
    head.register_forward_hook(lambda _module, _args, out: out * 1.5)
    return head


def quantised(weight: torch.Tensor, kernel: str | None = None) -> QuantLinear:
    codes, params = quantize_rtn(weight.detach(), Int8PerChannel())
    return QuantLinear.from_codes(codes, params, Int8PerChannel(), kernel=kernel)


@pytest.mark.parametrize("student", ["nn.Linear", "a hooked Linear", "quantised", "quantised, dynamic kernel"])
def test_every_student_head_gives_its_logits_loss(small_chunks, student):
    """`fusable_weight` decides, as for cross-entropy: a bias-free nn.Linear is fused; a
    hooked or quantised head is called as a module, so the loss is its logits' own."""
    hidden, head, teacher_hidden, teacher_head, targets = case(8)
    head = {"nn.Linear": lambda: nn.Linear(D, VOCAB, bias=False), "a hooked Linear": lambda: hooked_linear(D, VOCAB),
            "quantised": lambda: quantised(head.weight), "quantised, dynamic kernel": lambda: quantised(
                head.weight, "dynamic")}[student]()
    assert (fusable_weight(head) is None) == (student != "nn.Linear")
    settings = dict(temperature=2.0, alpha=0.5)
    with torch.no_grad():  # a quantised head's kernel runs outside autograd only
        got = linear_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, **settings)
        want = plain(hidden, head, teacher_hidden, teacher_head, targets, **settings)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("kernel", [None, "dynamic"])
def test_a_quantised_output_head_is_never_fused(kernel):
    """A quantised head's `.weight` is a dequantised copy, and its forward may run a kernel
    that rounds otherwise (`dynamic` quantises the activations as well): the model's loss
    and alignment's log-probabilities, tempered or not, are its logits' own."""
    model = tiny(seed=0, tie_embeddings=False)
    model.lm_head = quantised(model.lm_head.weight, kernel)
    x = token_ids(2, 12, seed=1)
    y = x.roll(-1, dims=1)
    mask = torch.ones(2, 12)
    with torch.no_grad():
        logits = model(x).logits  # (2, 12, V)
        loss = model(x, targets=y).loss
        assert loss.item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item(),
                                            rel=1e-5)
        for temperature in (1.0, 0.5):
            want = token_logprobs(logits[:, :-1] / temperature, x[:, 1:])
            torch.testing.assert_close(sequence_logprobs(model, x, mask, temperature=temperature), want,
                                       rtol=1e-5, atol=1e-5)
        if model.lm_head.kernel == "dynamic":  # fused on the dequantised weight, the scores would be others
            hidden, _ = teacher_states(model, x)
            fused = linear_cross_entropy(hidden, model.lm_head.weight, y, "none")  # (2, 12)
            assert (fused - model(x, targets=y, reduction="none").loss).abs().max() > 1e-3
