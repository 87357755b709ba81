"""save_hf_folder refuses weights that are NaN or inf, as save_gguf does, before
it writes anything: the error names the Heron tensor and its name in the folder."""
import pytest
import torch

from heron.core import ModelConfig, Transformer
from heron.interop import save_hf_folder


def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2))


def test_a_nan_weight_is_refused_by_name_and_nothing_is_written(tmp_path):
    model = tiny()
    with torch.no_grad():
        model.blocks[0].mlp.down.weight[3, 5] = float("nan")
    target = tmp_path / "exports" / "hf"  # its parent does not exist either
    with pytest.raises(ValueError, match=r"^blocks\.0\.mlp\.down\.weight \(model\.layers\.0\.mlp\.down_proj\.weight "
                                         r"in the folder\): 1 of its values are not finite \(the first, at \(3, 5\), "
                                         r"is nan\); .* NaN logits"):
        save_hf_folder(model, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no folder, no half-written temp folder


def test_an_inf_in_a_fused_weight_names_the_part_that_holds_it(tmp_path):
    """Heron's qkv is q, k and v joined (16 rows each here): row 20 is k_proj's row 4."""
    model = tiny()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[20, 3] = -float("inf")
    with pytest.raises(ValueError, match=r"^blocks\.0\.attn\.qkv\.weight \(model\.layers\.0\.self_attn\.k_proj\.weight "
                                         r"in the folder\): 1 of its values are not finite \(the first, at \(4, 3\), "
                                         r"is -inf\)"):
        save_hf_folder(model, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_a_finite_model_still_exports(tmp_path):
    save_hf_folder(tiny(), tmp_path / "hf")
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {"config.json", "model.safetensors"}
