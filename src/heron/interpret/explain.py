"""`heron explain`: one prompt through every lens, as an HTML report in a folder.

    page = explain(model, tokenizer, ExplainSettings(prompt="def add(a, b):\\n    return"), "runs/explain")

Sections, each saying what it shows and how to read it: the prediction; the
logit lens; direct logit attribution of the predicted token to heads and
MLPs; attention patterns; induction and previous-token head scores; input
attribution by integrated gradients and gradient x input; activation
patching against a corrupted prompt (when one is given); MoE routing (for
MoE models). The energy of making the report is measured and stated.
"""
from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from heron.core.modes import evaluating
from heron.core.transformer import Transformer
from heron.generate.text import TokenizerLike
from heron.govern import EnergyMeter
from heron.interpret.attribution import MAX_STEPS, ConvergenceError, gradient_x_input, integrated_gradients
from heron.interpret.cache import ActivationCache, check_next_token_head, resid_names, run_with_cache
from heron.interpret.heads import attention_patterns, detect_heads, head_scores, plot_attention_patterns, repeated_tokens
from heron.interpret.html import Section, Table, write_html
from heron.interpret.lens import direct_logit_attribution, dla_names, logit_lens
from heron.interpret.patching import logit_diff, patch_heads, patch_positions
from heron.interpret.plots import bars, heatmap
from heron.interpret.routing import moe_blocks, plot_load, routing
from heron.models.presets import parameter_count
from heron.train.checkpoint import atomic_folder, folder_files, require_replaceable

PAGE = "index.html"
TITLE = "Explanation"
# Written last into every report: the files the report holds, so that a later
# report replaces the folder only when it holds nothing else.
MARKER = "heron-explain.json"
WRITER = "heron explain"
MAX_IG_STEPS = MAX_STEPS // 4  # doubled twice while integrated gradients miss completeness
# What explains a reward model's score, for the refusal: the report is about a next-token prediction.
SCALAR_INSTEAD = ("the report explains a next-token prediction. For the score, call heron.interpret's "
                  "direct_logit_attribution, integrated_gradients or gradient_x_input with target=0 (the score), "
                  "and attention_patterns or detect_heads for its heads")


@dataclass(frozen=True)
class ExplainSettings:
    prompt: str
    corrupted: str | None = None  # same token count as the prompt: activation patching against it
    target: str | None = None  # the next token to explain (one token); None: the model's own top prediction
    ig_steps: int = 32  # doubled up to twice while integrated gradients miss completeness
    head_period: int = 16  # length of the random sequence repeated to score heads
    top_components: int = 20  # bars in the direct logit attribution chart

    def __post_init__(self) -> None:
        if not isinstance(self.ig_steps, int) or not 1 <= self.ig_steps <= MAX_IG_STEPS:
            raise ValueError(f"ig_steps: expected a whole number from 1 to {MAX_IG_STEPS}, got {self.ig_steps!r}")
        if not isinstance(self.head_period, int) or self.head_period < 2:
            raise ValueError(f"head_period: expected a whole number of at least 2, got {self.head_period!r}")


def explain(model: Transformer, tokenizer: TokenizerLike, settings: ExplainSettings,
            out_dir: str | os.PathLike[str]) -> Path:
    """Write the report (index.html, its PNGs and MARKER) into `out_dir`; return the page's path.

    The folder appears whole or not at all. It may be new, empty, or an earlier
    report, which it replaces; a folder holding any file an earlier report did not
    list in its MARKER is refused before any work (replacing it would delete them).
    The model runs in eval mode and is left in the mode it was in. A model
    without next-token logits (head "scalar") is refused before any work."""
    check_next_token_head("explain", model, SCALAR_INSTEAD)
    target_dir = require_replaceable(out_dir, _not_from_a_report, WRITER)
    device = model.embed.weight.device  # ids where the model is: a CUDA model read CPU ids and failed
    ids = torch.tensor([_encode(tokenizer, settings.prompt, "prompt", model)], device=device)  # (1, T)
    corrupted = None
    if settings.corrupted is not None:  # checked before the work, not after it
        corrupted = torch.tensor([_encode(tokenizer, settings.corrupted, "corrupted", model)], device=device)
        if corrupted.shape != ids.shape:
            raise ValueError(f"corrupted: {corrupted.shape[1]} tokens, but the prompt has {ids.shape[1]}; patching "
                             "needs prompts of equal token length")
    target = None if settings.target is None else _target_id(tokenizer, settings.target)  # before the work too
    with evaluating(model), atomic_folder(target_dir) as out:
        _write_report(model, tokenizer, settings, ids, corrupted, target, out)
        _write_marker(out)
    return target_dir / PAGE


def _write_marker(out: Path) -> None:
    record = {"written_by": WRITER, "files": sorted(folder_files(out))}
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _not_from_a_report(folder: Path) -> set[str]:
    """The files of `folder` that no earlier report listed in its MARKER (all of them, without one)."""
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    ours = isinstance(record, dict) and record.get("written_by") == WRITER and isinstance(record.get("files"), list)
    written = {MARKER, *record["files"]} if ours else _report_before_the_marker(folder)
    return folder_files(folder) - written


def _report_before_the_marker(folder: Path) -> set[str]:
    """The files of a report written before reports carried MARKER: its page, known by the
    title `_write_report` gives it, and the images the page shows; none for any other folder."""
    try:
        page = (folder / PAGE).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return set()
    if not page.startswith("<!DOCTYPE html>") or f"<title>{TITLE}</title>" not in page:
        return set()
    return {PAGE, *(html.unescape(src) for src in re.findall(r'<img src="([^"]+)"', page))}


def _write_report(model: Transformer, tokenizer: TokenizerLike, settings: ExplainSettings, ids: torch.Tensor,
                  corrupted: torch.Tensor | None, target: int | None, out: Path) -> None:
    """The report's page and figures in `out`, explaining `target` (None: the model's top prediction)."""
    meter = EnergyMeter().start()
    tokens = [tokenizer.decode([i]) for i in ids[0].tolist()]
    output, cache = run_with_cache(model, ids, [*resid_names(model), *dla_names(model)])  # one forward for both
    logits = output.logits[0, -1].float()  # (V,)
    target = int(logits.argmax()) if target is None else target
    sections = [
        _prediction(tokenizer, logits, target),
        _lens(model, tokenizer, cache, tokens, out),
        _dla(model, cache, target, tokenizer, settings, out),
        _attention(model, ids, tokens, out),
        _heads(model, settings, out),
        _input_attribution(model, ids, tokens, target, tokenizer, settings, out),
    ]
    if corrupted is not None:
        sections.append(_patching(model, tokenizer, ids, corrupted, tokens, target, settings, out))
    if moe_blocks(model):
        sections.append(_routing(model, ids, tokenizer, out))
    energy = meter.stop()
    facts = [("prompt", repr(settings.prompt)), ("tokens", str(ids.shape[1])),
             ("model", f"{parameter_count(model):,} parameters, {model.config.n_layers} layers, "
                       f"{model.config.n_heads} heads"),
             ("energy of this report", f"{energy.joules:.1f} J ({energy.source}; "
                                       f"{'measured' if energy.measured else 'estimated'})")]
    write_html(out / PAGE, TITLE, sections, facts)


def _encode(tokenizer: TokenizerLike, text: str, field: str, model: Transformer) -> list[int]:
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError(f"{field}: {text!r} encodes to no tokens")
    if len(ids) > model.config.max_seq_len:
        raise ValueError(f"{field}: {len(ids)} tokens exceed the model's max_seq_len {model.config.max_seq_len}")
    return ids


def _target_id(tokenizer: TokenizerLike, text: str) -> int:
    """The one token `text` encodes to: a longer target is refused before the model runs, not once it has."""
    ids = tokenizer.encode(text)
    bos = getattr(tokenizer, "bos_id", None)
    if len(ids) == 2 and ids[0] == bos:  # a tokenizer that adds BOS (LLaMA's)
        ids = ids[1:]
    if len(ids) != 1:
        raise ValueError(f"target: {text!r} is {len(ids)} tokens; give text that is exactly one token")
    return ids[0]


def _label(tokenizer: TokenizerLike, token: int) -> str:
    return repr(tokenizer.decode([token]))


def _prediction(tokenizer: TokenizerLike, logits: torch.Tensor, target: int) -> Section:
    probs = logits.softmax(-1)
    top = probs.topk(min(10, probs.numel()))
    rows = [[rank + 1, _label(tokenizer, int(i)), float(p)] for rank, (p, i) in enumerate(zip(top.values, top.indices))]
    return Section("Prediction", f"The model's ten most likely next tokens after the prompt. The sections below "
                   f"explain the logit of {_label(tokenizer, target)} (p = {float(probs[target]):.3f}).",
                   tables=[Table(["rank", "token", "probability"], rows)])


def _lens(model: Transformer, tokenizer: TokenizerLike, cache: ActivationCache, tokens: list[str],
          out: Path) -> Section:
    lens = logit_lens(model, cache)[:, 0].float().softmax(-1)  # (L + 1, T, V)
    top = lens.max(-1)  # values, indices: (L + 1, T)
    rows = ["embeddings"] + [f"after block {i}" for i in range(model.config.n_layers)]
    cells = [[tokenizer.decode([int(i)]) for i in row] for row in top.indices]
    heatmap(top.values, out / "lens.png", rows=rows, columns=tokens, cells=cells, label="probability",
            title="Logit lens: top next-token prediction at each depth")
    last = [[rows[d], _label(tokenizer, int(top.indices[d, -1])), float(top.values[d, -1])] for d in range(len(rows))]
    return Section(
        "Logit lens",
        "Each row reads the residual stream at one depth through the model's final norm and output head, as if "
        "the layers above were skipped (nostalgebraist 2020). A cell shows the token that depth would predict "
        "next and, as colour, its probability. The bottom row is the model's real prediction. Read down a "
        "column to see at which depth the prediction forms.",
        images=["lens.png"], tables=[Table(["depth", "top token at the last position", "probability"], last)])


def _dla(model: Transformer, cache: ActivationCache, target: int, tokenizer: TokenizerLike, settings: ExplainSettings,
         out: Path) -> Section:
    attribution = direct_logit_attribution(model, cache, target)
    values = attribution.values[0]  # (C,)
    order = values.abs().argsort(descending=True)[: settings.top_components].tolist()
    bars(values[order], [attribution.labels[i] for i in order], out / "dla.png", xlabel="contribution to the logit",
         title=f"Direct logit attribution of {_label(tokenizer, target)}")
    return Section(
        "Direct logit attribution",
        "The target token's logit split into what each component writes straight into the final residual stream: "
        "the embeddings, every attention head and every MLP, read through the final norm with its scale held at "
        f"the value the real residual gives, so the parts add up to the logit ({float(attribution.logit[0]):.3f}). "
        "Positive bars push the token up. Only direct effects count: a head that works through later layers "
        "shows small here (see activation patching for total effects).",
        images=["dla.png"],
        tables=[Table(["component", "contribution"], [[attribution.labels[i], float(values[i])] for i in order])])


def _attention(model: Transformer, ids: torch.Tensor, tokens: list[str], out: Path) -> Section:
    paths = plot_attention_patterns(attention_patterns(model, ids), out / "attention", tokens=tokens)
    return Section(
        "Attention patterns",
        "For each layer, one panel per head: row t shows how much the token at position t attends to each earlier "
        "position (each row sums to 1). Diagonal lines one step below the main diagonal are previous-token heads; "
        "bright first columns are heads resting on the first token.",
        images=[str(p.relative_to(out)) for p in paths])


def _heads(model: Transformer, settings: ExplainSettings, out: Path) -> Section:
    # The sequence and its repeat must fit the context: a short-context model scores on a shorter period.
    period = min(settings.head_period, model.config.max_seq_len // 2)
    ids = repeated_tokens(8, period, model.config.vocab_size).to(model.embed.weight.device)
    scores = head_scores(model, ids, period)
    found = detect_heads(model, period=period, batch_size=8)
    images = []
    for name, values in scores.items():
        heads = [str(h) for h in range(values.shape[1])]
        heatmap(values, out / f"heads_{name}.png", rows=[f"layer {i}" for i in range(values.shape[0])],
                columns=heads, label="score", title=f"{name} score per head")
        images.append(f"heads_{name}.png")
    rows = [[name, ", ".join(f"{layer}.{head}" for layer, head in f.heads) or "none", f"{f.best[0]}.{f.best[1]}",
             f.best_score, f.margin] for name, f in found.items()]
    return Section(
        "Attention heads",
        f"Scores on 8 sequences of {period} random tokens repeated once (Olsson et al. 2022). "
        "Induction score: attention from a token in the repeat to the token after its earlier occurrence, the "
        "signature of in-context copying. Previous-token score: attention to the token just before. A head is "
        "reported when its score reaches the threshold; the margin is how far the found heads stand above every "
        "other head.",
        images=images, tables=[Table(["score", "heads found (layer.head)", "best", "best score", "margin"], rows)])


def _input_attribution(model: Transformer, ids: torch.Tensor, tokens: list[str], target: int,
                       tokenizer: TokenizerLike, settings: ExplainSettings, out: Path) -> Section:
    gxi = gradient_x_input(model, ids[0], target=target)
    ig, steps, note = None, settings.ig_steps, ""
    for _ in range(1 if moe_blocks(model) else 3):  # more steps cannot mend an MoE's jumps (attribution.py)
        try:
            ig = integrated_gradients(model, ids[0], target=target, steps=steps)
            break
        except ConvergenceError as err:
            note, steps = f"Integrated gradients are not shown: {err}.", steps * 2
    labels = [f"{i}: {t}" for i, t in enumerate(tokens)]
    images = []
    if ig is not None:
        bars(ig.scores, labels, out / "integrated_gradients.png", xlabel="attribution",
             title=f"Integrated gradients for {_label(tokenizer, target)}")
        images.append("integrated_gradients.png")
        note = (f"Integrated gradients used {ig.steps} steps; the scores sum to the logit difference from the "
                f"baseline within {ig.completeness_error:.2%}.")
    bars(gxi.scores, labels, out / "gradient_x_input.png", xlabel="attribution",
         title=f"Gradient x input for {_label(tokenizer, target)}")
    images.append("gradient_x_input.png")
    rows = [[label, float(gxi.scores[i])] + ([float(ig.scores[i])] if ig is not None else [])
            for i, label in enumerate(labels)]
    return Section(
        "Input attribution",
        "How much each prompt token contributes to the target logit. Integrated gradients (Sundararajan et al. "
        "2017) accumulate gradients along the straight path from a baseline (every token replaced by the mean "
        "embedding) to the prompt; their scores add up to the logit's change along that path. Gradient x input "
        "is the one-step, local version.\n\n" + note,
        images=images,
        tables=[Table(["token", "gradient x input"] + (["integrated gradients"] if ig is not None else []), rows)])


def _patching(model: Transformer, tokenizer: TokenizerLike, ids: torch.Tensor, corrupted: torch.Tensor,
              tokens: list[str], target: int, settings: ExplainSettings, out: Path) -> Section:
    with torch.no_grad():
        other = int(model(corrupted).logits[0, -1].argmax())
    if other == target:
        return Section("Activation patching", f"The corrupted prompt predicts the same token "
                       f"({_label(tokenizer, target)}) as the clean one, so there is no difference to trace.")
    metric = logit_diff(target, other)
    by_position = patch_positions(model, ids, corrupted, metric)  # (L, T)
    by_head = patch_heads(model, ids, corrupted, metric)  # (L, H)
    layers = [f"block {i}" for i in range(model.config.n_layers)]
    heatmap(by_position, out / "patching_positions.png", rows=layers, columns=tokens, diverging=True,
            label="share of the clean logit difference restored", title="Patching the residual stream")
    heatmap(by_head, out / "patching_heads.png", rows=layers, columns=[str(h) for h in range(by_head.shape[1])],
            diverging=True, label="share restored", title="Patching one head's output")
    return Section(
        "Activation patching",
        f"The clean prompt predicts {_label(tokenizer, target)}, the corrupted one ({settings.corrupted!r}) "
        f"{_label(tokenizer, other)}. Each cell runs the corrupted prompt with one piece of the clean run put back "
        "and reports how much of the logit difference between the two tokens comes back: 1 = all of the clean "
        "behaviour, 0 = none (Meng et al. 2022; Wang et al. 2022). Top: the residual stream entering each block "
        "at each position. Bottom: one attention head's output at every position.",
        images=["patching_positions.png", "patching_heads.png"])


def _routing(model: Transformer, ids: torch.Tensor, tokenizer: TokenizerLike, out: Path) -> Section:
    report = routing(model, [ids])
    plot_load(report, out / "routing.png")
    rows = []
    for layer, block in enumerate(report.layers):
        for expert, top in enumerate(report.top_tokens(layer, k=5)):
            rows.append([f"block {block}", expert, float(report.load[layer, expert]),
                         " ".join(repr(tokenizer.decode([t])) for t, _ in top)])
    return Section(
        "Mixture-of-Experts routing",
        "The share of the prompt's token-to-expert assignments each expert receives per MoE layer (1 / experts "
        "when balanced), and the prompt tokens each expert was given most.",
        images=["routing.png"], tables=[Table(["layer", "expert", "load", "tokens"], rows)])


__all__ = ["ExplainSettings", "PAGE", "explain"]
