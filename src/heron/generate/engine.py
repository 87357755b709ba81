"""Batched generation with one preallocated KV cache.

Prompts of different lengths are left-padded into one batch and prefilled in
a single forward pass (the attention mask hides the padding, and the cache
remembers it); after that each step feeds one token per row. The cache holds
the whole generation from the start, so a step copies only the new token's
keys and values. Rows that finish keep decoding until every row has: on a
CPU a decode step costs the time to read the weights, which does not shrink
with the batch, so dropping rows would save nothing and cost cache copies.

Per step the loop does one forward, one sampling call and, only when
something must be checked on the host (stop token ids, stop strings,
streaming), one `.tolist()` of the B new ids. Stop strings are matched on
text decoded incrementally, one short window per token.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from heron.core.kv_cache import KVCache
from heron.core.modes import evaluating
from heron.core.linear import set_decode_layout
from heron.core.token_step import TokenStep
from heron.core.transformer import Transformer, check_next_token_head
from heron.generate.sampling import SamplingParams, presence_mask, sample_next
from heron.generate.text import IncrementalDetokenizer, StopStringFilter, TokenizerLike, trim_at_stop

FINISH_STOP = "stop"  # a stop token id or stop string ended the row
FINISH_LENGTH = "length"  # max_new_tokens reached


@dataclass
class Completion:
    """One prompt's continuation."""

    ids: list[int]  # generated ids; a stop token id is not included, a stop string's tokens are
    text: str | None  # decoded, cut before any stop string; None without a tokenizer
    finish_reason: str  # FINISH_STOP or FINISH_LENGTH
    stop_token: int | None = None  # the stop token id that ended it, if one did


def token_ids(name: str, ids: Sequence[int] | torch.Tensor | np.ndarray) -> torch.Tensor:
    """ids as a long tensor, refusing floats: casting would truncate 1.5 to token 1 without a word."""
    try:
        tensor = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as err:  # a generator, strings, ragged lists
        raise ValueError(f"{name}: expected token ids (a list of ints or an integer tensor), got {ids!r:.60}") from err
    wrong_kind = tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool
    if wrong_kind and tensor.numel() > 0:  # [] makes a float tensor, and is no float
        raise ValueError(f"{name}: token ids must be integers, got {tensor.dtype}")
    return tensor.long()


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, vocab_size: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, P) ids padded on the left, and the (B, P) bool mask of real tokens
    (None when every prompt has the same length, so no masking is needed).

    The mask hides padding from the model, so any id the embedding holds will do:
    a pad_id outside [0, vocab_size) (a tokenizer's pad token past the model's
    vocabulary) is replaced by 0."""
    if isinstance(prompts, torch.Tensor):  # (B, P) ids: every row a prompt
        if prompts.dim() != 2:
            raise ValueError(f"prompt_ids: a tensor of prompts is (B, P), got shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if len(prompts) == 0:
        raise ValueError("prompt_ids: expected at least one prompt")
    if not all((isinstance(p, Sequence) and not isinstance(p, str)) or (isinstance(p, torch.Tensor) and p.dim() == 1)
               or (isinstance(p, np.ndarray) and p.ndim == 1) for p in prompts):
        raise ValueError("prompt_ids: expected a batch of prompts, each a list of token ids (one prompt: "
                         "[ids], not ids)")
    lengths = [len(p) for p in prompts]
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt_ids[{i}]: empty prompt; give at least one token (e.g. BOS)")
    width = max(lengths)
    pad_id = pad_id if 0 <= pad_id < vocab_size else 0
    rows = [_prompt_row(i, p) for i, p in enumerate(prompts)]
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)  # (B, P)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        bad = next(i for i, r in enumerate(rows) if any(t < 0 or t >= vocab_size for t in r))
        raise ValueError(f"prompt_ids[{bad}]: token ids must lie in [0, {vocab_size})")
    if min(lengths) == width:
        return ids, None
    positions = torch.arange(width, device=device)
    mask = positions >= torch.tensor([width - n for n in lengths], device=device)[:, None]  # (B, P)
    return ids, mask


def _prompt_row(index: int, prompt: Sequence[int] | torch.Tensor | np.ndarray) -> list[int]:
    """One prompt's ids as a flat list. A nested one (a (1, P) tensor, as a tokenizer returns
    for one prompt) is refused here: padded, it would reach the model as a 3-D batch."""
    row = token_ids(f"prompt_ids[{index}]", prompt)
    if row.dim() != 1:
        raise ValueError(f"prompt_ids[{index}]: one prompt is a flat list of token ids, got shape "
                         f"{tuple(row.shape)}; pass a (1, P) tensor's row, tensor[0]")
    return row.tolist()


class Decoder:
    """The incremental decoding state of one batch.

    Construction prefills the prompts; each `step` then samples the next ids,
    running the model on the previous ones first, and writes into a KV cache
    sized for prompt + max_new_tokens. The engine's loops and decode-speed
    benchmarks both drive this.
    """

    def __init__(
        self, model: Transformer, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, pad_id: int = 0
    ) -> None:
        config = model.config
        check_next_token_head("model", model, "it cannot generate; generate with a head 'lm' model")
        weight = next(model.parameters())  # the model's device and dtype (a quantised embed has no plain weight)
        ids, mask = left_pad(prompt_ids, pad_id, config.vocab_size, weight.device)
        B, P = ids.shape
        if P > config.max_seq_len:
            raise ValueError(f"prompt_ids: a {P}-token prompt is longer than the model's max_seq_len "
                             f"{config.max_seq_len}")
        # The last new token is never fed back, so a prompt filling the context still gets one.
        if P + params.max_new_tokens - 1 > config.max_seq_len:
            raise ValueError(
                f"max_new_tokens: a {P}-token prompt plus {params.max_new_tokens} new tokens "
                f"exceeds the model's max_seq_len {config.max_seq_len} (at most {config.max_seq_len + 1 - P})"
            )
        set_decode_layout(model, B)  # the faster few-row products (core/linear.py)
        self.model = model
        self.token_step = TokenStep(model)  # the one-token forward without module dispatch (core/token_step.py)
        self.params = params
        self.generator = _make_generator(params.seed, weight.device)
        max_len = min(P + params.max_new_tokens, config.max_seq_len)
        self.cache = KVCache.allocate(config, B, max_len, dtype=weight.dtype, device=weight.device)
        self.prompt_len = P
        self._prefill(ids, mask)

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @torch.inference_mode()
    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        needs_seen = self.params.repetition_penalty != 1.0
        # The CTRL penalty counts prompt tokens too, as Hugging Face's does.
        self.seen = presence_mask(ids, self.model.config.vocab_size, mask) if needs_seen else None  # (B, V)
        with evaluating(self.model):  # a model left in train mode decodes as in eval, and is handed back unchanged
            out = self.model(ids, attention_mask=mask, cache=self.cache, last_only=True)
        self.logits = out.logits[:, -1]  # (B, V)
        self.previous = ids[:, -1]  # (B,): padding is on the left, so each row's last prompt token

    @torch.inference_mode()
    def step(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Feed the previous step's ids (B,), if any, then sample the next (B,).

        The first call samples from the prefill's logits; each later call is
        one forward pass of one token per row. The sampler is also given each
        row's previous token (the last prompt token, the first time), which a
        watermark's green list depends on.
        """
        if ids is not None:
            with evaluating(self.model):
                if self.token_step.ready():  # no hook attached: the same numbers without module dispatch
                    self.logits = self.token_step(ids, self.cache)  # (B, V)
                else:
                    self.logits = self.model(ids[:, None], cache=self.cache).logits[:, -1]
            self.previous = ids
        next_ids = sample_next(self.logits, self.params, self.generator, self.seen, self.previous)
        if self.seen is not None:
            self.seen.scatter_(1, next_ids[:, None], True)
        return next_ids


def decode_steps(decoder: Decoder, n_tokens: int) -> Iterator[torch.Tensor]:
    """Yield (B,) sampled ids n_tokens times.

    The model runs on a token only when the consumer asks for the next one,
    so breaking out of the loop wastes no forward pass.
    """
    ids = None
    for _ in range(n_tokens):
        ids = decoder.step(ids)
        yield ids


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class _Row:
    """One row's generated ids, finishing state and (when tracked) text."""

    def __init__(
        self, stop_ids: frozenset[int], tokenizer: TokenizerLike | None, stops: Sequence[str], track_text: bool
    ) -> None:
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.finish_reason: str | None = None
        self.stop_token: int | None = None
        self.detok = IncrementalDetokenizer(tokenizer) if track_text and tokenizer is not None else None
        self.filter = StopStringFilter(stops) if stops else None
        self.pieces: list[str] = []

    def push(self, token: int) -> str:
        """Record one generated token; return the text it releases."""
        if token in self.stop_ids:
            self.stop_token = token
            return self.close(FINISH_STOP)
        self.ids.append(token)
        if self.detok is None:
            return ""
        released = self._release(self.detok.push(token))
        if self.filter is not None and self.filter.stopped:
            self.finish_reason = FINISH_STOP
        return released

    def close(self, reason: str) -> str:
        """Finish the row (unless already finished) and release the text held back; a stop
        string that only the held-back text completes makes the reason a stop."""
        released = ""
        if self.detok is not None:
            released = self._release(self.detok.flush())
            if self.filter is not None:
                released += self._release(self.filter.finish())
        if self.finish_reason is None:
            self.finish_reason = FINISH_STOP if self.filter is not None and self.filter.stopped else reason
        return released

    def _release(self, piece: str) -> str:
        if self.filter is not None and piece:
            piece = self.filter.feed(piece)
        if piece:
            self.pieces.append(piece)
        return piece


class Generator:
    """Text and token generation with one model and (optionally) a tokenizer."""

    def __init__(self, model: Transformer, tokenizer: TokenizerLike | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        pad_id = tokenizer.pad_id if tokenizer is not None else None
        self.pad_id = pad_id if pad_id is not None else 0  # any id works: padding is masked out

    def stop_token_ids(self, params: SamplingParams) -> frozenset[int]:
        """The ids that end a row: params.stop_token_ids, else the tokenizer's (its EOS, and
        any a Hugging Face folder's generation_config.json adds)."""
        if params.ignore_eos:
            return frozenset()
        if params.stop_token_ids is not None:
            vocab = self.model.config.vocab_size
            if outside := [i for i in params.stop_token_ids if i >= vocab]:
                raise ValueError(f"stop_token_ids: {outside} lie outside the model's vocabulary [0, {vocab}), "
                                 "so they could never end a row")
            return frozenset(params.stop_token_ids)
        return frozenset(self.tokenizer.stop_ids) if self.tokenizer is not None else frozenset()

    def complete(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Continue a batch of tokenised prompts of any lengths. A model in train mode (a policy
        sampling its rollouts) is in eval mode for the whole completion and handed back after:
        a step's own switch back to training would lay the weights out for training's products
        (`Transformer.train`) under every later step, and walk every module twice a token."""
        self._check_stops(params)
        with evaluating(self.model):
            return self._complete(Decoder(self.model, prompt_ids, params, self.pad_id), params)

    def _complete(self, decoder: Decoder, params: SamplingParams) -> list[Completion]:
        stop_ids = self.stop_token_ids(params)
        if not stop_ids and not params.stop:
            return self._complete_unchecked(decoder, params)
        rows = [_Row(stop_ids, self.tokenizer, params.stop, bool(params.stop)) for _ in range(decoder.batch_size)]
        live = list(range(len(rows)))
        for ids in decode_steps(decoder, params.max_new_tokens):
            tokens = ids.tolist()  # the step's one host sync
            for i in live:
                rows[i].push(tokens[i])
            live = [i for i in live if rows[i].finish_reason is None]
            if not live:
                break
        return [self._finish(row) for row in rows]

    def _complete_unchecked(self, decoder: Decoder, params: SamplingParams) -> list[Completion]:
        """No stop condition but length: nothing to look at until the end."""
        steps = list(decode_steps(decoder, params.max_new_tokens))
        ids = torch.stack(steps, dim=1).tolist()  # (B, max_new_tokens)
        return [Completion(row, self._decode(row), FINISH_LENGTH) for row in ids]

    def _finish(self, row: _Row) -> Completion:
        row.close(FINISH_LENGTH)
        # A whole decode, not the streamed pieces: those can differ where a byte-fallback run
        # turned invalid after part of it was streamed (IncrementalDetokenizer).
        text = self._decode(row.ids)
        if text is not None and row.filter is not None:
            text = trim_at_stop(text, row.filter.stops)
        return Completion(row.ids, text, row.finish_reason or FINISH_LENGTH, row.stop_token)

    def _decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """Generated ids for each tokenised prompt (stop token ids left out)."""
        return [c.ids for c in self.complete(prompt_ids, params)]

    def generate(self, prompts: str | Sequence[str | Sequence[int]], params: SamplingParams) -> str | list[str]:
        """Continue one text prompt (returns a string) or a batch of text or
        token-id prompts (returns a list)."""
        self._require_tokenizer()  # even for ids: without one the text out would silently be ''
        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        texts = [c.text or "" for c in self.complete([self.prompt_ids(p) for p in batch], params)]
        return texts[0] if single else texts

    def stream(self, prompt: str | Sequence[int], params: SamplingParams) -> Iterator[str]:
        """Text pieces of one continuation of a prompt (text or ids) as they are decoded.

        Their concatenation equals `generate(prompt, params)`, except where a
        byte-fallback run turned invalid after part of it was streamed (see
        `IncrementalDetokenizer`): `generate` decodes all the ids. The prompt is
        prefilled before this returns; pieces come as the iterator is consumed.
        """
        self._require_tokenizer()
        self._check_stops(params)
        decoder = Decoder(self.model, [self.prompt_ids(prompt)], params, self.pad_id)
        row = _Row(self.stop_token_ids(params), self.tokenizer, params.stop, track_text=True)
        return _stream_pieces(decoder, row, params.max_new_tokens)

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """The ids a prompt (text, or ids already) is decoded from.

        Text is plain text: a special token's spelling in it ("<|eos|>") is
        encoded as the characters it is made of, never as the control token, so
        a user's words cannot end a turn or open another role's (data
        preparation and `encode_chat` encode text the same way). A prompt that
        needs special tokens is given as ids.
        """
        return self._encode(prompt) if isinstance(prompt, str) else token_ids("prompt_ids", prompt).tolist()

    def _encode(self, text: str) -> list[int]:
        tokenizer = self._require_tokenizer()
        ids = tokenizer.encode(text, allow_special=False)
        bos = getattr(tokenizer, "bos_id", None)
        return ids if ids or bos is None else [bos]  # an empty prompt starts from BOS

    def _require_tokenizer(self) -> TokenizerLike:
        if self.tokenizer is None:
            raise ValueError("text generation needs a tokenizer: Generator(model, tokenizer); for token ids "
                             "without text use generate_ids or complete")
        return self.tokenizer

    def _check_stops(self, params: SamplingParams) -> None:
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer: Generator(model, tokenizer)")


def _stream_pieces(decoder: Decoder, row: _Row, n_tokens: int) -> Iterator[str]:
    for ids in decode_steps(decoder, n_tokens):
        piece = row.push(int(ids[0]))
        if piece:
            yield piece
        if row.finish_reason is not None:
            break
    tail = row.close(FINISH_LENGTH)
    if tail:
        yield tail


__all__ = ["Completion", "Decoder", "FINISH_LENGTH", "FINISH_STOP", "Generator", "decode_steps", "left_pad",
           "token_ids"]
