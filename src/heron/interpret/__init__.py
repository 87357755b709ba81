"""Explain a model: activation cache, logit lens and direct logit attribution,
attribution to input tokens, activation patching, MoE routing (see each module)."""
from heron.interpret.attribution import Attribution, ConvergenceError, gradient_x_input, integrated_gradients
from heron.interpret.cache import (
    ActivationCache,
    activation_bytes,
    check_budget,
    resid_names,
    run_with_cache,
    select_hooks,
)
from heron.interpret.lens import (
    LogitAttribution,
    TokenLens,
    direct_logit_attribution,
    dla_names,
    logit_lens,
    token_lens,
)
from heron.interpret.patching import (
    POSITION_HOOKS,
    Metric,
    Patch,
    logit_diff,
    normalised,
    patch,
    patch_heads,
    patch_positions,
)
from heron.interpret.routing import RoutingReport, plot_load, routing

__all__ = [
    "POSITION_HOOKS",
    "ActivationCache",
    "Attribution",
    "ConvergenceError",
    "Metric",
    "Patch",
    "RoutingReport",
    "LogitAttribution",
    "TokenLens",
    "activation_bytes",
    "check_budget",
    "direct_logit_attribution",
    "dla_names",
    "gradient_x_input",
    "integrated_gradients",
    "logit_diff",
    "logit_lens",
    "normalised",
    "patch",
    "patch_heads",
    "patch_positions",
    "plot_load",
    "resid_names",
    "routing",
    "run_with_cache",
    "select_hooks",
    "token_lens",
]
