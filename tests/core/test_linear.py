import shutil

import pytest
import torch
import torch.nn.functional as F

from heron.core.gemm import linear
import heron.core.linear as linear_module
from heron.core.linear import (K_SPLIT_ROWS, MAX_ROWS, STREAM_ROWS, Linear, is_input_major, set_decode_layout,
                               streams)


@pytest.mark.parametrize("input_major", [False, True])
def test_few_row_fast_paths_equal_f_linear(input_major):
    torch.manual_seed(0)
    layer = Linear(48, 64, bias=True)
    if input_major:  # (K, N) in memory, as set_decode_layout lays wide weights out
        layer.weight.data = layer.weight.data.t().contiguous().t()
    assert layer.weight.t().is_contiguous() == input_major
    for shape in [(1, 1, 48), (2, 48), (3, 48), (2, 8, 48)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            fast = layer(x)
        assert fast.shape == (*shape[:-1], 64)
        assert torch.allclose(fast, F.linear(x, layer.weight, layer.bias), atol=1e-6)


def test_is_input_major_reads_the_strides_as_t_is_contiguous_does():
    torch.manual_seed(0)
    for N, K in [(1, 1), (1, 4), (5, 1), (5, 4), (2, 3)]:
        w = torch.randn(N, K)
        for layout in (w, w.t().contiguous().t(), torch.randn(N, 2 * K)[:, ::2], torch.randn(N, K + 1)[:, :K]):
            assert is_input_major(layout) == layout.t().is_contiguous(), (N, K, layout.stride())


def test_training_and_many_rows_take_the_gemm_path_bit_for_bit():
    torch.manual_seed(0)
    layer = Linear(32, 40, bias=False)
    x = torch.randn(4, 32, requires_grad=True)
    assert torch.equal(layer(x), linear(x, layer.weight))  # autograd on: the GEMM, not the blocks
    big = torch.randn(MAX_ROWS + 1, 32)
    with torch.inference_mode():
        assert torch.equal(layer(big), linear(big, layer.weight))


def test_is_an_ordinary_linear_for_swapping():
    assert isinstance(Linear(4, 8), torch.nn.Linear)


def _wide_model() -> torch.nn.Module:
    from heron.models import build_model

    return build_model("test").eval()


@pytest.mark.parametrize("kernel", [False, True])
def test_decode_layout_moves_wide_weights_or_with_the_kernel_all_and_keeps_values(kernel, monkeypatch):
    if kernel and not streams():
        pytest.skip("Heron's streaming kernel is not built or does not run on this CPU")
    if not kernel:
        monkeypatch.setattr(linear_module, "_stream_kernel", lambda: None)
    model = _wide_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    moved = set_decode_layout(model, rows=1)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    wide = [m for m in linears if m.out_features > m.in_features]
    laid_out = linears if kernel else wide  # the kernel reads every weight input-major; the blocks only wide ones
    assert moved == len(laid_out) > len(wide) * kernel  # q/k/v, gate/up and the (tied) head; with it out and down
    assert all(m.weight.t().is_contiguous() for m in laid_out)
    assert model.embed.weight is model.lm_head.weight  # still tied, moved together
    assert all(m.weight.is_contiguous() for m in linears if m not in laid_out)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert set_decode_layout(model, rows=1) == 0  # idempotent
    assert set_decode_layout(model, rows=STREAM_ROWS if kernel else K_SPLIT_ROWS) == 0  # as many rows as it serves
    assert set_decode_layout(model, rows=STREAM_ROWS + 1) == moved  # more rows: back to row-major
    assert all(m.weight.is_contiguous() for m in linears)


def test_decode_layout_keeps_logits_and_training():
    torch.manual_seed(0)
    model = _wide_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.inference_mode():
        reference = model(ids).logits
    set_decode_layout(model, rows=1)
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, reference, atol=1e-5)
    model.train()  # training lays the weights back out row-major
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, Linear))
    loss = model(ids).logits.logsumexp(-1).mean()  # any loss: gradients must reach the moved weights
    loss.backward()
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.grad is not None and qkv.grad.shape == qkv.shape and qkv.grad.abs().sum() > 0


def test_a_decode_laid_out_model_saves_and_loads(tmp_path):
    from heron.train.checkpoint import load_model_folder, save_model_folder

    model = _wide_model()
    set_decode_layout(model, rows=1)
    save_model_folder(tmp_path / "ckpt", model)
    loaded, _ = load_model_folder(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_the_streaming_kernel_is_built_where_it_can_be():
    """setup.py builds it as an optional extension, and its tests skip where it is missing:
    with a C compiler on an AVX2 or AVX-512 machine, a missing kernel means the build broke."""
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")) or shutil.which("cc") is None:
        pytest.skip("no AVX2 or no C compiler: the streaming kernel is not expected here")
    assert streams()
