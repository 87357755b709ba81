"""Mixture-of-Experts feed-forward (Shazeer et al. 2017; Fedus et al. 2022,
Switch Transformer; Zoph et al. 2022, ST-MoE; Jiang et al. 2024, Mixtral).

A linear router scores every token against `n_experts` SwiGLU/GELU experts;
each token goes to its `top_k` best, and their outputs are summed with the
router's weights. Dispatch is by sorting: the (token, slot) assignments are
ordered by expert, so each expert's tokens are one contiguous slice and all
experts run as one grouped matrix product, with no per-token Python loop.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from heron.core.config import ModelConfig
from heron.core.gemm import grouped_product, grouped_through_onednn
from heron.core.hooks import HookPoint
from heron.core.linear import MAX_ROWS, STREAM_ROWS, few_row_product, streams
from heron.core.mlp import MLP, activate

ExpertProduct = Callable[[int, torch.Tensor], torch.Tensor]  # (expert, rows (n, K)) -> (n, M)

# ----- routing math: pure functions of tensors ---------------------------------


def route(probs: torch.Tensor, top_k: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts), each (N, k), from router probabilities (N, E).

    With k > 1 the chosen probabilities are renormalised to sum to one
    (Mixtral); with k = 1 the gate is the probability itself, as in Switch
    (Fedus et al. 2022, eq. 2): renormalised it would be a constant 1 and the
    router would get no gradient from the language-model loss. Then the
    weights are multiplied by `scale` (DeepSeek-V2's routed scaling factor).

    Why scale: a SwiGLU MLP of width k*F is exactly the sum of k SwiGLU
    experts of width F, each weighed 1. Renormalised top-k weighs them ~1/k
    each, so a MoE whose experts split a dense MLP's width starts with its
    output, and every expert's effect on it, ~k times smaller than the
    dense MLP's; scale = k puts the two on one footing. In bench_moe
    (tiny-moe against tiny, 300 steps) scale 2 took the MoE's final
    validation loss from 5.08 to 5.01, the dense model's being 5.09.
    """
    weights, experts = probs.topk(top_k, dim=-1)  # (N, k), (N, k)
    if top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)  # (N, k)
    if scale != 1.0:
        weights = weights * scale
    return weights, experts


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, alpha: float,
                        n_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Switch load-balancing loss alpha * E * sum_i f_i * P_i (Fedus et al. 2022, eq. 4-6).

    probs (N, E) router probabilities; counts (E,) assignments per expert out
    of n_tokens (None: N; more when counts are summed over the processes that
    share a batch). For top-k, f_i is the fraction of tokens that picked
    expert i among their k, as in Mixtral's reference (and transformers'
    load_balancing_loss_func), so sum_i f_i = k and a balanced router scores
    alpha * k. Only P_i carries gradient. No token at all (a batch of padding
    alone) scores 0: its counts are all 0, and so are f and P, not 0 / 0.
    """
    n_experts = probs.shape[1]
    n = probs.shape[0] if n_tokens is None else n_tokens
    n = n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1)  # n 0: counts are 0, and so is f
    f = counts.to(probs.dtype) / n  # (E,) fraction per expert
    p = mean_or_zero(probs)  # (E,) mean router probability
    return alpha * n_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor, coef: float) -> torch.Tensor:
    """ST-MoE router z-loss: coef * mean over tokens of logsumexp(logits)^2
    (Zoph et al. 2022, eq. 5); keeps router logits small and softmax stable.
    0 for no token."""
    return coef * mean_or_zero(torch.logsumexp(logits, dim=-1).square())


def mean_or_zero(x: torch.Tensor) -> torch.Tensor:
    """x's mean over its first dimension (N, ...) -> (...), or zeros, still in
    the graph, when N is 0: a batch of padding alone counts no token, and
    0 / 0 would carry NaN into the losses and statistics."""
    return x.mean(dim=0) if x.shape[0] else x.sum(dim=0)


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(...,) entropy in nats of each token's router distribution (..., E)."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """Assignments an expert may take: ceil(factor * tokens * k / E) (Switch, eq. 3),
    in exact rational arithmetic on the factor's decimal value (repr: 1.1 is 11/10).
    Why: in floating point 1.1 * 100 / 11 is 10.000000000000002, which rounds up to
    11 slots where the configured rule gives 10."""
    return math.ceil(Fraction(repr(float(factor))) * n_tokens * top_k / n_experts)


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what F.grouped_mm takes


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, *,
                   fused: bool | None = None) -> torch.Tensor:
    """Rows of x (A, K), grouped by expert in order, times their expert's w (E, K, M): (A, M).
    counts (E,) rows per expert. fused None picks a oneDNN product an expert where
    core/gemm.py sends every product there (`grouped_through_onednn`), else
    F.grouped_mm where it runs (CPU, rows of K and M a multiple of 16 bytes), else
    a loop over the experts; True and False force the latter two.

    Why F.grouped_mm on CPU: with torch 2.13, at tiny-moe's shapes (8 experts,
    288 x 384, 4096 assignments, one thread, median of 15 interleaved runs) it
    took 13.4 ms forward and 49.6 ms forward + backward against 15.6 and 58.5
    ms for a loop over the experts, and 0.13 against 0.16 ms for a 4-row
    decode step, with bit-identical results. On CUDA grouped_mm wants bf16 as
    well, which fp32 training does not give, so other devices loop over the
    experts (never over tokens), as do dtypes it does not take (float64).

    Decoding a token or two does not come here: `MoE._decode` sends each
    token straight through its experts.
    """
    w = w.to(x.dtype)  # autocast has no rule for grouped_mm; cast as it would for a matmul
    if fused is None and grouped_through_onednn(x, w):  # faster still where oneDNN runs every product (core/gemm.py)
        return grouped_product(x, w, counts.tolist())
    if fused is None:
        aligned = all(n * x.element_size() % 16 == 0 for n in w.shape[1:])
        fused = x.device.type == "cpu" and aligned and x.dtype in GROUPED_MM_DTYPES
    if fused:
        # grouped_mm refuses a broadcast x (stride 0), which a hook may return at hook_expert_in or
        # hook_expert_post (a mean ablation: a.mean(0).expand_as(a)); contiguous() is x itself otherwise.
        return F.grouped_mm(x.contiguous(), w, offs=counts.cumsum(0).to(torch.int32))
    return torch.cat([rows @ we for rows, we in zip(x.split(counts.tolist()), w)])  # (A, M)


# ----- the layer -----------------------------------------------------------------

CENTER_MOMENTUM = 0.1  # weight of each training batch's mean in the running mean (BatchNorm's default)


class MoE(nn.Module):
    """Router, stacked experts and an optional shared expert.

    Experts carry no biases (Mixtral). `shared_expert` adds a dense MLP of the
    experts' width that every token passes through (Dai et al. 2024,
    DeepSeekMoE). With a capacity factor, training drops assignments past an
    expert's capacity in token order (earlier tokens keep their slot, as in
    Switch and GShard); a dropped assignment contributes zero and the token
    carries on along the residual stream. Capacity is sized on the counted
    tokens, which take their slots before padding does (padding gets what they
    leave), so padding never drops a real token. In eval mode nothing is dropped, so
    a token's output never depends on what else is in the batch, and cached
    decoding equals the full forward.

    Router centring (`router_centering`). Early in training a layer's inputs
    share one large common vector: in bench_moe's shape at step 12 the mean
    MoE input had norm ~13.7 and tokens differed from it by 1-2, so the
    router's logits differed between experts by ~0.1-0.3 in their common part
    and by only ~0.02-0.05 from token to token. Every token then ranked the
    experts alike and one expert took them all (4x its fair share, the
    ceiling for top-2 of 8) for tens of steps, which neither the Switch loss
    nor load-driven biases (Wang et al. 2024) undid: a winner-take-all
    ranking has no smooth load to steer. With centring, the router scores
    x - mean instead, so the common vector cancels out of the ranking
    exactly. The mean is the batch's (detached) in training, folded into a
    running mean (momentum CENTER_MOMENTUM, a saved buffer) that evaluation
    uses, as BatchNorm does: in eval mode routing never depends on the rest
    of the batch. Like BatchNorm, training routing does: micro-batches of
    gradient accumulation are each centred on their own mean, so a run that
    accumulates matches one large batch only approximately (processes that
    share a batch centre on its whole mean; below). Off by default (imported
    models such as Mixtral route on the input itself).

    Processes that train on parts of one batch (DDP, FSDP) pass a sum over
    processes to `share_batch_statistics`: training then centres on the whole
    batch's mean and balances on its loads, f_i (Switch's fractions of tokens;
    P_i stays each process's, whose gradients the processes average), so two
    processes route and learn as one process on the whole batch does.

    After each forward, `pop_aux_loss()` gives the weighted load-balancing +
    z-loss with its gradient (Transformer sums it over layers; popping it lets
    the graph go; with gradients off it is zero, not computed) and
    `last_stats` the routing statistics, detached, for logging.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe = config.moe
        if moe is None:
            raise ValueError("moe: a MoE layer needs moe settings")
        d = config.d_model
        ff = config.resolved_expert_d_ff
        width = 2 * ff if config.mlp == "swiglu" else ff
        self.settings, self.kind = moe, config.mlp
        self.router = nn.Linear(d, moe.n_experts, bias=False)
        # (d,) running mean of the MoE input the router measures tokens against; None: no centring
        self.register_buffer("router_center", torch.zeros(d) if moe.router_centering else None)
        self.up = nn.Parameter(torch.empty(moe.n_experts, d, width))  # (E, d, width)
        self.down = nn.Parameter(torch.empty(moe.n_experts, ff, d))  # (E, ff, d)
        self.shared = MLP(config.replace(d_ff=ff)) if moe.shared_expert else None
        self.hook_router_logits = HookPoint()  # (B, T, E): replacing them changes the routing
        self.hook_router_probs = HookPoint()  # (B, T, E): softmax of the logits; top-k reads these
        # Load and dropped fire before the experts run, so a reader of the two below can split
        # them by expert, (load - dropped)[e] rows each (pruning calibrates each expert on its own).
        self.hook_expert_load = HookPoint()  # (E,) long: assignments routed to each expert (read-only)
        self.hook_expert_dropped = HookPoint()  # (E,) long: of those, dropped over capacity (read-only)
        self.hook_expert_in = HookPoint()  # (A, d): each kept assignment's token, grouped by expert in order
        self.hook_expert_post = HookPoint()  # (A, ff): the experts' hidden activations, grouped the same way
        self.hook_router_entropy = HookPoint()  # (B, T): nats; computed only when hooked
        self._aux_loss: torch.Tensor | None = None
        self._last: dict[str, torch.Tensor] = {}
        self.batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None  # class note
        self.reset_parameters(config.init_std, (2 * config.n_layers) ** -0.5)

    def reset_parameters(self, std: float, residual_scale: float) -> None:
        """Experts initialised like the dense MLP they replace (GPT-2: `down`
        writes to the residual stream, so its std is scaled)."""
        nn.init.normal_(self.up, mean=0.0, std=std)
        nn.init.normal_(self.down, mean=0.0, std=std * residual_scale)
        if self.router_center is not None:
            self.router_center.zero_()

    def forward(self, x: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d). counted (B, T) bool: the tokens that the routing
        statistics, the balancing losses and the centring mean count (False: padding,
        which is routed like any token but weighs nothing in them); None: every token."""
        B, T, d = x.shape
        if B * T == 0:  # as Transformer.forward: routing and dispatch have no sense for no token
            raise ValueError(f"x: needs at least one row of at least one token, got {tuple(x.shape)}")
        s = self.settings
        flat = x.reshape(B * T, d)  # (N, d)
        rows = None if counted is None else counted.reshape(B * T)  # (N,) bool
        # Softmax and losses in fp32 even under bf16 autocast: the router's exponentials
        # are where ST-MoE (Zoph et al. 2022, sec. 3) found low precision unstable.
        scored = self._router_input(flat, rows)  # (N, d)
        logits = self.hook_router_logits(self.router(scored).float().view(B, T, -1))  # (B, T, E)
        probs = self.hook_router_probs(logits.softmax(dim=-1))  # (B, T, E)
        if self.hook_router_entropy.active:
            self.hook_router_entropy(router_entropy(probs))  # (B, T)
        logits, probs = logits.flatten(0, 1), probs.flatten(0, 1)  # (N, E) each
        weights, experts = route(probs, s.top_k, s.routed_scale)  # (N, k), (N, k)
        counts = over = None
        if self.decodes(flat):
            up, down = (partial(self._expert_product, which) for which in ("up", "down"))
            y = self._decode(flat, weights, experts, up, down)  # (N, d)
        else:
            counts = torch.bincount(experts.flatten(), minlength=s.n_experts)  # (E,)
            limit = None
            if s.capacity_factor is not None and self.training:  # eval never drops (class note)
                n_counted = B * T if rows is None else int(rows.sum())  # padding buys no slots (class note)
                limit = expert_capacity(n_counted, s.top_k, s.n_experts, s.capacity_factor)
            first = None if limit is None else rows  # (N,) bool: the tokens that take slots before padding
            y, over = self._dispatch(flat, weights, experts, counts, limit, first)  # (N, d), (N, k) or None
        if rows is not None:  # from here on, statistics and losses: the counted tokens only
            logits, probs, experts = logits[rows], probs[rows], experts[rows]  # (n, E), (n, E), (n, k)
            over = None if over is None else over[rows]  # (n, k)
            counts = None  # the dispatch's counts hold the padding too
        self._last = {"probs": probs.detach(), "experts": experts}  # loads counted when asked
        if counts is not None:
            self._last["counts"] = counts
        if over is not None:
            self._last["dropped"] = mean_or_zero(over.float().flatten())  # () of the counted tokens' assignments
        if torch.is_grad_enabled():
            loads = counts if counts is not None else torch.bincount(experts.flatten(), minlength=s.n_experts)
            counts, n_tokens = self._batch_total(loads, probs.shape[0])  # (E,), tokens
            balance = load_balancing_loss(probs, counts, s.aux_loss_coef, n_tokens)
            z = router_z_loss(logits, s.z_loss_coef)
            self._aux_loss = balance + z  # ()
            # the loads logged are the whole batch's too: a max over processes' parts is not the batch's max
            self._last.update(counts=counts, balance_loss=balance.detach(), z_loss=z.detach())
        else:  # inference: the losses only train the router; skipping them saves ~7% of a Mixtral decode step
            self._aux_loss = logits.new_zeros(())
        y = y.view(B, T, d)  # (B, T, d)
        return y if self.shared is None else y + self.shared(x)  # (B, T, d)

    def _router_input(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """(N, d) what the router scores: the tokens, or with centring their
        difference from the mean MoE input (class note) over the counted rows."""
        if self.router_center is None:
            return x
        if not self.training:
            return x - self.router_center.to(x.dtype)
        mean = self._batch_mean(x.detach() if rows is None else x.detach()[rows])  # (d,)
        with torch.no_grad():
            self.router_center.lerp_(mean.to(self.router_center.dtype), CENTER_MOMENTUM)
        return x - mean.to(x.dtype)

    def _batch_mean(self, x: torch.Tensor) -> torch.Tensor:
        """(d,) the mean of the training batch's rows x (N, d). A batch with no
        row at all (padding alone) has none and gets the running mean: folding
        that in leaves it exactly as it was, where 0 / 0 would make it NaN."""
        total, n = self._batch_total(x.sum(dim=0), x.shape[0])
        if isinstance(n, int):
            return total / n if n else self.router_center
        return torch.where(n > 0, total / n.clamp(min=1), self.router_center)  # a summed count: no host sync

    def _batch_total(self, values: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        """(values, tokens) summed over this process's part of the batch, or
        with `batch_sum` over the whole batch: one sum for both."""
        if self.batch_sum is None:
            return values, n_tokens
        total = self.batch_sum(torch.cat([values, values.new_tensor([n_tokens])]))  # (len(values) + 1,)
        return total[:-1], total[-1]

    def decodes(self, x: torch.Tensor) -> bool:
        """A few tokens outside autograd in eval mode on CPU, no expert hook
        attached: `_decode` computes the same sum more directly. A few: up to
        MAX_ROWS, or STREAM_ROWS of fp32 where the experts' products stream (core/linear.py)."""
        hooked = (self.hook_expert_load, self.hook_expert_dropped, self.hook_expert_in, self.hook_expert_post)
        most = STREAM_ROWS if streams() and x.dtype == torch.float32 else MAX_ROWS
        return (0 < x.shape[0] <= most and x.device.type == "cpu" and not self.training
                and not torch.is_grad_enabled() and not any(hook.active for hook in hooked))

    def decode_step(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """`forward` for the few tokens x (B, T, d) that `decodes` takes,
        without its hook points and (zero) auxiliary loss, with the router's
        weight, the running mean and every expert's few-row products looked
        up once, here (a decoding step, core/token_step.py, calls it for every
        token; at the Mixtral benchmark's shape the lookups cost ~0.1 ms a
        layer). The same numbers and `last_stats` as `forward`; a step made
        before the layer changes (new weights, a move) keeps the old ones."""
        router, center = self.router.weight, self.router_center
        top_k, scale = self.settings.top_k, self.settings.routed_scale
        ups, downs = self._expert_products("up"), self._expert_products("down")
        # The shared expert as its arithmetic too: called as a module it cost twice its products.
        shared = self.shared.decode_step() if type(self.shared) is MLP else self.shared

        def step(x: torch.Tensor) -> torch.Tensor:
            B, T, d = x.shape
            flat = x.reshape(B * T, d)  # (N, d)
            scored = flat if center is None else flat - center.to(flat.dtype)  # as _router_input in eval
            probs = F.linear(scored, router).float().softmax(dim=-1)  # (N, E)
            weights, experts = route(probs, top_k, scale)  # (N, k), (N, k)
            self.record_routing(probs, experts)
            y = self._decode(flat, weights, experts, lambda e, h: ups[e](h), lambda e, h: downs[e](h))
            y = y.view(B, T, d)  # (B, T, d)
            return y if shared is None else y + shared(x)

        return step

    def record_routing(self, probs: torch.Tensor, experts: torch.Tensor) -> None:
        """Keep a decoding step's routing, router probabilities (N, E) and chosen experts (N, k), for
        `last_stats`, as `forward` keeps its own (a step computed elsewhere reports it here:
        core/step_kernels.py)."""
        self._last = {"probs": probs.detach(), "experts": experts}

    def _decode(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                up: ExpertProduct, down: ExpertProduct) -> torch.Tensor:
        """(N, d) Sum_j weights[t, j] * expert_{experts[t, j]}(x[t]) for a few
        tokens: each chosen expert once, on the rows that chose it, through
        few-row products over blocks of K (core/linear.py) that up(e, rows)
        and down(e, rows) compute.

        Why not `_dispatch`: its sort, gather and scatter cost more than the
        experts' products for a token or two, and its grouped product streams
        every expert's weights slowly at a few rows each. Why not token by
        token: from a few tokens up, tokens share experts, whose weights are
        then read once for all their rows. On the Mixtral benchmark's shape
        (512 x 1024 experts, top-2), 8 layers took 6.6 ms at one token
        against 11.7 dispatched, and 35 ms at 8 tokens against 42 dispatched
        and 45 token by token; a batch-8 decode ran 1.24x as fast as token by
        token, batch 1 alike (2026-11-30, interleaved, same greedy tokens). With
        streamed products it stays ahead to 63 tokens: a Mixtral-shaped model
        decoded 24 and 48 rows 1.56x and 1.39x as fast as dispatched (1.72x and
        1.68x at 32 and 48 with the layers whole in the layer kernel; Zen 4,
        2026-12-03, 6 alternating rounds, the same greedy tokens)."""
        rows_of: dict[int, list[int]] = {}  # expert -> the tokens that chose it, in order
        gates_of: dict[int, list[float]] = {}  # expert -> their weights for it
        for t, (chosen, gates) in enumerate(zip(experts.tolist(), weights.tolist())):
            for e, gate in zip(chosen, gates):
                rows_of.setdefault(e, []).append(t)
                gates_of.setdefault(e, []).append(gate)
        y = torch.zeros_like(x)  # (N, d)
        for e, rows in sorted(rows_of.items()):
            if len(rows) == 1:  # one token: a view and a scalar gate, fewer ops
                t = rows[0]
                h = activate(up(e, x[t : t + 1]), self.kind)  # (1, ff)
                y[t : t + 1].add_(down(e, h) * gates_of[e][0])
                continue
            index = torch.tensor(rows, device=x.device)  # (n,)
            h = activate(up(e, x.index_select(0, index)), self.kind)  # (n, ff)
            gates = torch.tensor(gates_of[e], dtype=y.dtype, device=x.device).unsqueeze(1)  # (n, 1)
            y.index_add_(0, index, down(e, h) * gates)
        return y

    # The three methods below are the only readers of the expert weights, so a subclass that holds
    # them in another form (quantised: compress/quant_moe.py) replaces these and nothing else.

    def _expert_product(self, which: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """A few rows x (n, K) times expert e's `which` ("up" or "down") weights (K, M): (n, M)."""
        return few_row_product(getattr(self, which)[e].to(x.dtype).t(), None)(x)  # (K, M) as an input-major (M, K)

    def _expert_products(self, which: str) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Each expert's `_expert_product` for `which`, its weights looked up once (`decode_step`)."""
        return [few_row_product(w.t(), None) for w in getattr(self, which)]

    def _grouped_product(self, which: str, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows (A, K) grouped by expert, counts[e] each, times their expert's `which` weights: (A, M)."""
        return grouped_matmul(rows, getattr(self, which), counts)

    def _dispatch(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor,
                  limit: int | None, first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sum_j weights[t, j] * expert_{experts[t, j]}(x[t]) for every token t:
        (N, d), and with a capacity limit which assignments went over it (N, k) bool
        (their expert was full: they contribute nothing); None without one. With
        `first` (N,) bool, those tokens take their experts' slots before the others.
        """
        k = experts.shape[1]
        flat_experts = experts.flatten()  # (N*k,) token-major: t*k + j
        key = flat_experts if first is None else 2 * flat_experts + (~first).repeat_interleave(k)  # (N*k,)
        order = key.argsort(stable=True)  # (N*k,) by expert, `first` before the rest; stable: then token order
        kept, over = counts, None
        if limit is not None:
            start = counts.cumsum(0) - counts  # (E,) where each expert's slice begins
            rank = torch.arange(order.numel(), device=x.device) - start[flat_experts[order]]  # (N*k,)
            over = torch.zeros_like(flat_experts, dtype=torch.bool).index_fill_(0, order[rank >= limit], True)
            order = order[rank < limit]  # (A,) assignments within capacity
            kept = counts.clamp(max=limit)  # (E,)
        token = order // k  # (A,) the token of each sorted assignment
        self.hook_expert_load(counts)
        self.hook_expert_dropped(counts - kept)
        # index_select, not x[token]: its gradient is an index_add_, which sums a token's k rows in a fixed
        # order; the advanced-indexing gradient (index_put_ accumulate) sums them in whatever order two
        # threads reach them, so MoE training on two threads was not reproducible bit for bit.
        rows = self.hook_expert_in(x.index_select(0, token))  # (A, d)
        h = self.hook_expert_post(activate(self._grouped_product("up", rows, kept), self.kind))  # (A, ff)
        # Gates in x's dtype, as `_decode` and transformers' Mixtral take them: fp32 gates on a bf16
        # model's products would make y, and from it the residual stream, fp32. They scale h before
        # the down product, which equals scaling its output (experts have no bias) and touches ff
        # columns instead of d: tiny-moe's layer ran 1.07x as fast forward and backward (ff 192, d 288).
        out = self._grouped_product("down", h * weights.flatten().to(x.dtype)[order, None], kept)  # (A, d)
        y = x.new_zeros(x.shape, dtype=out.dtype).index_add_(0, token, out)  # (N, d)
        return y, None if over is None else over.view(experts.shape)

    def pop_aux_loss(self) -> torch.Tensor:
        """The latest forward's auxiliary loss (), handed over once."""
        if self._aux_loss is None:
            raise RuntimeError("pop_aux_loss: no forward since the last pop")
        aux, self._aux_loss = self._aux_loss, None
        return aux

    @property
    def last_stats(self) -> dict[str, torch.Tensor]:
        """Routing statistics of the latest forward, detached scalars except `load`:
        load (E,) fraction of assignments per expert; max_load_over_fair (1 is
        perfect balance, E means one expert took everything); dropped_fraction
        of assignments, over capacity; router_entropy, mean nats per token; the weighted
        balance_loss and z_loss (after forwards with gradients on only). A forward
        that counted no token (padding alone) gives zeros for all of them."""
        if not self._last:
            return {}
        last = self._last
        counts = last["counts"] if "counts" in last else torch.bincount(
            last["experts"].flatten(), minlength=self.settings.n_experts)  # (E,)
        total = counts.sum().float().clamp(min=1)  # no token: counts are 0, and so are the loads
        return {
            "load": counts.float() / total,  # (E,)
            "max_load_over_fair": counts.max().float() * self.settings.n_experts / total,
            "dropped_fraction": last.get("dropped", total.new_zeros(())).float(),
            "router_entropy": mean_or_zero(router_entropy(last["probs"])),
            **{name: last[name] for name in ("balance_loss", "z_loss") if name in last},
        }


def share_batch_statistics(model: nn.Module, batch_sum: Callable[[torch.Tensor], torch.Tensor] | None) -> int:
    """Have every MoE layer of `model` sum its training batch statistics (the
    centring mean, the loads the balancing loss weighs) with `batch_sum`, a sum
    over the processes that share each batch; None: each process's own part.
    Returns how many layers were set."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for layer in layers:
        layer.batch_sum = batch_sum
    return len(layers)


def moe_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """`last_stats` scalars averaged over a model's MoE layers; {} without any."""
    layers = [m.last_stats for m in model.modules() if isinstance(m, MoE) and m.last_stats]
    if not layers:
        return {}
    return {name: torch.stack([s[name] for s in layers]).mean() for name in layers[0] if name != "load"}


__all__ = [
    "MoE", "expert_capacity", "grouped_matmul", "load_balancing_loss", "moe_stats", "route",
    "router_entropy", "router_z_loss", "share_batch_statistics",
]
