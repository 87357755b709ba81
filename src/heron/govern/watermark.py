"""A soft green-list watermark for generated text (Kirchenbauer et al. 2023,
"A Watermark for Large Language Models", arXiv:2301.10226: Algorithm 2, the
"soft" red list, and its z-test).

Generation: before each token is sampled, a secret key and the previous
token pick a "green list", a pseudo-random γ-fraction of the vocabulary,
and δ is added to the green tokens' logits. Detection needs only the token
ids and the key: unwatermarked text lands on the green list a γ-fraction of
the time, watermarked text more often, and a one-sided test on the count
says which: the paper's z-score, with the verdict taken from the count's
exact binomial tail, because the normal approximation behind "z > 4" flags
short unwatermarked texts up to 13 times as often as its 3.2e-5 promises
(6 to 25 scored tokens: 2.2e-4 to 4.2e-4).

The seeding is the paper's simplest scheme, "LeftHash" with context width
h = 1: the green list at position t depends on token t-1 only, so a
paraphrase that changes one token disturbs the lists of at most two
positions. The green list is part of a file format (text watermarked today
must be detected by later versions, on any device), so it is defined by
exact integer arithmetic, not by torch's random number generators, which
differ between CPU and CUDA and are not promised stable across releases:

1. k = round(γV) green tokens out of a vocabulary of V.
2. The key (an int is its decimal string, a str its UTF-8) is hashed to 32
   bytes: blake2b(key, person=b"heron-wm-key").
3. Three 32-bit words (s0, s1, s2) = blake2b(previous token as 8 bytes
   little-endian, key=those 32 bytes, person=b"heron-wm-h1", 12-byte digest),
   read little-endian.
4. Each token v gets h(v) = mix(mix(mix(v ^ s0) ^ s1) ^ s2), where mix is
   Wellons' `lowbias32` (github.com/skeeto/hash-prospector). Every step is a
   bijection of 32-bit words, so the V values are distinct.
5. The green list is the k tokens with the smallest h(v).

A green list costs one O(V) hash; lists are cached per previous token (a
bounded LRU), so generating a batch costs a gather of B cached rows per step.

    wm = Watermark(key=42)                       # γ 0.25, δ 2.0, as the paper's main setting
    params = SamplingParams(max_new_tokens=200, watermark=wm)
    detect(ids, wm, vocab_size=model.config.vocab_size).watermarked
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

import torch

DEFAULT_GAMMA = 0.25  # the defaults of the authors' reference implementation
DEFAULT_DELTA = 2.0
# A larger δ changes nothing (e^-10000 is 0: green tokens already take all the mass) but can overflow the
# logits to inf, whose softmax is nan; 1e4 stays finite even in float16 (largest 65504).
MAX_DELTA = 1e4
DEFAULT_Z_THRESHOLD = 4.0  # the paper's: a false-positive rate of 3.2e-5 (the normal tail), held exactly below
DETECT_ROWS_BYTES = 1 << 26  # green-list rows made at once while detecting
CACHE_BYTES = 1 << 26  # green-list rows kept per (key, γ, V, device): all 4,096 rows of a 4k vocabulary
_MASK32 = 0xFFFFFFFF
_ROWS_PER_CHUNK = 64  # green lists hashed at once: a (64, V) int64 buffer


@dataclass(frozen=True)
class Watermark:
    """The watermark's settings, and its logits processor (call it).

    `key` is the secret, kept out of the repr and stored as bytes (an int as
    its decimal string, a str as UTF-8), so Watermark(key=42) equals
    Watermark(key="42"), as `--key 42` on the command line must. δ does not
    matter to the detector; γ and the key must match the generator's.
    """

    key: int | str | bytes = field(repr=False)  # stored as bytes
    gamma: float = DEFAULT_GAMMA
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", key_bytes(self.key))
        _check_number("gamma", self.gamma)
        if not 0 < self.gamma < 1:
            raise ValueError(f"gamma: the green fraction must lie in (0, 1), got {self.gamma!r}")
        _check_number("delta", self.delta)
        if not 0 <= self.delta <= MAX_DELTA:
            raise ValueError(f"delta: the green-list bias must lie in [0, {MAX_DELTA:g}], got {self.delta!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Watermark:
        """From plain data (a request, a recipe); unknown keys are errors naming the key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"watermark.{unknown[0]}: unknown Watermark field (known: {', '.join(sorted(known))})")
        return cls(**data)

    def green_size(self, vocab_size: int) -> int:
        """k = round(γV): how many tokens each green list holds."""
        k = round(self.gamma * vocab_size)
        if not 1 <= k < vocab_size:
            raise ValueError(f"gamma: {self.gamma} of a {vocab_size}-token vocabulary gives {k} green tokens; "
                             "need at least 1 and fewer than all")
        return k

    def green_mask(self, previous_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(B, V) bool: the green list that follows each previous token (B,)."""
        lists = _green_lists(_derived_key(self.key), self.green_size(vocab_size), vocab_size,
                             previous_ids.device)
        return lists.rows(previous_ids)

    def __call__(self, previous_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The logits processor: (B,) previous ids, (B, V) logits -> logits with δ
        added to each row's green tokens (Algorithm 2); the rest untouched."""
        green = self.green_mask(previous_ids, logits.shape[-1])  # (B, V)
        return torch.where(green, logits + self.delta, logits)


@dataclass(frozen=True)
class Detection:
    """The paper's one-proportion test on one text: its z-score, and the verdict from the exact
    binomial tail held to the false-positive rate the z threshold stands for."""

    z: float
    green: int  # |s|_G: scored tokens on their green list
    scored: int  # T: tokens scored
    p_value: float  # one-sided and exact: P(at least `green` of `scored` green, unwatermarked)
    z_threshold: float
    watermarked: bool  # the verdict: p_value <= p_value(z_threshold), the normal tail at the threshold


def detect(
    ids: Sequence[int] | torch.Tensor,
    watermark: Watermark,
    vocab_size: int,
    z_threshold: float = DEFAULT_Z_THRESHOLD,
    ignore_repeated: bool = True,
) -> Detection:
    """Test token ids (T+1,) for the watermark.

    Every token but the first (which has no previous token) is scored.
    `ignore_repeated` (the default) scores each distinct (previous, token)
    bigram once, as the authors suggest for repetitive text (and their
    reference detector's `ignore_repeated_bigrams` does): with h = 1 a repeated
    bigram is the same coin flip again, not a new one, so counting it again
    breaks the z-test's independence assumption and lets repetitive
    unwatermarked text (code, lists) cross the threshold. T is then the number
    of distinct bigrams; pass False to score every token after the first.
    """
    green = green_hits(ids, watermark, vocab_size, ignore_repeated)  # (T,)
    n_green, scored, gamma = int(green.sum()), len(green), watermark.green_size(vocab_size) / vocab_size
    z = z_score(n_green, scored, gamma)
    p = binomial_tail(n_green, scored, gamma)  # 1 with nothing scored: no evidence at all
    return Detection(z, n_green, scored, p, z_threshold, scored > 0 and p <= p_value(z_threshold))


def green_hits(
    ids: Sequence[int] | torch.Tensor, watermark: Watermark, vocab_size: int, ignore_repeated: bool = True
) -> torch.Tensor:
    """(T,) bool: whether each scored token is on the green list of its previous token."""
    seq = torch.as_tensor(ids, dtype=torch.long)  # (N,)
    if seq.dim() != 1:  # flattened, a batch would be scored across its rows' seams
        raise ValueError(f"ids: one text's token ids (N,), got shape {tuple(seq.shape)}; detect each row alone")
    if len(seq) and (int(seq.min()) < 0 or int(seq.max()) >= vocab_size):
        raise ValueError(f"ids: token ids must lie in [0, {vocab_size})")
    prev, token = seq[:-1], seq[1:]  # (N-1,) each
    if ignore_repeated and len(prev):
        pairs = torch.unique(prev * vocab_size + token)  # (T,): distinct bigrams
        prev, token = pairs // vocab_size, pairs % vocab_size
    if not len(prev):
        return torch.zeros(0, dtype=torch.bool)
    # One green list per distinct previous token, DETECT_ROWS_BYTES of them at a time: a row per
    # position would make (T, V) at once (1M tokens of a 32k vocabulary: 32 GB) and hash repeats again.
    distinct, slot = torch.unique(prev, return_inverse=True)  # (U,), (T,)
    hits = torch.empty(len(prev), dtype=torch.bool)
    per_chunk = max(1, DETECT_ROWS_BYTES // vocab_size)
    for start in range(0, len(distinct), per_chunk):
        rows = watermark.green_mask(distinct[start:start + per_chunk], vocab_size)  # (C, V)
        here = (slot >= start) & (slot < start + per_chunk)  # (T,)
        hits[here] = rows[slot[here] - start, token[here]]
    return hits


def z_score(green: int, scored: int, gamma: float) -> float:
    """z = (|s|_G - γT) / sqrt(T γ (1 - γ)), the paper's detection statistic; 0 with nothing scored.

    `detect` passes γ = k / V, the exact green fraction, which is γ itself
    whenever γV is a whole number (any power-of-two vocabulary at γ = 1/4).
    """
    if scored == 0:
        return 0.0
    return (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))


def p_value(z: float) -> float:
    """P(Z > z) for a standard normal Z: the one-sided false-positive probability of z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p), summed exactly in log space."""
    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    if not 0 < p < 1:  # a certain outcome: every trial fails (p 0) or succeeds (p 1)
        if not 0 <= p <= 1:
            raise ValueError(f"p: a probability in [0, 1], got {p}")
        return float(p)
    log_p, log_q = math.log(p), math.log1p(-p)
    logs = [math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + k * log_p
            + (trials - k) * log_q for k in range(successes, trials + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def key_bytes(key: int | str | bytes) -> bytes:
    """The key as bytes: an int is its decimal string (so `--key 42` and key=42 agree), a str its UTF-8."""
    if isinstance(key, bool) or not isinstance(key, (int, str, bytes)):
        raise ValueError(f"key: expected a non-negative int, a str or bytes, got {type(key).__name__}")
    if isinstance(key, int):
        if key < 0:
            raise ValueError(f"key: an int key must be >= 0, got {key}")
        return str(key).encode()
    raw = key.encode("utf-8") if isinstance(key, str) else key
    if not raw:
        raise ValueError("key: must not be empty")
    return raw


# ----- the green lists ---------------------------------------------------------------


def _derived_key(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=32, person=b"heron-wm-key").digest()


def seed_words(derived_key: bytes, previous: int) -> tuple[int, int, int]:
    """(s0, s1, s2): the keyed hash of one previous token (step 3 of the module's recipe)."""
    digest = hashlib.blake2b(previous.to_bytes(8, "little"), digest_size=12, key=derived_key,
                             person=b"heron-wm-h1").digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for int64 x in [0, 2**32): in 16-bit halves, so no product overflows int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 integer hash, a bijection of 32-bit words held in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def token_hashes(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) int64 h(v) for every token, from (B, 3) seed words (step 4)."""
    h = torch.arange(vocab_size, dtype=torch.long, device=words.device).expand(len(words), vocab_size)  # (B, V)
    for i in range(3):
        h = lowbias32(h ^ words[:, i : i + 1])
    return h


class _GreenLists:
    """Green-list rows of one (key, k, V, device), computed on demand and kept in an LRU."""

    def __init__(self, derived_key: bytes, k: int, vocab_size: int, device: torch.device) -> None:
        self.derived_key, self.k, self.vocab_size, self.device = derived_key, k, vocab_size, device
        self.max_rows = max(1, CACHE_BYTES // vocab_size)
        self._rows: OrderedDict[int, torch.Tensor] = OrderedDict()  # previous id -> (V,) bool
        self._lock = threading.Lock()  # a server may decode on several threads

    def rows(self, previous: torch.Tensor) -> torch.Tensor:
        """(N, V) bool green lists for previous ids (N,)."""
        unique, inverse = torch.unique(previous, return_inverse=True)
        ids = unique.tolist()
        if ids and (ids[0] < 0 or ids[-1] >= self.vocab_size):
            raise ValueError(f"previous_ids: token ids must lie in [0, {self.vocab_size})")
        with self._lock:
            missing = [p for p in ids if p not in self._rows]
            for start in range(0, len(missing), _ROWS_PER_CHUNK):
                chunk = missing[start : start + _ROWS_PER_CHUNK]
                for p, row in zip(chunk, self._compute(chunk)):
                    self._rows[p] = row
            for p in ids:
                self._rows.move_to_end(p)
            table = torch.stack([self._rows[p] for p in ids])  # (U, V)
            while len(self._rows) > self.max_rows:
                self._rows.popitem(last=False)
        return table[inverse]  # (N, V)

    def _compute(self, previous: list[int]) -> torch.Tensor:
        words = torch.tensor([seed_words(self.derived_key, p) for p in previous], device=self.device)  # (n, 3)
        h = token_hashes(words, self.vocab_size)  # (n, V), distinct within a row
        kth = h.kthvalue(self.k, dim=1, keepdim=True).values  # (n, 1): the k-th smallest
        return h <= kth  # exactly k per row


@lru_cache(maxsize=16)
def _green_lists(derived_key: bytes, k: int, vocab_size: int, device: torch.device) -> _GreenLists:
    return _GreenLists(derived_key, k, vocab_size, device)


def _check_number(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")


__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_GAMMA",
    "DEFAULT_Z_THRESHOLD",
    "Detection",
    "MAX_DELTA",
    "Watermark",
    "detect",
    "green_hits",
    "binomial_tail",
    "key_bytes",
    "lowbias32",
    "p_value",
    "seed_words",
    "token_hashes",
    "z_score",
]
