"""Compression: weight quantisation (schemes, RTN, GPTQ, AWQ, fast CPU kernels),
pruning (magnitude, Wanda, SparseGPT; N:M; structured), distillation, and the
efficiency report. Quantised and sparse checkpoints load with `heron.load`."""
from heron.compress.awq import AWQResult, awq_quantize
from heron.compress.calibration import block_linears
from heron.compress.checkpoint import is_quantized_folder, load_quantized_folder, quantized_modules, save_quantized
from heron.compress.distill import distill
from heron.compress.distill_loss import distillation_loss, linear_distillation_loss
from heron.compress.gptq import HessianAccumulator, gptq_quantize
from heron.compress.kernels import KERNELS, choose_kernel
from heron.compress.prune import magnitude_mask, sparsegpt, wanda_mask
from heron.compress.prune_model import prune_model, recover
from heron.compress.prune_structured import prune_experts, prune_heads, prune_mlp_channels
from heron.compress.qlinear import QuantEmbedding, QuantLinear, set_kernel
from heron.compress.quantize import QuantizeSettings, quantize_model
from heron.compress.report import measure, write_report
from heron.compress.schemes import SCHEMES, Int4Grouped, Int8PerChannel, QParams, get_scheme, quantize_rtn

__all__ = [
    "AWQResult", "HessianAccumulator", "Int4Grouped", "Int8PerChannel", "KERNELS", "QParams", "QuantEmbedding",
    "QuantLinear", "QuantizeSettings", "SCHEMES", "awq_quantize", "block_linears", "choose_kernel", "distill",
    "distillation_loss", "get_scheme", "gptq_quantize", "is_quantized_folder", "linear_distillation_loss",
    "load_quantized_folder",
    "magnitude_mask", "measure", "prune_experts", "prune_heads", "prune_mlp_channels", "prune_model",
    "quantize_model", "quantize_rtn", "quantized_modules", "recover", "save_quantized", "set_kernel", "sparsegpt",
    "wanda_mask", "write_report",
]
