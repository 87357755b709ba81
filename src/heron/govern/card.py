"""Model cards: a README.md with Hugging Face metadata and the sections of Model Cards for Model Reporting.

    text = model_card("runs/tiny/checkpoints/latest")        # the README.md text
    write_model_card("runs/tiny/checkpoints/latest")          # <folder>/README.md, written atomically

The YAML front matter follows the Hub's model card metadata
(https://github.com/huggingface/hub-docs/blob/main/modelcard.md; co2_eq_emissions
as https://huggingface.co/docs/hub/model-cards-co2 describes it). The body has
the sections of Mitchell et al. (2019), "Model Cards for Model Reporting"
(https://arxiv.org/abs/1810.03993): model details, intended use, factors,
metrics, evaluation data, training data, quantitative analyses, ethical
considerations, caveats and recommendations; plus environmental impact.

Everything written comes from JSON: the checkpoint's history (govern/history.py)
and evaluation results given as a file (`read_evaluations`). What no file can
say, such as the provider, the intended use or the license, is written as
PROVIDER, "[to be completed by the provider]": a card never guesses.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from heron.govern.audit import audit_log
from heron.govern.digest import Artifact, folder_sha256
from heron.govern.energy import DEFAULT_GRID_G_PER_KWH, JOULES_PER_KWH, provenance
from heron.govern.history import (
    LINEAGE_FILE, DataFacts, History, Stage, alignment_data, load_json, lookup, read_history, slug, training_data,
)
from heron.store.atomic import write_text_atomic

PROVIDER = "[to be completed by the provider]"
README_FILE = "README.md"
# A document's last line: the sha256 of the text above it, so that a rewrite can tell an untouched
# document from one the provider has edited (an HTML comment: renders as nothing).
WRITTEN_MARK = "<!-- written by heron card; sha256 of the text above: {digest} -->\n"
WRITTEN_MARK_PATTERN = re.compile(
    r"<!-- written by heron card; sha256 of the text above: (?P<digest>[0-9a-f]{64}) -->\n")
# The Hub's pipeline tag for each kind of output head (core/config.py HEADS): a scalar
# head scores a text, which the Hub files under text classification (reward models do).
PIPELINE_TAGS = {"lm": "text-generation", "scalar": "text-classification"}
# base_model_relation values the Hub defines, for the stages that are one of them.
BASE_MODEL_RELATIONS = {"alignment": "finetune", "quantization": "quantized"}
METRIC_LABELS = {"loss": "loss (next-token cross-entropy, nats)", "perplexity": "perplexity"}
# A Hugging Face hub cache snapshot: .../models--{org}--{name}/snapshots/{revision}
HUB_CACHE = re.compile(r"models--(?P<id>[^/]+)/snapshots/[^/]+/?$")
GENERIC_FOLDERS = re.compile(r"^(model|latest|step_\d+)$")  # names that say nothing of the model
# What Markdown or HTML would read as structure, as character references: a value from a lineage, a
# config or an evaluation file is data, which may not open a tag, close a code span or split a table cell.
MD_REFERENCES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "`": "&#96;", "|": "&#124;"})


def md(value: Any) -> str:
    """`value` as text for one line of a Markdown document: its lines joined by spaces (no value starts
    a heading or a block of its own), and & < > ` | as character references (inside a code span they show
    as written, and do no harm). Plain values read as they did: md(0.001) == "0.001"."""
    return " ".join(str(value).splitlines()).translate(MD_REFERENCES)


# ----- evaluations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """One evaluation result: a task on a dataset, with metric values (one model-index result)."""

    task: str  # a Hub task id: "text-generation"
    dataset: str  # a dataset id or name
    metrics: dict[str, float]  # {metric type: value}: {"perplexity": 12.3}
    split: str | None = None
    revision: str | None = None  # a hash that pins the data
    source: str = ""  # where the figures come from


EVALUATION_KEYS = ("task", "dataset", "metrics", "split", "revision", "source")


def lineage_evaluations(stage: Stage) -> list[Evaluation]:
    """The validation loss a training stage recorded, and its perplexity (exp of the mean cross-entropy)."""
    loss, data = stage.val_loss, training_data(stage)
    if loss is None or data is None:
        return []
    t = lookup(stage.lineage, ("recipe", "train")) or {}
    seq_len = lookup(stage.lineage, ("recipe", "data", "seq_len"))
    how = (f"{LINEAGE_FILE} metrics.val_loss at step {stage.lineage.get('step')}: the first "
           f"{t.get('eval_batches')} batches of {t.get('batch_size')} windows of {seq_len} tokens of the "
           "validation split")
    return [Evaluation(PIPELINE_TAGS["lm"], data.name, {"loss": loss, "perplexity": math.exp(loss)}, "validation",
                       data.revision, how)]


def read_evaluations(path: str | os.PathLike[str]) -> list[Evaluation]:
    """Evaluation results from a JSON file: {"results": [...]} or a list, each result

        {"task": "text-generation", "dataset": "stdlib", "split": "validation",
         "revision": "<sha256>", "metrics": {"perplexity": 12.3}, "source": "heron eval ..."}

    (task, dataset and metrics required). Errors name the file and the field.
    """
    file = Path(path)
    raw = load_json(file)
    results = raw.get("results") if isinstance(raw, dict) else raw
    if not isinstance(results, list) or not results:
        raise ValueError(f"{file}: expected a non-empty list of results (or {{\"results\": [...]}})")
    return [_evaluation(result, f"{file}, result {i}", file) for i, result in enumerate(results)]


def _evaluation(raw: Any, where: str, file: Path) -> Evaluation:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object")
    unknown = sorted(set(raw) - set(EVALUATION_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(EVALUATION_KEYS)})")
    for key in ("task", "dataset", "metrics"):
        if not raw.get(key):
            raise ValueError(f"{where}: '{key}' is missing")
    metrics = raw["metrics"]
    if not isinstance(metrics, dict) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                and math.isfinite(v) for v in metrics.values()):
        raise ValueError(f"{where}: 'metrics' must map metric names to finite numbers")
    return Evaluation(str(raw["task"]), str(raw["dataset"]), {str(k): float(v) for k, v in metrics.items()},
                      raw.get("split"), raw.get("revision"), str(raw.get("source") or file))


# ----- metadata (the YAML front matter) ---------------------------------------------------------


def model_name(stage: Stage) -> str:
    """The recipe's name, else the folder's (or its parent's, for step_N, latest and model)."""
    recipe_name = lookup(stage.lineage, ("recipe", "name")) or lookup(stage.lineage, ("alignment", "recipe", "name"))
    if recipe_name:
        return slug(str(recipe_name))
    folder = stage.path.resolve()
    while GENERIC_FOLDERS.match(folder.name) or folder.name == "checkpoints":
        folder = folder.parent
    return slug(folder.name)


def hub_id(recorded: str) -> str:
    """A Hub model id when `recorded` is a snapshot in the Hugging Face cache, else the path as recorded."""
    found = HUB_CACHE.search(recorded.replace(os.sep, "/"))
    return found["id"].replace("--", "/") if found else recorded


def tags(stage: Stage) -> list[str]:
    """Heron, then what this stage did to the model, then its architecture's notable parts."""
    kind, lineage = stage.kind.name, stage.lineage
    found = ["heron"]
    if kind == "alignment":
        method = lookup(lineage, ("alignment", "method"))
        found += ["reward-model"] if method == "rm" else [str(method)]
    elif kind == "quantization":
        found += ["quantized", *[str(lookup(lineage, ("quantization", k))) for k in ("scheme", "method")]]
    elif kind in ("pruning", "distillation"):
        found.append({"pruning": "pruned", "distillation": "distillation"}[kind])
    if "moe" in (stage.config.get("feed_forward") or []):
        found.append("moe")
    return [t for t in dict.fromkeys(found) if t and t != "None"]


def co2_eq_emissions(stage: Stage) -> dict[str, Any] | None:
    """The Hub's co2_eq_emissions for the stage that made this checkpoint, from its energy record."""
    energy = stage.energy
    if energy is None:
        return None
    how = provenance(energy["source"], bool(energy.get("measured")))
    return {
        "emissions": energy["co2e_grams"],
        "source": f"Heron energy meter (heron.govern.energy), {how}; "
                  f"{energy['grid_g_per_kwh']:g} gCO2e/kWh",
        "training_type": stage.kind.training_type,
        "geographical_location": PROVIDER,
        "hardware_used": hardware(stage),
    }


def hardware(stage: Stage) -> str:
    """What the energy record says ran the stage: CPU packages and NVIDIA GPUs (energy.py's source names)."""
    source = (stage.energy or {}).get("source", "")
    parts = ["CPU, energy metered by RAPL" if "rapl:" in source else "CPU, energy estimated from CPU time"]
    gpus = re.search(r"nvml:GPU ([\d,]+)", source)
    if gpus:
        parts.append(f"{len(gpus[1].split(','))} NVIDIA GPU(s) metered by NVML")
    processes = stage.lineage.get("world_size")
    parallel = md(stage.lineage.get("parallel", "none"))
    prefix = f"{md(processes)} process(es) ({parallel} parallelism): " if processes else ""
    return prefix + "; ".join(parts)


def card_metadata(history: History, evaluations: Sequence[Evaluation], *, license: str | None = None,
                  name: str | None = None) -> dict[str, Any]:
    """The YAML front matter: only what the history and the evaluations say, in the Hub's field names."""
    stage = history.model
    meta: dict[str, Any] = {"license": license or "other"}
    if license is None:
        meta["license_name"] = "to-be-completed-by-the-provider"
    meta["tags"] = tags(stage)
    datasets = [d.name for d in data_facts(history)]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    if evaluations:
        meta["metrics"] = list(dict.fromkeys(m for e in evaluations for m in e.metrics))
    if stage.parent is not None:
        meta["base_model"] = hub_id(stage.parent)
        if stage.kind.name in BASE_MODEL_RELATIONS:
            meta["base_model_relation"] = BASE_MODEL_RELATIONS[stage.kind.name]
    if stage.config.get("head", "lm") in PIPELINE_TAGS:
        meta["pipeline_tag"] = PIPELINE_TAGS[stage.config.get("head", "lm")]
    emissions = co2_eq_emissions(stage)
    if emissions is not None:
        meta["co2_eq_emissions"] = emissions
    if evaluations:
        meta["model-index"] = [{"name": name or model_name(stage), "results": [_result(e) for e in evaluations]}]
    return meta


def metric_name(evaluation: Evaluation, metric: str) -> str | None:
    """A pretty name for a metric Heron knows, on a named split: "Validation perplexity"."""
    if metric not in METRIC_LABELS or not evaluation.split:
        return None
    return f"{evaluation.split.capitalize()} {METRIC_LABELS[metric]}"


# Characters a front matter value may not hold as they are, and their escapes, valid in YAML's double quotes.
YAML_ESCAPES = {"<": "\\x3C", ">": "\\x3E", "&": "\\x26", "`": "\\x60"}


class _FrontMatterDumper(yaml.SafeDumper):
    """SafeDumper, writing a string that holds a line break or one of YAML_ESCAPES in double quotes."""


def _front_matter_string(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    quoted = text.splitlines() != [text] or any(c in text for c in YAML_ESCAPES)
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"' if quoted else None)


_FrontMatterDumper.add_representer(str, _front_matter_string)


def front_matter(meta: dict[str, Any]) -> str:
    """`meta` as YAML that reads back as it is, one line to a value: to a renderer that shows front matter
    as text, no value (a lineage's, an evaluation file's) starts a line, a tag or a code span."""
    text = yaml.dump(meta, Dumper=_FrontMatterDumper, sort_keys=False, allow_unicode=True, width=2**30)
    for char, escape in YAML_ESCAPES.items():  # each one inside double quotes, where the dumper put it
        text = text.replace(char, escape)
    return text


def _result(evaluation: Evaluation) -> dict[str, Any]:
    dataset: dict[str, Any] = {"type": slug(evaluation.dataset), "name": evaluation.dataset}
    dataset.update({k: v for k, v in (("split", evaluation.split), ("revision", evaluation.revision)) if v})
    metrics = []
    for metric, value in evaluation.metrics.items():
        name = metric_name(evaluation, metric)
        metrics.append({"type": metric, "value": value, **({"name": name} if name else {})})
    return {"task": {"type": evaluation.task}, "dataset": dataset, "metrics": metrics}


def data_facts(history: History) -> list[DataFacts]:
    """Every data set the history records: the token stream it was trained on, then alignment data, oldest first."""
    found: list[DataFacts] = []
    for stage in reversed(history.stages):
        facts = training_data(stage) if stage.kind.name in ("pretrain", "distillation") else alignment_data(stage)
        if facts is not None and facts not in found:  # SFT then DPO on one task: one data set
            found.append(facts)
    return found


# ----- the body ---------------------------------------------------------------------------------


def describe_stage(stage: Stage) -> str:
    """One sentence of what made this checkpoint, from its lineage."""
    return _DESCRIBE.get(stage.kind.name, _describe_saved)(stage)


def _describe_training(stage: Stage) -> str:
    r, lineage = stage.lineage.get("recipe", {}), stage.lineage
    o, s, t = r.get("optim", {}), r.get("schedule", {}), r.get("train", {})
    text = (f"training of randomly initialised weights (recipe `{md(r.get('name'))}`): {md(lineage.get('step'))} "
            f"steps, {lineage.get('tokens_seen', 0):,} tokens, seed {md(lineage.get('seed'))}; AdamW lr "
            f"{md(o.get('lr'))}, betas {md(o.get('betas'))}, weight decay {md(o.get('weight_decay'))}; "
            f"{md(s.get('kind'))} schedule with {md(s.get('warmup_steps'))} warm-up steps; batch "
            f"{md(t.get('batch_size'))} x {md(r.get('data', {}).get('seq_len'))} tokens, precision "
            f"{md(t.get('precision'))}, {md(lineage.get('world_size', 1))} process(es)")
    d = lineage.get("distillation")
    if d:
        text += (f"; distilled from the teacher `{md(d.get('teacher'))}` (temperature {md(d.get('temperature'))}, "
                 f"alpha {md(d.get('alpha'))}, hidden-state weight {md(d.get('hidden_weight'))})")
    return text


def _describe_alignment(stage: Stage) -> str:
    a = stage.lineage["alignment"]
    recipe, fit = a.get("recipe", {}), lookup(a, ("recipe", "fit")) or {}
    text = (f"{md(str(a.get('method')).upper())} alignment of `{md(a.get('base'))}` (recipe "
            f"`{md(recipe.get('name'))}`): {md(fit.get('steps'))} steps of batch {md(fit.get('batch_size'))}, lr "
            f"{md(fit.get('lr'))}, seed {md(fit.get('seed'))}")
    if a.get("method") == "dpo" and recipe.get("preference"):
        p = recipe["preference"]
        text += f"; {md(p.get('loss'))} loss, beta {md(p.get('beta'))}, SFT weight {md(p.get('sft_weight'))}"
    return text


def _describe_quantization(stage: Stage) -> str:
    q, lineage = stage.lineage.get("quantization", {}), stage.lineage
    settings = ", ".join(f"{md(k)} {md(v)}" for k, v in q.items() if k != "format")
    return f"weight quantization of `{md(lineage.get('quantized_from'))}`: {settings}"


def _describe_pruning(stage: Stage) -> str:
    p = stage.lineage.get("pruning", {})
    settings = ", ".join(f"{md(k)} {md(v)}" for k, v in (p.get("settings") or {}).items() if v is not None)
    return (f"pruning of `{md(stage.lineage.get('pruned_from'))}` ({settings}): {md(p.get('parameters_before'))} -> "
            f"{md(p.get('parameters_after'))} parameters, block-linear sparsity {md(p.get('block_linear_sparsity'))}")


def _describe_import(stage: Stage) -> str:
    s = stage.lineage["source"]
    return (f"conversion of the Hugging Face `{md(s.get('model_type'))}` folder `{md(s.get('path'))}` (family "
            f"`{md(s.get('family'))}`); the sha256 of every file read is recorded")


def _describe_saved(stage: Stage) -> str:
    return "a model folder saved by code: its lineage records software versions and file hashes only"


_DESCRIBE: dict[str, Callable[[Stage], str]] = {
    "pretrain": _describe_training, "distillation": _describe_training, "alignment": _describe_alignment,
    "quantization": _describe_quantization, "pruning": _describe_pruning, "import": _describe_import,
}


def architecture(config: dict[str, Any]) -> str:
    """The config.json in one line: a decoder-only (causal) Transformer, as core/ builds every model."""
    c = {key: md(value) for key, value in config.items()}  # config.json's values, safe to write
    head = "language-model head" if config.get("head", "lm") == "lm" else f"{c.get('head')} head"
    kinds = [md(a.get("kind", "dense")) for a in config.get("attention") or []] or ["dense"]
    ffn = [md(kind) for kind in config.get("feed_forward") or ["dense"]]
    kv_heads = c.get("n_kv_heads") if config.get("n_kv_heads") else c.get("n_heads")
    text = (f"decoder-only Transformer with a {head}: {c.get('n_layers')} layer(s), d_model "
            f"{c.get('d_model')}, {c.get('n_heads')} attention heads ({kv_heads} key/value), vocabulary "
            f"{c.get('vocab_size')}, context {c.get('max_seq_len')} tokens; "
            f"{c.get('norm')}, {c.get('positions')} positions, {c.get('mlp')} MLP; attention "
            f"{', '.join(sorted(set(kinds)))}; feed-forward {', '.join(sorted(set(ffn)))}")
    return text + ("; tied input and output embeddings" if config.get("tie_embeddings") else "")


def lineage_lines(history: History) -> list[str]:
    """The history as a numbered list, oldest first: where each checkpoint is and what made it."""
    lines = []
    if history.unreadable is not None:
        lines.append(f"0. `{md(history.unreadable)}`: not readable now ({md(history.why_unreadable)}); "
                     "its own history is not included")
    if (origin := history.hugging_face) is not None:
        lines.append(f"0. `{md(origin.path)}`: a Hugging Face `{md(origin.model_type)}` folder, third-party "
                     f"weights used as they are; their history is outside Heron")
    for i, stage in enumerate(reversed(history.stages), start=1):
        version = md(stage.model_sha256 or "not recorded")
        lines.append(f"{i}. `{md(stage.path)}` ({stage.kind.name}, weights sha256 `{version}`): "
                     f"{describe_stage(stage)}")
    return lines


def energy_rows(history: History) -> tuple[list[str], float]:
    """A Markdown table of every stage's energy record, oldest first, and the total grams of CO2e."""
    rows = ["| stage | folder | energy (J) | kWh | time (s) | tokens | J/token | g CO2e | grid g/kWh | source |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for stage in reversed(history.stages):
        e = stage.energy
        if e is None:
            rows.append(f"| {stage.kind.name} | `{md(stage.path)}` | not recorded | | | | | | | |")
            continue
        total += e["co2e_grams"]
        per_token = "" if e.get("joules_per_token") is None else f"{e['joules_per_token']:.4g}"
        rows.append(f"| {stage.kind.name} | `{md(stage.path)}` | {e['joules']:.4g} | "
                    f"{e['joules'] / JOULES_PER_KWH:.3g} | {e['seconds']:.1f} | {md(e.get('tokens') or '')} | "
                    f"{per_token} | {e['co2e_grams']:.4g} | {e['grid_g_per_kwh']:g} | "
                    f"{md(provenance(e['source'], bool(e.get('measured'))))} |")
    return rows, total


def data_table(facts: DataFacts) -> list[str]:
    lines = [f"**{md(facts.name)}**", "", "| field | value |", "|---|---|"]
    lines += [f"| {md(k)} | `{md(v)}` |" for k, v in facts.rows]
    return lines + ([""] + [f"- {md(note)}" for note in facts.notes] if facts.notes else [])


def evaluation_table(evaluations: Sequence[Evaluation]) -> list[str]:
    lines = ["| task | dataset | split | metric | value | source |", "|---|---|---|---|---|---|"]
    for e in evaluations:
        lines += [f"| {md(e.task)} | {md(e.dataset)} | {md(e.split or '')} | {md(metric_name(e, k) or k)} | {v:.6g} "
                  f"| {md(e.source)} |" for k, v in e.metrics.items()]
    return lines


def _written_at(stage: Stage) -> str:
    seconds = (stage.path / LINEAGE_FILE).stat().st_mtime
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def software(stage: Stage) -> str:
    """The versions the lineage records: heron, torch, python."""
    return ", ".join(f"{k.removesuffix('_version')} {md(stage.lineage[k])}"
                     for k in ("heron_version", "torch_version", "python_version") if k in stage.lineage)


def _model_details(history: History, license: str | None) -> list[str]:
    stage = history.model
    return ["## Model details", "",
            f"- **Developed by:** {PROVIDER}",
            f"- **Model date:** {_written_at(stage)} (when its {LINEAGE_FILE} was written)",
            f"- **Model version:** sha256 of model.safetensors `{md(stage.model_sha256 or 'not recorded')}`",
            f"- **Model type:** {architecture(stage.config)}",
            f"- **Software:** {software(stage)}",
            f"- **License:** {md(license or PROVIDER)}",
            f"- **Paper or other resource, citation details:** {PROVIDER}",
            f"- **Where to send questions or comments:** {PROVIDER}",
            "- **Fairness constraints:** none are applied by Heron's training, alignment or compression; "
            f"others applied: {PROVIDER}",
            "", "### How it was made (from lineage.json, oldest first)", "", *lineage_lines(history), ""]


def _intended_use() -> list[str]:
    return ["## Intended use", "",
            f"- **Primary intended uses:** {PROVIDER}",
            f"- **Primary intended users:** {PROVIDER}",
            f"- **Out-of-scope use cases:** {PROVIDER}", ""]


def _factors() -> list[str]:
    return ["## Factors", "",
            f"- **Relevant factors** (groups, instrumentation, environments): {PROVIDER}",
            "- **Evaluation factors:** no disaggregated evaluation is recorded; every result below is over a whole "
            f"evaluation set. Factors to evaluate: {PROVIDER}", ""]


def _metrics(evaluations: Sequence[Evaluation]) -> list[str]:
    lines = ["## Metrics", ""]
    kinds = list(dict.fromkeys(k for e in evaluations for k in e.metrics))
    if not kinds:
        return lines + [f"No evaluation results are recorded. Metrics and why they were chosen: {PROVIDER}", ""]
    for kind in kinds:
        why = {"loss": "the mean next-token cross-entropy in nats, the quantity training minimises",
               "perplexity": "exp(loss): the effective number of equally likely next tokens"}.get(kind, PROVIDER)
        lines.append(f"- **{md(kind)}:** {why}")
    return lines + ["- **Decision thresholds:** none are applied by Heron; those of the deployed system: "
                    f"{PROVIDER}",
                    "- **Variation approaches:** each result is one evaluation run; no confidence intervals are "
                    "recorded", ""]


def _evaluation_data(evaluations: Sequence[Evaluation]) -> list[str]:
    lines = ["## Evaluation data", ""]
    for e in evaluations:
        pinned = f", pinned by `{md(e.revision)}`" if e.revision else ""
        lines.append(f"- **{md(e.dataset)}** ({md(e.split or 'split not given')}{pinned}); figures from: "
                     f"{md(e.source)}")
    if not evaluations:
        lines.append("No evaluation data are recorded.")
    return lines + ["", f"- **Motivation** for the evaluation data: {PROVIDER}", ""]


def unknown_origin(history: History) -> str | None:
    """What the history starts from when Heron did not make it, in prose; None when it starts from scratch."""
    oldest = history.stages[-1]
    if oldest.kind.name == "import":
        return f"the Hugging Face weights `{md(lookup(oldest.lineage, ('source', 'path')))}`"
    if history.hugging_face is not None:
        return f"the Hugging Face weights `{md(history.hugging_face.path)}`"
    if history.unreadable is not None:
        return f"`{md(history.unreadable)}`, which could not be read"
    if oldest.kind.name == "saved":
        return f"`{md(oldest.path)}`, saved by code with no record of how it was made"
    return None


def _training_data(history: History) -> list[str]:
    lines = ["## Training data", ""]
    found, origin = data_facts(history), unknown_origin(history)
    for facts in found:
        lines += [*data_table(facts), ""]
    if origin is not None:
        lines.append(f"- The history starts from {origin}; its training data: {PROVIDER}")
    elif not found:
        lines.append(f"No training data are recorded in the lineage: {PROVIDER}")
    return lines + [""]


def _quantitative(history: History, evaluations: Sequence[Evaluation]) -> list[str]:
    lines = ["## Quantitative analyses", "", "### Unitary results", ""]
    lines += evaluation_table(evaluations) if evaluations else [
        "This checkpoint's own performance is not recorded: evaluate it (`heron eval`) and pass the results "
        "with `heron card --eval FILE`."]
    older = next((s for s in history.stages[1:] if s.val_loss is not None), None)
    if older is not None and history.model.val_loss is None:
        lines += ["", f"The {older.kind.name} checkpoint it was made from (`{md(older.path)}`) recorded validation "
                      f"loss {older.val_loss:.6g}; that figure is not this checkpoint's."]
    final = lookup(history.model.lineage, ("alignment", "final"))
    train_loss = lookup(history.model.lineage, ("metrics", "train_loss"))
    if final or train_loss is not None:
        metrics = md(final or {"train_loss": train_loss})
        lines += ["", f"Training metrics at the last step (not an evaluation): `{metrics}`"]
    return lines + ["", f"### Intersectional results\n\n{PROVIDER}", ""]


def _ethics(history: History) -> list[str]:
    synthetic = all(any("contains no personal data" in n for n in f.notes) for f in data_facts(history))
    data = ("Every data set in the recorded history was generated in code and contains no personal data."
            if synthetic and data_facts(history) and unknown_origin(history) is None else
            f"Whether the training data contain personal or sensitive data: {PROVIDER}")
    return ["## Ethical considerations", "", f"- **Data:** {data}",
            f"- **Human life, mitigations, risks and harms, use cases:** {PROVIDER}", ""]


def _caveats(history: History) -> list[str]:
    lines = ["## Caveats and recommendations", ""]
    if any(s.energy is not None and not s.energy.get("measured") for s in history.stages):
        lines.append("- Some energy figures are estimates (CPU time x a stated power per core), not measurements.")
    origin = unknown_origin(history)
    if origin is not None:
        lines.append(f"- The history starts from {origin}: what made that is not described here.")
    if history.model.kind.name in ("quantization", "pruning"):
        lines.append("- Compression changes the model's outputs: evaluate this checkpoint itself before use.")
    return lines + [f"- {PROVIDER}", ""]


def _environment(history: History) -> list[str]:
    rows, total = energy_rows(history)
    grids = {s.energy["grid_g_per_kwh"] for s in history.stages if s.energy is not None}
    lines = ["## Environmental impact", "", *rows, "",
             f"- **Total recorded:** {total:.4g} g CO2e over the stages above",
             f"- **Hardware:** {hardware(history.model) if history.model.energy else PROVIDER}",
             f"- **Geographical location and grid:** {PROVIDER}"]
    if DEFAULT_GRID_G_PER_KWH in grids:
        lines.append(f"- {DEFAULT_GRID_G_PER_KWH:g} g/kWh is Heron's default, the 2018 world average (IEA); set "
                     "HERON_GRID_G_PER_KWH to the local grid's intensity for a truer figure.")
    origin = unknown_origin(history)
    if origin is not None:
        lines.append(f"- The energy of making {origin}: {PROVIDER}")
    return lines + [""]


def model_card(folder: str | os.PathLike[str], *, evaluations: Sequence[Evaluation] = (),
               license: str | None = None, name: str | None = None,
               resolve: Callable[[Path], Path] = Path) -> str:
    """The README.md text for the checkpoint in `folder`: YAML front matter, then the Markdown sections.

    `evaluations` add to the validation figures the lineage records; `license`
    is a Hub license id (default: "other", named for the provider to fill).
    """
    history = read_history(folder, resolve=resolve)
    evaluations = [*lineage_evaluations(history.model), *evaluations]
    meta = card_metadata(history, evaluations, license=license, name=name)
    front = front_matter(meta)
    title = name or model_name(history.model)
    body = [f"# Model card for {md(title)}", "",
            "Written by `heron card` from the checkpoint's lineage; every "
            f"\"{PROVIDER}\" is for the provider to fill.", "",
            *_model_details(history, license), *_intended_use(), *_factors(), *_metrics(evaluations),
            *_evaluation_data(evaluations), *_training_data(history), *_quantitative(history, evaluations),
            *_ethics(history), *_caveats(history), *_environment(history)]
    return f"---\n{front}---\n\n" + "\n".join(body).rstrip() + "\n"


def write_document(folder: str | os.PathLike[str], path: str | os.PathLike[str], text: str, event: str,
                   *, replace_edited: bool = False) -> Path:
    """Write a document about the checkpoint `folder` to `path` (atomically) and record
    the write as `event` in the audit log.

    The file ends with a mark holding the hash of the text above it, so a later
    write can tell a document nobody touched (replaced) from one the provider
    has been filling in, or a file that is no document of Heron's: those are
    replaced only with `replace_edited`, and a checkpoint's own files never.

    A document written into the folder changes the folder's hash, which is how
    the audit lineage finds the record that made a checkpoint. The event
    therefore reads the folder as it was and writes it as it is now: the
    lineage follows such in-place rewrites back to the record that made the
    weights (govern/audit_lineage.py), and an unrecorded edit still breaks the chain."""
    folder, path = Path(folder), Path(path)
    inside = folder.resolve() in path.resolve().parents
    _check_replaceable(path, inside=inside, replace_edited=replace_edited)
    log = audit_log()  # opened before writing: a log that cannot take the record stops the write
    before = Artifact("folder", folder_sha256(folder), str(folder.resolve()))
    text = text if text.endswith("\n") else text + "\n"  # the mark on a line of its own
    write_text_atomic(path, text + WRITTEN_MARK.format(digest=_text_sha256(text)))
    if log is not None:
        log.append(event, inputs={"checkpoint": before},
                   outputs={"document": path, "checkpoint": folder if inside else None})
    return path


def _check_replaceable(path: Path, *, inside: bool, replace_edited: bool) -> None:
    if not path.exists() or path.is_dir():  # a folder: the writer names it
        return
    if inside and path.suffix.lower() != ".md":
        raise FileExistsError(f"{path}: is one of the checkpoint's own files; write the document to a .md file")
    if not replace_edited and not is_untouched_document(path.read_text(encoding="utf-8", errors="replace")):
        raise FileExistsError(f"{path}: exists and is not as heron card wrote it (edited since, or another file); "
                              "write elsewhere with --out, or replace it with --force")


def is_untouched_document(text: str) -> bool:
    """Whether `text` is a document `write_document` wrote, unchanged since: its last line is
    the mark, holding the hash of everything above it."""
    body, _, last = text.removesuffix("\n").rpartition("\n")
    found = WRITTEN_MARK_PATTERN.fullmatch(last + "\n")
    return found is not None and found["digest"] == _text_sha256(body + "\n")


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_model_card(folder: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                     *, replace_edited: bool = False, **options: Any) -> Path:
    """Write `model_card(folder, **options)` to `out` (default: README.md in the checkpoint folder);
    `replace_edited` as in `write_document`."""
    text = model_card(folder, **options)
    return write_document(folder, Path(folder) / README_FILE if out is None else Path(out), text, "card.model_card",
                          replace_edited=replace_edited)


__all__ = ["PROVIDER", "Evaluation", "WRITTEN_MARK", "architecture", "card_metadata", "co2_eq_emissions", "data_facts",
           "data_table", "describe_stage", "energy_rows", "evaluation_table", "hub_id", "is_untouched_document",
           "lineage_evaluations", "lineage_lines", "md", "metric_name", "model_card", "model_name", "read_evaluations",
           "software", "unknown_origin", "write_document", "write_model_card"]
