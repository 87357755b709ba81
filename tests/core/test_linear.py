import torch
import torch.nn.functional as F

from heron.core.linear import MAX_ROWS, Linear


def test_few_row_fast_path_equals_f_linear():
    torch.manual_seed(0)
    layer = Linear(48, 64, bias=True)
    for shape in [(1, 1, 48), (3, 48), (2, 8, 48)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            fast = layer(x)
        assert fast.shape == (*shape[:-1], 64)
        assert torch.allclose(fast, F.linear(x, layer.weight, layer.bias), atol=1e-6)


def test_training_and_many_rows_take_the_plain_path_bit_for_bit():
    torch.manual_seed(0)
    layer = Linear(32, 40, bias=False)
    x = torch.randn(4, 32, requires_grad=True)
    assert torch.equal(layer(x), F.linear(x, layer.weight))  # autograd on: plain path
    big = torch.randn(MAX_ROWS + 1, 32)
    with torch.inference_mode():
        assert torch.equal(layer(big), F.linear(big, layer.weight))


def test_is_an_ordinary_linear_for_swapping():
    assert isinstance(Linear(4, 8), torch.nn.Linear)
