"""Sparse autoencoders: planted dictionaries are recovered, metrics give their
known answers on constructed SAEs, top contexts equal brute force, and
saving, loading and resuming change nothing."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import heron.interpret.sae as sae_module
from heron.core import ModelConfig, Transformer
from heron.interpret.sae import (
    SAESettings,
    SAETraining,
    SparseAutoencoder,
    capture,
    evaluate_sae,
    gather_activations,
    loss_recovered,
    sample_windows,
    top_activating_contexts,
    train_sae,
    train_sae_on_model,
)
from heron.interpret.sae_store import load_sae, save_sae

# One thread: tiny models gain nothing from two, and on a busy two-core machine
# contending threads make each op many times slower.
torch.set_num_threads(1)

HOOK = "blocks.0.hook_mlp_out"


def planted_dictionary(n: int = 20000, d: int = 32, atoms: int = 64, active: int = 3, seed: int = 0):
    """n samples, each a non-negative combination (weights in [0.5, 1.5)) of `active`
    of `atoms` random unit directions in R^d; returns (samples (n, d), atoms (atoms, d))."""
    g = torch.Generator().manual_seed(seed)
    atoms_ = F.normalize(torch.randn(atoms, d, generator=g), dim=1)  # (A, d)
    chosen = torch.rand(n, atoms, generator=g).argsort(1)[:, :active]  # (n, active)
    codes = torch.zeros(n, atoms).scatter(1, chosen, torch.rand(n, active, generator=g) + 0.5)  # (n, A)
    return codes @ atoms_, atoms_


def mean_max_cosine(atoms: torch.Tensor, W_dec: torch.Tensor) -> float:
    """For each true atom (A, d), its best cosine with a learned decoder column of W_dec (d, m), averaged."""
    return (atoms @ F.normalize(W_dec, dim=0)).max(dim=1).values.mean().item()


def make_model() -> Transformer:
    # A larger init_std than training's, so ablating one MLP visibly changes the loss.
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, init_std=0.3)
    return Transformer(config).eval()


def make_windows(n: int = 12, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (n, T), generator=torch.Generator().manual_seed(seed))


def constructed_sae(d: int, W_enc: torch.Tensor, W_dec: torch.Tensor) -> SparseAutoencoder:
    """An l1-mode (plain ReLU) SAE with the given weights, zero biases and unit input scale."""
    sae = SparseAutoencoder(d, SAESettings(sparsity="l1", expansion=W_enc.shape[0] // d))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc), sae.W_dec.copy_(W_dec), sae.b_enc.zero_(), sae.b_dec.zero_()
    return sae


# ----- (1) planted dictionaries -------------------------------------------------


def test_topk_sae_recovers_a_planted_dictionary_at_l0_k():
    x, atoms = planted_dictionary()
    settings = SAESettings(sparsity="topk", k=3, expansion=4, lr=3e-3, steps=400, batch_size=256, aux_k=32)
    sae = train_sae(x, settings, progress=False).sae
    assert mean_max_cosine(atoms, sae.W_dec.detach()) > 0.9
    # (3) top-k keeps exactly k features on every token (all k pre-activations are positive here).
    f = sae.encode(x[:2000])
    assert torch.equal((f > 0).sum(-1), torch.full((2000,), 3))


def test_l1_sae_recovers_a_planted_dictionary():
    x, atoms = planted_dictionary()
    settings = SAESettings(sparsity="l1", l1_coeff=2.0, expansion=2, lr=1e-2, steps=600, batch_size=256)
    sae = train_sae(x, settings, progress=False).sae
    assert mean_max_cosine(atoms, sae.W_dec.detach()) > 0.9
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(sae.n_features), atol=1e-5)  # kept on the unit sphere


# ----- (2) the loss-recovered metric on known answers ------------------------------------


def test_loss_recovered_formula():
    assert loss_recovered(clean=2.0, ablated=4.0, spliced=2.5) == 0.75
    assert loss_recovered(clean=2.0, ablated=4.0, spliced=2.0) == 1.0
    assert loss_recovered(clean=2.0, ablated=4.0, spliced=4.0) == 0.0


def test_identity_sae_recovers_all_the_loss_and_a_zero_sae_none():
    model, windows, d = make_model(), make_windows(), 32
    eye = torch.eye(d)
    # ReLU passes only positive parts, so the exact identity needs both signs:
    # x = relu(x) - relu(-x), i.e. m = 2d, W_enc = [I; -I], W_dec = [I, -I].
    identity = constructed_sae(d, torch.cat([eye, -eye]), torch.cat([eye, -eye], dim=1))
    mean = gather_activations(model, windows, HOOK).flatten(0, 1).mean(0)
    metrics = evaluate_sae(model, identity, windows, HOOK, mean_activation=mean, batch_size=5)
    assert metrics.loss_zero != metrics.loss_clean
    assert metrics.loss_sae == metrics.loss_clean
    assert metrics.loss_recovered == 1.0 and metrics.loss_recovered_mean == 1.0
    assert metrics.normalized_mse == 0.0
    assert metrics.l0 == d  # exactly one of relu(x_i), relu(-x_i) is non-zero
    assert metrics.tokens == windows.numel()

    zero = constructed_sae(d, torch.cat([eye, -eye]), torch.zeros(d, 2 * d))
    metrics = evaluate_sae(model, zero, windows, HOOK, batch_size=5)
    assert metrics.loss_sae == metrics.loss_zero
    assert metrics.loss_recovered == 0.0
    assert metrics.loss_mean is None and metrics.loss_recovered_mean is None


def test_train_sae_on_model_topk_l0_is_k_on_held_out_windows():
    model = make_model()
    settings = SAESettings(sparsity="topk", k=4, expansion=4, steps=30, batch_size=64)
    sae, metrics = train_sae_on_model(model, make_windows(n=20), HOOK, settings, progress=False)
    assert sae.hook_name == HOOK
    assert metrics.l0 == 4.0
    assert metrics.tokens == 2 * 16  # the last 10% of 20 windows are held out
    assert 0.0 < metrics.normalized_mse < 1.0 and metrics.loss_mean is not None


# ----- (4) top-activating contexts ------------------------------------------------


def test_top_activating_contexts_equal_brute_force():
    model, windows = make_model(), make_windows(n=23, T=16)
    acts = gather_activations(model, windows, HOOK)
    sae = SparseAutoencoder(32, SAESettings(sparsity="topk", k=2, expansion=2))
    sae.fit_input(acts.flatten(0, 1))
    k, c = 4, 2
    top = top_activating_contexts(model, sae, windows, HOOK, k=k, context=c, batch_size=5)

    f = torch.cat([sae.encode(acts[i : i + 5]) for i in range(0, 23, 5)])  # (N, T, m), batched as above
    peak, position = f.max(dim=1)  # (N, m)
    assert (peak > 0).sum(0).min() < k  # some feature fires in fewer than k windows: the padding is tested
    for j in range(sae.n_features):
        order = sorted((w for w in range(23) if peak[w, j] > 0), key=lambda w: (-peak[w, j], w))[:k]
        n = len(order)
        assert top.windows[j, :n].tolist() == order and (top.windows[j, n:] == -1).all()
        assert torch.equal(top.values[j, :n], peak[order, j]) and (top.values[j, n:] == 0).all()
        assert top.positions[j, :n].tolist() == position[order, j].tolist()
        for slot, (w, p) in enumerate(zip(order, position[order, j].tolist())):
            expected = [windows[w, q].item() if 0 <= q < 16 else -1 for q in range(p - c, p + c + 1)]
            assert top.tokens[j, slot].tolist() == expected
        assert (top.tokens[j, n:] == -1).all()


def test_top_activating_contexts_at_a_per_head_hook_take_each_positions_highest_head():
    """blocks.0.attn.hook_k is (B, KV, T, hd): a window's peak is over its heads and positions,
    and the position reported is the position, not a head (max over axis 1 took heads for it)."""
    model, windows, hook = make_model(), make_windows(n=11, T=16), "blocks.0.attn.hook_k"
    acts = gather_activations(model, windows, hook)  # (N, KV, T, hd)
    assert acts.shape == (11, 2, 16, 8)
    sae = SparseAutoencoder(8, SAESettings(sparsity="topk", k=2, expansion=2))
    sae.fit_input(acts.flatten(0, -2))
    top = top_activating_contexts(model, sae, windows, hook, k=3, context=1, batch_size=4)
    f = torch.cat([sae.encode(acts[i : i + 4]) for i in range(0, 11, 4)])  # (N, KV, T, m), batched as above
    peak, position = f.amax(dim=1).max(dim=1)  # (N, m): the highest head at each position, then the position
    for j in range(sae.n_features):
        order = sorted((w for w in range(11) if peak[w, j] > 0), key=lambda w: (-peak[w, j], w))[:3]
        assert top.windows[j, : len(order)].tolist() == order
        assert torch.equal(top.values[j, : len(order)], peak[order, j])
        assert top.positions[j, : len(order)].tolist() == position[order, j].tolist()
    assert int(top.positions.max()) > 1  # positions, not the 2 heads


def moe_model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.3,
                         feed_forward=("moe",), moe={"n_experts": 4, "top_k": 2})
    return Transformer(config).eval()


def test_an_sae_on_a_moe_layers_expert_rows_trains_and_evaluates_but_has_no_contexts():
    """hook_expert_in is (A, d), a row per token-to-expert assignment: training and the
    evaluation's mean ablation (a broadcast tensor: it crashed F.grouped_mm) run; top contexts,
    which need positions, are refused naming the hook and its shape."""
    model, hook = moe_model(), "blocks.0.mlp.hook_expert_in"
    settings = SAESettings(k=4, expansion=2, aux_k=8, steps=10, batch_size=64)
    sae, metrics = train_sae_on_model(model, make_windows(n=10), hook, settings, progress=False)
    assert metrics.tokens == 16 * 2  # one held-out window of 16 tokens, each sent to 2 experts
    assert metrics.loss_mean is not None and metrics.l0 == 4.0
    with pytest.raises(ValueError, match=r"^hook_name: 'blocks.0.mlp.hook_expert_in' gives activations of shape "
                                         r"\(64, 32\) for windows of shape \(2, 16\), with no axis of positions"):
        top_activating_contexts(model, sae, make_windows(n=2), hook)


def test_a_reward_model_has_no_next_token_loss_to_measure_an_sae_by_and_is_refused_before_training(monkeypatch):
    """A scalar head (head="scalar"): the refusal comes before any activation is gathered or
    any step trained (it came after the whole training run), saying what trains one instead."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                                    head="scalar", tie_embeddings=False)).eval()

    def no_work(*args, **kwargs):
        raise AssertionError("gathered activations before refusing")

    monkeypatch.setattr(sae_module, "gather_activations", no_work)
    refusal = r"a model with head 'scalar' gives one score per position, not next-token logits.*train_sae\("
    with pytest.raises(ValueError, match="^train_sae_on_model: " + refusal):
        train_sae_on_model(model, make_windows(n=10), HOOK, SAESettings(k=4, expansion=2), progress=False)
    with pytest.raises(ValueError, match="^evaluate_sae: " + refusal):
        evaluate_sae(model, SparseAutoencoder(32, SAESettings(k=4, expansion=2)), make_windows(n=2), HOOK)


# ----- (5) saving, loading, resuming, settings ---------------------------------------


def test_save_load_round_trip_is_exact(tmp_path):
    x, _ = planted_dictionary(n=2000)
    settings = SAESettings(k=3, expansion=2, steps=10, batch_size=128, dead_tokens=500)
    training = train_sae(x, settings, progress=False)
    training.sae.hook_name = HOOK
    save_sae(tmp_path / "sae", training, metrics={"l0": 3.0})
    loaded = load_sae(tmp_path / "sae")
    assert loaded.sae.settings == settings and loaded.sae.hook_name == HOOK and loaded.step == 10
    assert loaded.metrics == {"l0": 3.0}
    for name, value in training.sae.state_dict().items():
        assert torch.equal(loaded.sae.state_dict()[name], value), name
    assert loaded.optimizer_state.keys() == training.optimizer_state.keys()
    assert all(torch.equal(loaded.optimizer_state[n], v) for n, v in training.optimizer_state.items())
    assert torch.equal(loaded.sae(x[:50])[0], training.sae(x[:50])[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temp folder left behind


def test_resumed_training_equals_an_unbroken_run(tmp_path):
    x, _ = planted_dictionary(n=1000)
    settings = SAESettings(k=3, expansion=2, steps=12, batch_size=128, lr_decay_fraction=0.5, dead_tokens=300)
    unbroken = train_sae(x, settings, progress=False)
    save_sae(tmp_path / "half", train_sae(x, settings, stop_at=6, progress=False))
    resumed = train_sae(x, settings, resume_from=load_sae(tmp_path / "half"), progress=False)
    assert resumed.step == unbroken.step == 12
    for name, value in unbroken.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], value), name
    with pytest.raises(ValueError, match="lr: resuming with 0.5"):
        train_sae(x, settings.replace(lr=0.5), resume_from=load_sae(tmp_path / "half"), progress=False)


def test_resuming_twice_from_one_training_equals_resuming_once_and_the_unbroken_run():
    """Resuming advanced the given SAETraining's SAE in place but left its step and Adam
    state behind, so a second resume from it started from a corrupt mix."""
    x, _ = planted_dictionary(n=1000)
    settings = SAESettings(k=3, expansion=2, steps=12, batch_size=128, lr_decay_fraction=0.5, dead_tokens=300)
    unbroken = train_sae(x, settings, progress=False)
    half = train_sae(x, settings, stop_at=6, progress=False)
    weights = {n: v.clone() for n, v in half.sae.state_dict().items()}
    adam = {n: v.clone() for n, v in half.optimizer_state.items()}
    once = train_sae(x, settings, resume_from=half, progress=False)
    twice = train_sae(x, settings, resume_from=half, progress=False)
    assert half.step == 6 and once.step == twice.step == 12
    assert all(torch.equal(half.sae.state_dict()[n], v) for n, v in weights.items())
    assert all(torch.equal(half.optimizer_state[n], v) for n, v in adam.items())
    for name, value in unbroken.sae.state_dict().items():
        assert torch.equal(once.sae.state_dict()[name], value), name
        assert torch.equal(twice.sae.state_dict()[name], value), name


def test_float64_activations_train_a_float64_sae_that_saves_and_resumes_exactly(tmp_path):
    """float64 activations were a RuntimeError (m1 and m2 dtypes differ) in the first step."""
    x, _ = planted_dictionary(n=1000)
    settings = SAESettings(k=3, expansion=2, steps=8, batch_size=128, dead_tokens=300)
    fp32 = train_sae(x, settings, progress=False).sae
    fp64 = train_sae(x.double(), settings, progress=False)
    assert all(p.dtype == torch.float64 for p in fp64.sae.parameters())
    for name, value in fp32.state_dict().items():  # same batches, same start: equal up to fp32 rounding
        torch.testing.assert_close(fp64.sae.state_dict()[name].to(value.dtype), value, atol=1e-4, rtol=1e-4)
    save_sae(tmp_path / "half", train_sae(x.double(), settings, stop_at=4, progress=False))
    resumed = train_sae(x.double(), settings, resume_from=load_sae(tmp_path / "half"), progress=False)
    for name, value in fp64.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], value), name
    assert train_sae(x.bfloat16(), settings, stop_at=1, progress=False).sae.W_enc.dtype == torch.float32


def test_dead_feature_accounting_counts_tokens_since_each_feature_fired():
    sae = SparseAutoencoder(4, SAESettings(sparsity="l1", expansion=1, dead_tokens=5))
    sae.count_firing(torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 0]]))  # 3 tokens
    sae.count_firing(torch.tensor([[0, 0, 3.0, 0], [0, 0, 0, 0]]))  # 2 more
    assert sae.tokens_since_fired.tolist() == [2, 2, 0, 5]
    assert sae.dead_features().tolist() == [False, False, False, True]


@pytest.mark.parametrize(
    ("field", "value"),
    [("sparsity", "relu"), ("k", 0), ("expansion", -1), ("lr", 0.0), ("lr_decay_fraction", 1.5),
     ("aux_coeff", -1.0), ("batch_size", 2.5), ("steps", True), ("dead_tokens", 0)],
)
def test_bad_settings_raise_naming_the_field(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        SAESettings(**{field: value})


def test_unknown_settings_key_and_oversized_k_are_named():
    with pytest.raises(ValueError, match="expansion_factor"):
        SAESettings.from_dict({"expansion_factor": 4})
    with pytest.raises(ValueError, match="k: 40 exceeds n_features 32"):
        SparseAutoencoder(16, SAESettings(k=40, expansion=2))
    assert SAESettings.from_dict(SAESettings(k=5).to_dict()) == SAESettings(k=5)



def test_activations_no_sae_can_learn_from_are_refused_before_any_step():
    """A NaN row made every weight NaN without an error, and all-zero activations (an
    attention-only layer's hook_mlp_out) were a ZeroDivisionError in the input scale."""
    settings = SAESettings(k=2, expansion=2, steps=3, batch_size=8)
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    x[7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^activations: row 7 holds NaN or inf \(1 of 20 rows do\)"):
        train_sae(x, settings, progress=False)
    with pytest.raises(ValueError, match=r"^activations: all 20 rows are zero.*hook_mlp_out"):
        train_sae(torch.zeros(20, 4), settings, progress=False)
    with pytest.raises(ValueError, match="^activations: no rows"):
        train_sae(torch.zeros(0, 4), settings, progress=False)
    attention_only = Transformer(ModelConfig(vocab_size=50, d_model=8, n_layers=1, n_heads=2, max_seq_len=16,
                                             feed_forward=("none",))).eval()
    with pytest.raises(ValueError, match="^activations: all .* rows are zero"):
        train_sae_on_model(attention_only, make_windows(n=4, T=8), "blocks.0.hook_mlp_out", settings, progress=False)

# ----- activations ----------------------------------------------------------------


def test_capture_stops_at_the_hook_and_equals_the_full_forward():
    model, ids = make_model(), make_windows(n=3)
    seen = []
    with model.hooks({HOOK: lambda a, _: seen.append(a)}):
        model(ids)
    assert torch.equal(capture(model, ids, HOOK), seen[0])
    reached = []
    with model.hooks({"blocks.1.hook_resid_pre": lambda a, _: reached.append(a)}):
        capture(model, ids, HOOK)
    assert reached == []  # the layers above the hook never ran


def test_sample_windows_are_contiguous_slices_of_the_stream():
    stream = np.arange(1000, dtype=np.uint16)
    windows = sample_windows(stream, 6, 20, seed=3)
    assert windows.shape == (6, 20)
    assert (windows.diff(dim=1) == 1).all()
    assert torch.equal(windows, sample_windows(stream, 6, 20, seed=3))


def test_sae_training_dataclass_saves_a_bare_sae_as_finished(tmp_path):
    sae = SparseAutoencoder(8, SAESettings(k=2, expansion=2, steps=7))
    save_sae(tmp_path / "bare", sae)
    loaded = load_sae(tmp_path / "bare")
    assert isinstance(loaded, SAETraining) and loaded.step == 7 and loaded.optimizer_state == {}
    assert dataclasses.asdict(loaded.sae.settings) == dataclasses.asdict(sae.settings)


def test_save_sae_replaces_an_sae_folder_and_refuses_anything_else(tmp_path):
    sae = SparseAutoencoder(8, SAESettings(k=2, expansion=2, steps=7))
    save_sae(tmp_path / "sae", sae)
    save_sae(tmp_path / "sae", sae)  # an SAE folder save_sae wrote is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    (tmp_path / "mine" / "sae.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"mine: holds files save_sae did not write \(notes.txt\)"):
        save_sae(tmp_path / "mine", sae)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my notes"
    (tmp_path / "file.bin").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"file.bin: exists and is not a folder"):
        save_sae(tmp_path / "file.bin", sae)
    assert (tmp_path / "file.bin").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "mine", "sae"]  # no .trash-* left


def test_evaluate_sae_at_a_hook_of_another_width_names_the_sae_and_its_d_in():
    sae = SparseAutoencoder(32, SAESettings(k=2, expansion=2), hook_name=HOOK)
    with pytest.raises(ValueError, match=r"hook_name: 'blocks.0.attn.hook_pattern' gives activations of width 16, "
                                         r"but the SAE takes d_in 32 \(it was trained on 'blocks.0.hook_mlp_out'\)"):
        evaluate_sae(make_model(), sae, make_windows(n=2), "blocks.0.attn.hook_pattern")
