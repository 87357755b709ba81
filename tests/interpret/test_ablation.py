"""Ablation against references built another way: zeroing a head equals zeroing
its columns of the out projection; mean ablation writes the reference batch's
mean; zeroing every MLP equals the attention-only model with the same weights;
the repeat losses of a model that copies perfectly are known in closed form."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from heron.core import ModelConfig, Transformer
from heron.core.transformer import TransformerOutput
from heron.interpret.ablation import ablated, ablation_patches, gap_removed, repeat_losses
from heron.interpret.cache import run_with_cache
from heron.interpret.heads import repeated_tokens
from heron.interpret.patching import patch

torch.set_num_threads(1)  # tiny models gain nothing from two threads, and the machine is shared

CONFIG = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
HD = 8  # head_dim: 32 / 4


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**CONFIG, **overrides})).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(seed))


def hook_z(model: Transformer, x: torch.Tensor, layer: int) -> torch.Tensor:
    name = f"blocks.{layer}.attn.hook_z"
    return run_with_cache(model, x, [name])[1][name]  # under any ablation attached outside: hooks run in order


def test_zero_ablating_a_head_equals_zeroing_its_out_columns():
    model, x = make_model(n_kv_heads=2), ids()
    clean_z = hook_z(model, x, 1)
    with torch.no_grad(), ablated(model, heads=[(1, 2)]):
        logits = model(x).logits
        z = hook_z(model, x, 1)
    assert torch.equal(z[..., 2 * HD : 3 * HD], torch.zeros(3, 20, HD))
    others = torch.cat([torch.arange(2 * HD), torch.arange(3 * HD, 4 * HD)])
    assert torch.equal(z[..., others], clean_z[..., others])
    surgery = make_model(n_kv_heads=2)
    with torch.no_grad():
        surgery.blocks[1].attn.out.weight[:, 2 * HD : 3 * HD] = 0  # (d, nh * hd): head 2's columns
        torch.testing.assert_close(logits, surgery(x).logits, rtol=0, atol=1e-5)
    assert torch.equal(model(x).logits, make_model(n_kv_heads=2)(x).logits)  # the hooks are gone


def test_mean_ablation_writes_the_reference_mean_of_each_ablated_slice():
    model, x, reference = make_model(), ids(1), ids(2)
    mean = hook_z(model, reference, 0).mean(dim=(0, 1))  # (nh * hd,)
    heads = [(0, 1), (0, 3)]
    with torch.no_grad(), ablated(model, heads=heads, how="mean", reference=reference):
        z = hook_z(model, x, 0)
        logits = model(x).logits
    for h in (1, 3):
        torch.testing.assert_close(z[..., h * HD : (h + 1) * HD], mean[h * HD : (h + 1) * HD].expand(3, 20, HD))
    assert torch.equal(z[..., :HD], hook_z(model, x, 0)[..., :HD])
    # The same ablation as patches, through interpret.patching, gives the same logits.
    with torch.no_grad():
        assert torch.equal(patch(model, x, ablation_patches(model, heads, how="mean", reference=reference)), logits)


def test_zero_ablating_every_mlp_equals_the_attention_only_model():
    dense, x = make_model(), ids()
    attention_only = make_model(feed_forward=("none",))
    attention_only.load_state_dict({k: v for k, v in dense.state_dict().items() if ".mlp" not in k})
    with torch.no_grad(), ablated(dense, mlps=[0, 1]):
        assert torch.equal(dense(x).logits, attention_only(x).logits)


def test_mean_ablating_an_mlp_writes_its_reference_mean():
    model, x, reference = make_model(), ids(1), ids(2)
    name = "blocks.0.hook_mlp_out"
    mean = run_with_cache(model, reference, [name])[1][name].mean(dim=(0, 1))  # (d,)
    with ablated(model, mlps=[0], how="mean", reference=reference):
        out = run_with_cache(model, x, [name])[1][name]
    torch.testing.assert_close(out, mean.expand(3, 20, 32))


def test_bad_ablations_are_named():
    model = make_model()
    with pytest.raises(ValueError, match=r"heads: \(2, 0\) is outside 2 layers x 4 heads"):
        ablation_patches(model, heads=[(2, 0)])
    with pytest.raises(ValueError, match="mlps: layer 5"):
        ablation_patches(model, mlps=[5])
    with pytest.raises(ValueError, match="reference"):
        ablation_patches(model, heads=[(0, 0)], how="mean")
    with pytest.raises(ValueError, match="how: 'half'"):
        ablation_patches(model, heads=[(0, 0)], how="half")


class Copier(nn.Module):
    """Logit `confidence` on the token `period` - 1 positions back from the next
    one, from the first position where that token exists; zero logits elsewhere."""

    def __init__(self, vocab_size: int, period: int, confidence: float) -> None:
        super().__init__()
        self.vocab_size, self.period, self.confidence = vocab_size, period, confidence

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "sum") -> TransformerOutput:
        """As `Transformer.forward`: given targets, their cross-entropy in place of the logits."""
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab_size)
        # Position t >= period - 1 bets on ids[t - period + 1].
        logits[:, self.period - 1 :] = self.confidence * F.one_hot(ids[:, : T - self.period + 1], self.vocab_size)
        if targets is None:
            return TransformerOutput(logits=logits, aux_loss=torch.zeros(()), cache=None)
        loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction=reduction)
        return TransformerOutput(logits=None, aux_loss=torch.zeros(()), cache=None, loss=loss)


def test_repeat_losses_of_a_perfect_copier_are_known():
    period, vocab = 8, 20
    x = repeated_tokens(4, period, vocab)
    losses = repeat_losses(Copier(vocab, period, confidence=5.0), x, period)
    assert losses.unrepeated == pytest.approx(math.log(vocab))  # uniform logits
    assert losses.repeated == pytest.approx(math.log(1 + (vocab - 1) * math.exp(-5.0)), rel=1e-5)
    worse = repeat_losses(Copier(vocab, period, confidence=0.0), x, period)
    assert gap_removed(losses, worse) == pytest.approx(1.0)  # copying gone: the repeat costs what the first half did
    with pytest.raises(ValueError, match=r"ids: expected \(B, 16\)"):
        repeat_losses(Copier(vocab, period, 5.0), x[:, :-1], period)
