from dataclasses import replace

import numpy as np
import pytest
import torch

from heron.generate import (FINISH_LENGTH, FINISH_STOP, Decoder, Generator, SamplingParams, apply_repetition_penalty,
                            decode_steps, left_pad)
from heron.generate.engine import _Row
from heron.tokenizer import SPECIAL_TOKENS, train_tokenizer

class HoldingBack:
    """A detokenizer that releases "x" per token and keeps `held` back until the flush."""

    def __init__(self, held: str) -> None:
        self.held = held

    def push(self, token: int) -> str:
        return "x"

    def flush(self) -> str:
        return self.held


GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 3, 40, 41, 42, 9, 60, 61, 2, 11, 12], [33], [70, 71, 72, 73, 74]]


@torch.no_grad()
def reference_greedy(model, prompt, n, stop_ids=(), penalty=1.0):
    """No cache, no batching: recompute the whole sequence for every token."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[:, -1]  # (1, V)
        logits = apply_repetition_penalty(logits, torch.tensor([seq]), penalty)
        token = int(logits.argmax())
        if token in stop_ids:
            break
        out.append(token)
        seq.append(token)
    return out


def test_cached_greedy_equals_full_recompute(model):
    [ids] = Generator(model).generate_ids([PROMPTS[0]], GREEDY)
    assert ids == reference_greedy(model, PROMPTS[0], GREEDY.max_new_tokens)


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(model):
    gen = Generator(model)
    batched = gen.generate_ids(PROMPTS, GREEDY)
    for prompt, ids in zip(PROMPTS, batched):
        assert ids == gen.generate_ids([prompt], GREEDY)[0]
        assert ids == reference_greedy(model, prompt, GREEDY.max_new_tokens)


def test_learned_positions_batch_equals_reference(make_model):
    model = make_model(positions="learned", norm="layernorm", mlp="gelu")
    batched = Generator(model).generate_ids(PROMPTS, GREEDY)
    assert batched == [reference_greedy(model, p, GREEDY.max_new_tokens) for p in PROMPTS]


def test_repetition_penalty_equals_reference(model):
    params = SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1.8, ignore_eos=True)
    batched = Generator(model).generate_ids(PROMPTS, params)
    assert batched == [reference_greedy(model, p, 20, penalty=1.8) for p in PROMPTS]
    assert batched != Generator(model).generate_ids(PROMPTS, replace(params, repetition_penalty=1.0))


def test_top_k_1_equals_greedy(model):
    params = SamplingParams(max_new_tokens=24, temperature=1.3, top_k=1, ignore_eos=True, seed=5)
    assert Generator(model).generate_ids(PROMPTS, params) == Generator(model).generate_ids(PROMPTS, GREEDY)


def test_a_tiny_temperature_decodes_as_greedy(model):
    for temperature in (1e-37, 1e-45, 1e-300):  # float32 overflows, or cannot hold the temperature at all
        params = replace(GREEDY, temperature=temperature, seed=0)
        assert Generator(model).generate_ids(PROMPTS, params) == Generator(model).generate_ids(PROMPTS, GREEDY)


def test_same_seed_same_text_different_seed_different_text(model, tokenizer):
    gen = Generator(model, tokenizer)
    hot = dict(max_new_tokens=30, temperature=2.0, ignore_eos=True)
    first = gen.generate(["hello", "x"], SamplingParams(**hot, seed=7))
    assert gen.generate(["hello", "x"], SamplingParams(**hot, seed=7)) == first
    assert gen.generate(["hello", "x"], SamplingParams(**hot, seed=8)) != first


def test_max_new_tokens_is_respected(model):
    gen = Generator(model)
    for n in (1, 2, 7):
        params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
        completions = gen.complete(PROMPTS, params)
        assert [len(c.ids) for c in completions] == [n] * len(PROMPTS)
        assert {c.finish_reason for c in completions} == {FINISH_LENGTH}


def test_each_row_stops_at_its_own_stop_token(model):
    gen = Generator(model)
    full = gen.generate_ids(PROMPTS, GREEDY)
    stop = full[0][6]  # row 0 stops at its 7th token; other rows where (if) it occurs
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[stop])
    completions = gen.complete(PROMPTS, params)
    for row, c in zip(full, completions):
        cut = row.index(stop) if stop in row else len(row)
        assert c.ids == row[:cut]  # the stop token itself is left out
        assert c.finish_reason == (FINISH_STOP if stop in row else FINISH_LENGTH)
    assert completions[0].ids == full[0][:6]


def test_eos_is_the_default_stop_token(model, tokenizer):
    gen = Generator(model, tokenizer)
    assert gen.stop_token_ids(SamplingParams()) == {tokenizer.eos_id}
    assert gen.stop_token_ids(SamplingParams(stop_token_ids=[4, 5])) == {4, 5}
    assert gen.stop_token_ids(SamplingParams(ignore_eos=True, stop_token_ids=[4])) == set()
    assert Generator(model).stop_token_ids(SamplingParams()) == set()
    with pytest.raises(ValueError, match=r"stop_token_ids: \[97\] lie outside the model's vocabulary \[0, 97\)"):
        gen.complete([[1, 2]], SamplingParams(max_new_tokens=4, stop_token_ids=[3, 97]))  # could never end a row


def test_a_stop_string_completed_by_held_back_text_is_a_stop(model, tokenizer):
    """At max_new_tokens the detokenizer releases what it held back (an unfinished character, say);
    a stop string that text completes ends the row as a stop, and the text is cut before it."""
    row = _Row(frozenset(), tokenizer, ["xyz"], track_text=True)
    row.detok = HoldingBack(held="yz tail")  # pushes release "x", the flush the rest
    assert row.push(5) == "" and row.finish_reason is None  # "x": a prefix of the stop, held by the filter
    assert row.close(FINISH_LENGTH) == "" and row.finish_reason == FINISH_STOP


def test_stop_strings_trim_the_text_and_stop_early(model, tokenizer):
    gen = Generator(model, tokenizer)
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    full = gen.generate("def f(x):", params)
    assert len(full) > 20  # pad and eos tokens decode to nothing
    stop = full[10:13]
    cut = full.index(stop)
    [completion] = gen.complete([tokenizer.encode("def f(x):")], replace(params, stop=[stop]))
    assert completion.text == full[:cut]
    assert completion.finish_reason == FINISH_STOP
    assert tokenizer.decode(completion.ids) == full[: cut + len(stop)]  # stopped right after the stop string


def test_stream_concatenates_to_generate(model, tokenizer):
    gen = Generator(model, tokenizer)
    base = dict(max_new_tokens=40, ignore_eos=True)
    full = gen.generate("abc", SamplingParams(**base, temperature=0))
    for params in (
        SamplingParams(**base, temperature=0),
        SamplingParams(**base, temperature=0, stop=[full[20:23], "never"]),
        SamplingParams(**base, temperature=1.5, top_p=0.9, top_k=40, seed=3, stop=["q"]),
        SamplingParams(max_new_tokens=40, temperature=1.0, seed=11),
    ):
        pieces = list(gen.stream("abc", params))
        assert "".join(pieces) == gen.generate("abc", params)
        assert all(pieces)


def test_stream_of_bytes_holds_back_partial_characters(make_model, byte_tokenizer):
    gen = Generator(make_model(vocab_size=258), byte_tokenizer)
    for seed in range(3):
        params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=seed, ignore_eos=True)
        assert "".join(gen.stream("é", params)) == gen.generate("é", params)


def test_decoder_runs_exactly_the_requested_steps(model):
    decoder = Decoder(model, [[3, 4, 5]] * 2, SamplingParams(max_new_tokens=10, temperature=0))
    ids = decoder.step()  # from the prefill's logits
    for _ in range(10):  # the benchmark's loop: 10 forwards of one token per row
        ids = decoder.step(ids)
    assert decoder.cache.length == 3 + 10 and ids.shape == (2,)


def test_a_hook_attached_while_decoding_sees_every_step_and_steers_it(model):
    """Unhooked steps skip module dispatch (core/token_step.py); a hook must
    bring the model's forward back, seeing and changing every step."""
    prompt, n = PROMPTS[2], 6
    params = replace(GREEDY, max_new_tokens=n)
    seen = []

    def steer(resid, name):
        seen.append(resid.shape[1])
        return resid * -1.0

    with model.hooks({"blocks.0.hook_resid_post": steer}):
        steered = Generator(model).generate_ids([prompt], params)[0]
        assert seen == [len(prompt)] + [1] * (n - 1)  # the prefill, then each step
        assert steered == reference_greedy(model, prompt, n)  # the reference under the same hook
    assert steered != Generator(model).generate_ids([prompt], params)[0]


@pytest.mark.parametrize(
    "prompts, params, field",
    [
        ([[]], GREEDY, "prompt_ids\\[0\\]"),
        ([], GREEDY, "prompt_ids"),
        ([[1, 97]], GREEDY, "prompt_ids\\[0\\]"),
        ([[1] * 100], SamplingParams(max_new_tokens=30), "max_new_tokens: .* \\(at most 29\\)$"),
        ([[1] * 129], SamplingParams(max_new_tokens=1), "prompt_ids: a 129-token prompt is longer than the model's "
                                                        "max_seq_len 128"),
        ([[1.5, 2]], GREEDY, "prompt_ids\\[0\\]: token ids must be integers"),  # not token 1, silently
        (torch.tensor([[3.0, 4.0]]), GREEDY, "prompt_ids\\[0\\]: token ids must be integers"),
        ([[1]], SamplingParams(stop=["x"]), "stop"),
        ([1, 2, 3], GREEDY, "prompt_ids: expected a batch of prompts"),  # one prompt's ids, not a batch
        (torch.tensor([1, 2, 3]), GREEDY, "prompt_ids: a tensor of prompts is \\(B, P\\)"),
        ([[[1, 2]]], GREEDY, "prompt_ids\\[0\\]: one prompt is a flat list of token ids, got shape \\(1, 2\\)"),
        ([[4], [[1, 2], [3, 4]]], GREEDY, "prompt_ids\\[1\\]: one prompt is a flat list .* \\(2, 2\\)"),
    ],
)
def test_bad_requests_name_the_field(model, prompts, params, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        Generator(model).generate_ids(prompts, params)


def test_one_prompt_given_as_a_1_by_p_tensor_is_refused_naming_the_prompt(model, tokenizer):
    with pytest.raises(ValueError, match="^prompt_ids\\[0\\]: one prompt is a flat list .* tensor\\[0\\]$"):
        Generator(model, tokenizer).stream(torch.tensor([[5, 6, 7]]), GREEDY)


def test_a_scalar_head_model_refuses_to_generate(make_model):
    scorer = make_model(head="scalar", tie_embeddings=False)  # a reward model: one score per position
    for params in (GREEDY, SamplingParams(max_new_tokens=4, seed=0)):
        with pytest.raises(ValueError, match="^model: a model with head 'scalar' .* cannot generate"):
            Generator(scorer).generate_ids([[5, 6, 7]], params)


def test_a_tensor_of_prompts_is_a_batch_as_its_rows_are(model):
    prompts = [[1, 2, 3], [4, 5, 6]]
    generator = Generator(model)
    assert generator.generate_ids(torch.tensor(prompts), GREEDY) == generator.generate_ids(prompts, GREEDY)
    with pytest.raises(TypeError, match="input_ids: expected a \\(B, T\\) tensor of token ids, got list"):
        model(prompts)


def test_prompt_filling_the_context_exactly_is_allowed(model):
    # 100 prompt tokens + 29 new: 128 tokens go through the model, its max_seq_len.
    [ids] = Generator(model).generate_ids([[2] * 100], SamplingParams(max_new_tokens=29, temperature=0))
    assert len(ids) <= 29


def test_text_api_needs_a_tokenizer(model):
    with pytest.raises(ValueError, match="tokenizer"):
        Generator(model).generate("hi", GREEDY)
    # Ids in, but text out: without a tokenizer the text would be '' for any ids generated.
    for text_out in (lambda g: g.generate([[1, 2, 3]], GREEDY), lambda g: list(g.stream([1, 2, 3], GREEDY))):
        with pytest.raises(ValueError, match="^text generation needs a tokenizer: .* use generate_ids or complete"):
            text_out(Generator(model))


def test_a_prompt_of_float_ids_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match="^prompt_ids: token ids must be integers"):
        Generator(model, tokenizer).generate([[1.5, 2]], GREEDY)
    assert Generator(model).prompt_ids(torch.tensor([1, 2])) == [1, 2]
    rows = [np.array(PROMPTS[0]), torch.tensor(PROMPTS[1]), PROMPTS[2]]  # 1-D arrays are prompts as lists are
    assert Generator(model).generate_ids(rows, GREEDY) == Generator(model).generate_ids(PROMPTS, GREEDY)
    for bad in ((i for i in (1, 2)), ["1", "2"]):  # a generator, strings: named, not torch's words
        with pytest.raises(ValueError, match="^prompt_ids: expected token ids"):
            Generator(model).prompt_ids(bad)


def test_a_pad_id_outside_the_vocabulary_pads_with_one_inside(model, tokenizer):
    # Padding is masked out, so any id the embedding holds will do; 97 would index past it.
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=97, vocab_size=97)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    tokenizer.pad_id = 500  # a tokenizer whose pad token lies past the model's vocabulary
    gen = Generator(model, tokenizer)
    assert gen.generate(["abc", "a"], GREEDY) == [gen.generate("abc", GREEDY), gen.generate("a", GREEDY)]


def test_special_token_spellings_in_prompt_text_stay_plain_text(make_model):
    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n"] * 5, vocab_size=300, progress=False)
    gen = Generator(make_model(vocab_size=tokenizer.vocab_size), tokenizer)
    text = f"Please repeat: {SPECIAL_TOKENS['eos']}{SPECIAL_TOKENS['user']}"
    special = set(tokenizer.special_ids.values())
    assert {tokenizer.eos_id, tokenizer.special_ids["user"]} <= set(tokenizer.encode(text))  # real spellings
    ids = gen.prompt_ids(text)
    assert not special & set(ids) and tokenizer.decode(ids) == text  # no control token injected
    assert gen.prompt_ids([tokenizer.eos_id]) == [tokenizer.eos_id]  # ids are for prompts that need them


def test_single_prompt_returns_a_string(model, tokenizer):
    gen = Generator(model, tokenizer)
    one = gen.generate("hi", GREEDY)
    assert isinstance(one, str) and gen.generate(["hi"], GREEDY) == [one]


def test_left_padding_is_not_a_seen_token_for_the_repetition_penalty(model):
    """The short row is padded with the very token it picks first when decoded alone: counted as
    seen, the penalty would push it down and change the row; masked out, the row decodes as alone."""
    short, long = [33], PROMPTS[0]
    params = SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.8, ignore_eos=True)
    alone = reference_greedy(model, short, 8, penalty=1.8)
    pad = alone[0]
    assert pad not in short
    decoder = Decoder(model, [long, short], params, pad_id=pad)
    assert decoder.seen[1].nonzero().flatten().tolist() == short
    assert decoder.seen[0].nonzero().flatten().tolist() == sorted(set(long))
    rows = torch.stack(list(decode_steps(decoder, 8)), dim=1).tolist()  # (B, 8)
    assert rows == [reference_greedy(model, long, 8, penalty=1.8), alone]


def test_a_model_in_train_mode_decodes_on_the_decode_layout_and_is_handed_back_for_training(make_model, monkeypatch):
    """complete() holds a training model in eval mode for the whole completion: every step runs on
    the few-row layout (core/linear.py), as an eval model's do, with the same tokens, and the model
    comes back in train mode laid out for training. A step's own switch back to training had laid
    the weights out for training under every step after the prefill."""
    import heron.generate.engine as engine
    from heron.core.linear import Linear, is_input_major

    model = make_model()
    wide = [m.weight for m in model.modules() if isinstance(m, Linear) and m.out_features > m.in_features]
    layouts, sample_next = [], engine.sample_next

    def recording(*args, **kwargs):
        layouts.append([is_input_major(w) for w in wide])
        return sample_next(*args, **kwargs)

    monkeypatch.setattr(engine, "sample_next", recording)
    expected = Generator(model).complete([PROMPTS[0]], GREEDY)[0].ids
    model.train()
    assert Generator(model).complete([PROMPTS[0]], GREEDY)[0].ids == expected
    assert wide and all(all(step) for step in layouts)  # every step of both runs input-major
    assert model.training and not any(is_input_major(w) for w in wide)
