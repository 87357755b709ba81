"""SwiGLU's activation kernel (csrc/activation.c, core/swiglu.py) against torch's
silu(gate) * up and its autograd gradient."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from heron.core import swiglu as swiglu_module
from heron.core.config import ModelConfig
from heron.core.mlp import MLP, activate
from heron.core.swiglu import activation_kernels, swiglu, swiglu_halves

built = pytest.mark.skipif(activation_kernels() is None, reason="Heron's activation kernels are not built here")


def test_the_activation_kernels_are_built_where_they_can_be():
    """setup.py builds them as an optional extension, and the tests that need them skip where
    it is missing: with a C compiler, a missing module means the build broke."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: the activation kernels are not expected here")
    assert activation_kernels() is not None


def _hidden(rows: int, ff: int, seed: int) -> torch.Tensor:
    """(rows, 2 ff): gates from where e^-x underflows to where it overflows, at several scales."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 10.0, 60.0]).repeat(rows // 3 + 1)[:rows, None]
    h = torch.randn(rows, 2 * ff, generator=generator) * scales
    h[0, :ff] = torch.linspace(-120, 120, ff)  # past both ends of the range the exponential clamps to
    return h


def _reference(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor):
    """torch's output and gradients of silu(gate) * up."""
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    out = F.silu(gate) * up
    out.backward(grad)
    return out.detach(), gate.grad, up.grad


def _assert_close_to_torch(got, expected):
    """Its exponential is a polynomial of its own (csrc/vector_math.h): the output within a
    few ulp of torch's, near-zero values allowed their absolute error."""
    torch.testing.assert_close(got, expected, rtol=1.6e-6, atol=1e-30)


def _assert_gradient_close_to_torch(got, expected):
    """silu'(x) = s (1 + x (1 - s)) cancels near x = -1.28, where the exponential's last-ulp
    difference becomes a relative one of ~1e-5 (an absolute one of ~1e-8): a few ulp of the
    gradients' scale, not of each element."""
    torch.testing.assert_close(got, expected, rtol=1.6e-6, atol=1e-7 * float(expected.abs().max()))


@built
@pytest.mark.parametrize("rows, ff, threads", [(3, 1, 1), (3, 8, 1), (5, 44, 1), (3, 1408, 1), (97, 1000, 2)])
def test_halves_forward_and_gradient_equal_torch_to_a_few_ulp(rows, ff, threads):
    """h's gradient comes back as one tensor of its shape; ff that is not a multiple of 8 takes
    the scalar tail; past PARALLEL_ELEMENTS the rows are shared between threads, unevenly for an odd count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        h = _hidden(rows, ff, seed=rows + ff).requires_grad_()
        grad = torch.randn(rows, ff, generator=torch.Generator().manual_seed(1))
        out = swiglu_halves(h)
        out.backward(grad)
    finally:
        torch.set_num_threads(previous)
    expected, grad_gate, grad_up = _reference(*h.detach().chunk(2, dim=-1), grad)
    _assert_close_to_torch(out.detach(), expected)
    _assert_gradient_close_to_torch(h.grad, torch.cat([grad_gate, grad_up], dim=-1))


@built
def test_two_tensors_forward_and_gradient_equal_torch_to_a_few_ulp():
    gate, up = (_hidden(6, 40, seed=3)[:, :40].reshape(2, 3, 40) for _ in range(2))  # (B, T, ff): any leading dims
    up = up.flip(-1).contiguous()  # gates and ups that differ
    grad = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(2))
    gate_in, up_in = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = swiglu(gate_in, up_in)
    out.backward(grad)
    expected, grad_gate, grad_up = _reference(gate, up, grad)
    _assert_close_to_torch(out.detach(), expected)
    _assert_gradient_close_to_torch(gate_in.grad, grad_gate)
    _assert_gradient_close_to_torch(up_in.grad, grad_up)


@built
def test_without_gradients_it_computes_the_same_forward():
    h = _hidden(4, 24, seed=5)
    with torch.no_grad():
        plain = swiglu_halves(h)
    tracked = swiglu_halves(h.clone().requires_grad_())
    assert torch.equal(plain, tracked.detach())
    with torch.inference_mode():  # two tensors: the same kernel
        assert torch.equal(swiglu(*(half.contiguous() for half in h.chunk(2, dim=-1))), plain)


@pytest.mark.parametrize("case", ["bf16", "strided", "float64", "odd width"])
def test_what_the_kernel_does_not_take_goes_to_torch_exactly(case):
    """Other dtypes, views with gaps and an odd last dimension (no gate and up halves)
    compute exactly torch's expression."""
    generator = torch.Generator().manual_seed(7)
    h = torch.randn(5, 12, generator=generator)
    if case == "bf16":
        h = h.bfloat16()
    elif case == "float64":
        h = h.double()
    elif case == "strided":
        h = torch.randn(12, 5, generator=generator).t()
    if case == "odd width":
        h = h[:, :11]
        with pytest.raises(RuntimeError):  # chunk gives halves of 6 and 5: torch's own error
            swiglu_halves(h)
        return
    gate, up = h.chunk(2, dim=-1)
    assert torch.equal(swiglu_halves(h), F.silu(gate) * up)
    assert torch.equal(swiglu(gate.t().contiguous().t(), up), F.silu(gate) * up)


@built
def test_an_mlp_trains_alike_with_and_without_the_kernel(monkeypatch):
    """The dense MLP (two products over many rows) and `activate` on a fused product (a MoE's
    experts): one training step's loss and gradients within fp32 rounding of torch's path."""
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=40)
    torch.manual_seed(0)
    mlp = MLP(config)
    x = torch.randn(2, 9, 32)  # 18 rows: past MAX_ROWS, the two-product path

    def step():
        mlp.zero_grad(set_to_none=True)
        loss = mlp(x).square().mean() + activate(mlp.up(x), "swiglu").sum() * 1e-3
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in mlp.parameters()]

    loss, grads = step()
    monkeypatch.setattr(swiglu_module, "activation_kernels", lambda: None)
    loss_torch, grads_torch = step()
    torch.testing.assert_close(loss, loss_torch, rtol=1e-6, atol=0)
    for got, expected in zip(grads, grads_torch):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@built
@pytest.mark.parametrize("call, args, message", [
    ("swiglu", (0, 0, 4, 0, 4, 0, 1), "rows, ff and threads at least 1"),
    ("swiglu", (0, 0, 3, 2, 4, 0, 1), "stride at least ff"),
    ("swiglu", (0, 0, 4), "swiglu\\(gate_ptr"),
    ("swiglu_backward", (0, 0, 8, 0, 2, 4, 0, 0, 2, 1), "both strides at least ff"),
])
def test_the_kernels_refuse_bad_arguments_with_their_signature(call, args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        getattr(activation_kernels(), call)(*args)
