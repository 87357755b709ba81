"""Sampling settings and the logits processing that turns logits into tokens.

Every processor is a pure function of a (B, V) logits tensor. `sample_next`
chains them in the order Hugging Face `generate` uses (repetition penalty,
temperature, top-k, top-p), so a model sampled here and there with the same
settings draws from the same distribution. Work is only done for the settings
that ask for it: greedy decoding is one argmax, with no sort and no softmax.

The one processor that needs more than the logits is the watermark
(`heron.govern.watermark`), whose green list depends on each row's previous
token; `sample_next` says where it sits in the chain.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from heron.core.config import check_fields

from heron.govern.watermark import Watermark

FLOAT32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32, ~1.2e-38
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt.

    temperature 0 is greedy decoding, and so is one too small for float32 to
    hold (below its smallest normal number, ~1.2e-38); any other tiny
    temperature samples the likeliest token too, the softmax's limit as the
    temperature goes to 0 (`sample_next` divides without overflowing).
    `stop_token_ids` None means the tokenizer's end-of-sequence id;
    `ignore_eos` turns every stop token id off, so that (with no stop strings)
    exactly `max_new_tokens` tokens come back, which is what decode-speed
    benchmarks want. `seed` None draws fresh randomness; an int makes sampling
    repeatable for the same batch of prompts (one random stream serves the
    whole batch, so a prompt sampled beside others draws other numbers than
    alone).

    `watermark` (a `heron.govern.watermark.Watermark`, or a mapping of its
    fields, as a request would send it) biases every sampled token towards a
    keyed green list (Kirchenbauer et al. 2023). It is a typed field rather
    than a general list of logits-processor callables because what it does
    must be reproduced at detection time: its settings are data (key, γ, δ)
    that can be validated, frozen, compared and sent over the wire, and its
    place in the processing order is fixed by `sample_next`, not by the order
    a caller happened to list callables in.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None  # None: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    repetition_penalty: float = 1.0  # 1.0: no penalty
    stop: Sequence[str] = ()  # stored as a tuple
    stop_token_ids: Sequence[int] | None = None  # stored as a tuple
    ignore_eos: bool = False
    seed: int | None = None
    watermark: Watermark | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples.
        object.__setattr__(self, "stop", _string_tuple("stop", self.stop))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", _id_tuple("stop_token_ids", self.stop_token_ids))
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None:
            _check_int("top_k", self.top_k, minimum=1)
        _check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: must be positive, got {self.repetition_penalty!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: expected a bool, got {self.ignore_eos!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        if isinstance(self.watermark, Mapping):
            object.__setattr__(self, "watermark", Watermark.from_dict(self.watermark))
        if self.watermark is not None and not isinstance(self.watermark, Watermark):
            raise ValueError(f"watermark: expected a Watermark or a mapping of its fields, got {self.watermark!r}")

    @property
    def greedy(self) -> bool:
        # Logits are divided in float32, where a smaller temperature loses its digits or becomes 0 (1e-300 does).
        return self.temperature < FLOAT32_TINY

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Build from plain data (a recipe, a CLI, a request); unknown keys are errors naming the key."""
        check_fields(cls, data)
        return cls(**data)


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: must be <= {maximum}, got {value!r}")


def _check_float(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")


def _string_tuple(name: str, value: object) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"{name}: expected a list of non-empty strings, got {value!r}")
    return tuple(items)


def _id_tuple(name: str, value: object) -> tuple[int, ...]:
    ok = isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    if not ok or any(i < 0 for i in value):
        raise ValueError(f"{name}: expected a list of non-negative token ids, got {value!r}")
    return tuple(value)


def presence_mask(ids: torch.Tensor, vocab_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) bool: which tokens occur in each row of ids (B, S).

    `valid` (B, S) bool excludes positions (padding) from the count.
    """
    mask = torch.zeros(ids.shape[0], vocab_size, dtype=torch.bool, device=ids.device)
    if valid is None:
        return mask.scatter_(1, ids, True)
    rows, cols = valid.nonzero(as_tuple=True)
    mask[rows, ids[rows, cols]] = True
    return mask


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens already seen (Keskar et al. 2019, CTRL, section 4.1).

    `seen` is a (B, V) bool presence mask or (B, S) previous token ids.
    CTRL divides a seen token's logit by the penalty; as in Hugging Face's
    `RepetitionPenaltyLogitsProcessor`, a negative logit is multiplied instead,
    so the penalty always lowers the token's probability.
    """
    if penalty == 1.0:
        return logits
    if seen.dtype != torch.bool:
        seen = presence_mask(seen, logits.shape[-1])
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)  # (B, V)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature (> 0); 1.0 returns the logits unchanged."""
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k highest logits of each row, -inf elsewhere (Fan et al. 2018).

    Ties with the k-th logit are kept, as in Hugging Face's `TopKLogitsWarper`.
    """
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most
    probable tokens whose probability mass reaches p, -inf elsewhere.

    Computed as Hugging Face's `TopPLogitsWarper` does, so that the same tokens
    are kept to the last rounding and tie: sorted ascending, a token is dropped
    while the mass up to and including it is <= 1 - p, and the most probable
    token is always kept (its `min_tokens_to_keep`): a p below float32's range
    (1e-300) makes 1 - p exactly 1 and would otherwise drop every token. Of
    tokens tied at the cut, the one the ascending sort puts later is kept.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # (B, V), most probable last
    mass_up_to = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    drop_sorted = mass_up_to <= 1 - p
    drop_sorted[..., -1] = False  # the top-ranked token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) next token ids from (B, V) logits.

    `seen` is the (B, V) presence mask for the repetition penalty (required
    when the penalty is not 1); `previous` (B,) is each row's last token
    (required with a watermark).

    Order: repetition penalty, watermark, then temperature, top-k, top-p.
    The watermark adds δ to the model's (penalised) logits before the
    temperature, as the paper's Algorithm 2 biases the logits that the
    softmax then reads; at temperature 1 with no top-k/top-p this is exactly
    its distribution. It applies under greedy decoding too (the argmax of the
    biased logits). Hugging Face `generate` appends its watermark processors
    after the warpers instead (since its issue #34630, for SynthID's sake), so
    the two differ when temperature, top-k or top-p are set.
    """
    if params.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty: needs the tokens seen so far (pass `seen`)")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.watermark is not None:
        if previous is None:
            raise ValueError("watermark: needs each row's previous token (pass `previous`)")
        logits = params.watermark(previous, logits)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if params.temperature < 1.0:
        # Softmax, top-k and top-p ignore a shift of a row. With its maximum shifted to 0, a tiny temperature
        # sends the other logits to -inf, not the maximum to +inf (past float32's 3.4e38), whose softmax is nan.
        # At 1 and above dividing cannot overflow, and the logits stay bit for bit those Hugging Face divides.
        logits = logits - logits.amax(dim=-1, keepdim=True)  # (B, V)
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_p(apply_top_k(logits, params.top_k), params.top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


__all__ = [
    "SamplingParams",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "presence_mask",
    "sample_next",
]
