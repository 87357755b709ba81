import pytest
import torch
import torch.nn.functional as F

from heron.core import gemm

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


CHOICES = (gemm.gemm_backend, gemm.weight_gradient_backend)  # cached per process
ZEN4_DEFAULT = "onednn, mkl weight gradients"  # a `backend` no HERON_GEMM names: what a Zen 4 runs


def _forget_choices() -> None:
    for choice in CHOICES:
        choice.cache_clear()


@pytest.fixture
def backend(monkeypatch, request):
    """HERON_GEMM set to the test's parameter for the test alone; ZEN4_DEFAULT: oneDNN with
    MKL's weight gradients."""
    monkeypatch.setenv("HERON_GEMM", request.param.split(",")[0])
    if request.param == ZEN4_DEFAULT:
        monkeypatch.setattr(gemm, "weight_gradient_backend", lambda: "mkl")
    _forget_choices()
    yield request.param
    _forget_choices()


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to run on a CPU of the given vendor, family and torch capability, HERON_GEMM
    unset; returns the (forward, weight gradient) libraries chosen there."""
    monkeypatch.delenv("HERON_GEMM", raising=False)

    def pretend(vendor: str, capability: str, family: int = 25) -> tuple[str, str]:
        monkeypatch.setattr(gemm, "cpu_vendor", lambda: vendor)
        monkeypatch.setattr(gemm, "cpu_family", lambda: family)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        _forget_choices()
        return gemm.gemm_backend(), gemm.weight_gradient_backend()

    yield pretend
    _forget_choices()


def test_onednn_only_on_amd_cpus_with_avx512_kernels_weight_gradients_from_zen5(cpu):
    onednn = "onednn" if torch.backends.mkldnn.is_available() else "mkl"
    assert cpu("AuthenticAMD", "AVX512", family=25) == (onednn, "mkl")  # Zen 4: MKL's weight gradients faster
    assert cpu("AuthenticAMD", "AVX512", family=26) == (onednn, onednn)  # Zen 5
    assert cpu("AuthenticAMD", "AVX2", family=26) == ("mkl", "mkl")  # measured slower with AVX2 kernels
    assert cpu("GenuineIntel", "AVX512", family=6) == ("mkl", "mkl")  # MKL's own CPUs
    assert cpu("", "DEFAULT", family=0) == ("mkl", "mkl")


def test_the_environment_overrides_the_cpu_and_a_bad_value_is_named(cpu, monkeypatch):
    cpu("AuthenticAMD", "AVX512", family=26)
    monkeypatch.setenv("HERON_GEMM", "MKL")
    _forget_choices()
    assert (gemm.gemm_backend(), gemm.weight_gradient_backend()) == ("mkl", "mkl")
    if torch.backends.mkldnn.is_available():
        cpu("AuthenticAMD", "AVX512", family=25)
        monkeypatch.setenv("HERON_GEMM", "onednn")
        _forget_choices()
        assert (gemm.gemm_backend(), gemm.weight_gradient_backend()) == ("onednn", "onednn")
    monkeypatch.setenv("HERON_GEMM", "openblas")
    _forget_choices()
    for choice in (gemm.gemm_backend, gemm.weight_gradient_backend):
        with pytest.raises(ValueError, match="HERON_GEMM='openblas'.*mkl, onednn"):
            choice()


def test_reads_the_vendor_and_family_from_proc_cpuinfo():
    vendor, family = gemm.cpu_vendor(), gemm.cpu_family()
    try:
        listed = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert isinstance(vendor, str) and vendor in listed
    assert isinstance(family, int) and (family == 0 or f"cpu family\t: {family}\n" in listed)


def _operands(shape, bias: bool, input_major: bool):
    generator = torch.Generator().manual_seed(sum(shape) + 7 * bias + 3 * input_major)
    K, N = shape[-1], 24
    x = torch.randn(*shape, generator=generator)
    w = torch.randn(N, K, generator=generator)
    if input_major:  # (K, N) in memory, as decoding lays wide weights out
        w = w.t().contiguous().t()
    b = torch.randn(N, generator=generator) if bias else None
    return x, w, b


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn", "mkl", ZEN4_DEFAULT], indirect=True)
# rows: fewer than ROW_QUANTUM (MKL's alone), whole multiples (oneDNN's alone), and both
@pytest.mark.parametrize("shape", [(40, 16), (3, 17, 32), (128, 8), (2, 37, 16)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("input_major", [False, True])
def test_product_and_gradients_equal_f_linear(backend, shape, bias, input_major):
    x, w, b = _operands(shape, bias, input_major)
    operands = (x, w) + ((b,) if bias else ())
    leaves, reference = ([t.clone().requires_grad_() for t in operands] for _ in range(2))
    grad_out = torch.randn(*shape[:-1], w.shape[0], generator=torch.Generator().manual_seed(1))

    out = gemm.linear(*leaves) if bias else gemm.linear(*leaves, None)
    expected = F.linear(*reference)
    out.backward(grad_out)
    expected.backward(grad_out)

    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, reference):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)
    if backend == "mkl":  # the default path is F.linear itself
        assert torch.equal(out, expected)


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn"], indirect=True)
def test_onednn_gradient_of_a_non_contiguous_input_and_frozen_weight(backend):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, generator=generator)[:, ::2].requires_grad_()  # strided (6, 20)
    w = torch.randn(12, 20, generator=generator)  # frozen: no weight gradient is made
    y = gemm.linear(x, w)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(6, 12) @ w, rtol=1e-5, atol=1e-5)
    assert w.grad is None


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn", ZEN4_DEFAULT], indirect=True)
def test_the_weight_gradient_goes_to_the_chosen_library_plain_inputs_only(backend, monkeypatch):
    calls = []
    through_onednn = gemm._onednn_product
    monkeypatch.setattr(gemm, "_onednn_product", lambda *args: calls.append(args) or through_onednn(*args))
    generator = torch.Generator().manual_seed(11)
    w = torch.randn(12, 20, generator=generator).requires_grad_()
    wanted = 3 if backend == "onednn" else 2  # forward, input gradient and, where chosen, weight gradient
    for x, through_weight_gradient in ((torch.randn(70, 20, generator=generator), wanted),
                                       (torch.randn(70, 40, generator=generator)[:, ::2], 2)):  # gaps: MKL
        calls.clear()
        w.grad = None
        x.requires_grad_()
        gemm.linear(x, w).backward(torch.ones(70, 12))
        assert len(calls) == through_weight_gradient
        torch.testing.assert_close(w.grad, torch.ones(12, 70) @ x.detach(), rtol=1e-5, atol=1e-5)
        assert w.grad.is_contiguous()


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn"], indirect=True)
def test_onednn_is_repeatable_bit_for_bit_and_leaves_no_graph_outside_autograd(backend):
    x, w, b = _operands((100, 48), True, False)
    first = gemm.linear(x, w, b)
    assert torch.equal(first, gemm.linear(x, w, b))
    with torch.inference_mode():
        assert torch.equal(gemm.linear(x, w, b), first)
    assert first.grad_fn is None
    grads = []
    for _ in range(2):  # resumed training repeats the unbroken run's gradients bit for bit
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        gemm.linear(*leaves).square().sum().backward()
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(first, again) for first, again in zip(*grads))


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn"], indirect=True)
def test_other_dtypes_and_autocast_go_to_f_linear_unchanged(backend):
    x, w, b = _operands((8, 16), True, False)
    half = [t.to(torch.bfloat16) for t in (x, w, b)]
    assert torch.equal(gemm.linear(*half), F.linear(*half))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = gemm.linear(x, w, b), F.linear(x, w, b)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn", "mkl"], indirect=True)
def test_linear_into_writes_the_product_into_the_buffer(backend):
    for rows in (10, 64, 70):  # MKL's rows, oneDNN's, both
        x, w, _ = _operands((rows, 16), False, False)
        buffer = torch.full((rows + 2, w.shape[0]), float("nan"))
        got = gemm.linear_into(x, w, buffer[:rows])
        assert got.data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(buffer[:rows], x @ w.t(), rtol=1e-5, atol=1e-5)
        assert buffer[rows:].isnan().all()


def test_is_plain_takes_row_major_and_input_major_weights_only():
    w = torch.randn(6, 4)
    assert gemm.is_plain(w) and gemm.is_plain(w.t().contiguous().t())
    gate_of_input_major = torch.randn(8, 4).t().contiguous().t()[:4]  # rows 1 apart, columns 8: a gap
    assert not gemm.is_plain(gate_of_input_major)
    assert not gemm.is_plain(torch.randn(6, 8)[:, ::2])


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn"], indirect=True)
def test_a_weight_with_gaps_between_rows_goes_to_f_linear(backend, monkeypatch):
    # half of an input-major gate+up weight, as SwiGLU's split takes it while a model
    # laid out for decoding prefills: oneDNN reorders such a view hundreds of times slower
    calls = []
    through_onednn = gemm._onednn_product
    monkeypatch.setattr(gemm, "_onednn_product", lambda *args: calls.append(args) or through_onednn(*args))
    generator = torch.Generator().manual_seed(5)
    input_major = torch.randn(16, 8, generator=generator).t().contiguous().t()
    x = torch.randn(64, 8, generator=generator)
    assert torch.equal(gemm.linear(x, input_major[:8]), F.linear(x, input_major[:8]))
    assert calls == []
    gemm.linear(x, input_major)  # the whole input-major weight is plain: oneDNN takes it
    assert len(calls) == 1


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn"], indirect=True)
def test_grouped_product_and_gradients_equal_a_loop_of_matmuls_an_empty_group_included(backend):
    generator = torch.Generator().manual_seed(13)
    sizes = [70, 0, 64, 9]  # oneDNN's rows and MKL's, oneDNN's alone, none, MKL's alone
    x = torch.randn(sum(sizes), 16, generator=generator, requires_grad=True)
    w = torch.randn(len(sizes), 16, 24, generator=generator, requires_grad=True)
    grad_out = torch.randn(sum(sizes), 24, generator=generator)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()

    assert gemm.grouped_through_onednn(x, w)
    out = gemm.grouped_product(x, w, sizes)
    expected = torch.cat([rows @ w_e for rows, w_e in zip(x_ref.split(sizes), w_ref)])
    out.backward(grad_out)
    expected.backward(grad_out)

    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(w.grad[1], torch.zeros(16, 24))  # the expert no row chose


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn", "mkl", ZEN4_DEFAULT], indirect=True)
def test_grouped_products_go_to_onednn_only_where_every_product_does(backend):
    x, w = torch.randn(6, 16), torch.randn(3, 16, 8)
    assert gemm.grouped_through_onednn(x, w) == (backend == "onednn")
    assert not gemm.grouped_through_onednn(x.double(), w.double())
    assert not gemm.grouped_through_onednn(x, w.transpose(1, 2).contiguous().transpose(1, 2))  # not stacked row-major


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn"], indirect=True)
def test_no_rows_give_a_zero_weight_gradient(backend):  # oneDNN refuses an empty sum; MKL takes it
    x, w = torch.randn(0, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    gemm.linear(x, w).sum().backward()
    assert torch.equal(w.grad, torch.zeros(4, 8)) and x.grad.shape == (0, 8)


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn"], indirect=True)
def test_onednn_sees_rows_in_whole_multiples_of_the_quantum_only(backend, monkeypatch):
    # it builds and keeps a primitive a shape: row counts that vary (prefills, a MoE's experts) must not reach it
    rows_seen = []
    through_onednn = gemm._onednn_product
    monkeypatch.setattr(gemm, "_onednn_product", lambda x, *rest: rows_seen.append(x.shape) or through_onednn(x, *rest))
    generator = torch.Generator().manual_seed(17)
    q = gemm.ROW_QUANTUM
    w = torch.randn(12, 20, generator=generator, requires_grad=True)
    for n in (1, q - 1, q, q + 1, 2 * q + 5):
        rows_seen.clear()
        x = torch.randn(n, 20, generator=generator, requires_grad=True)
        gemm.linear(x, w).backward(torch.ones(n, 12))
        bulk = n - n % q
        # forward and input gradient take (bulk, K) rows; the weight gradient sums over bulk rows: (N, bulk)
        assert rows_seen == ([(bulk, 20), (bulk, 12), (12, bulk)] if bulk else [])
    rows_seen.clear()
    sizes = [q + 3, 2 * q, 7]
    x = torch.randn(sum(sizes), 20, generator=generator, requires_grad=True)
    experts = torch.randn(3, 20, 8, generator=generator, requires_grad=True)
    gemm.grouped_product(x, experts, sizes).sum().backward()
    assert {dim for shape in rows_seen for dim in shape} <= {q, 2 * q, 8, 20}  # features and whole quanta only
