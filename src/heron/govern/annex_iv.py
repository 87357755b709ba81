"""EU AI Act Annex IV technical documentation for a checkpoint, filled from its history.

    text = annex_iv("runs/demo/align/dpo/model", audit_log="runs/audit.db")
    write_annex_iv("runs/demo/align/dpo/model")          # <folder>/ANNEX_IV.md, written atomically

Annex IV of Regulation (EU) 2024/1689 (the AI Act, OJ L 12.7.2024,
http://data.europa.eu/eli/reg/2024/1689/oj) lists what the technical
documentation of Article 11(1) holds for a high-risk AI system, in nine
points. Every point is written here, in the Annex's order, with its title
paraphrased from the Annex and its lettered items where it has them. What the
lineage can say (the development steps, data and their hashes, the recipe,
steps, metrics, compute and energy, the chain of base models, software
versions, file hashes) is filled in; the rest is marked PROVIDER. A model is
one component of an AI system: whatever concerns the system around it (its
purpose, users, interface, risk management, conformity) is the provider's.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from heron.govern.card import (
    PROVIDER, Evaluation, architecture, data_facts, data_table, energy_rows, evaluation_table, hub_id,
    lineage_evaluations, lineage_lines, md, model_name, software, write_document,
)
from heron.govern.digest import LINEAGE_FILE, TOKENIZER_FILE
from heron.govern.history import History, Stage, lookup, read_history

ANNEX_IV_FILE = "ANNEX_IV.md"
METRICS_LOG = "metrics.jsonl"  # the per-step log train/report.py and align/run.py write in a run folder

# What each kind of stage optimises (Annex IV 2(b)); alignment methods by name.
OBJECTIVES = {
    "pretrain": "next-token cross-entropy on the training stream (train/loop.py)",
    "distillation": "KL divergence to the teacher's temperature-softened next-token distribution, mixed with "
                    "next-token cross-entropy by alpha (Hinton et al., 2015), plus a hidden-state term when "
                    "hidden_weight > 0 (compress/distill.py)",
    "quantization": "weights rounded to low-bit codes: rtn to the nearest code, gptq and awq choosing codes "
                    "(and scales) that keep the layers' outputs on calibration data (compress/quantize.py)",
    "pruning": "weights removed by the method's saliency score, optionally followed by masked recovery "
               "fine-tuning (compress/prune_checkpoint.py)",
    "import": "none: weights converted as they are (interop/convert.py)",
}
ALIGNMENT_OBJECTIVES = {
    "sft": "supervised fine-tuning: mean negative log-likelihood of the assistant replies",
    "rm": "reward modelling: Bradley-Terry loss on chosen and rejected replies",
    "dpo": "preference optimisation with a DPO-family loss on chosen and rejected replies",
    "ppo": "reinforcement learning with PPO against the recipe's reward, with a KL penalty to the reference",
    "grpo": "reinforcement learning with GRPO (group-relative advantages) against the recipe's reward",
}


def objective(stage: Stage) -> str:
    if stage.kind.name == "alignment":
        method = str(lookup(stage.lineage, ("alignment", "method")))
        return ALIGNMENT_OBJECTIVES.get(method, f"alignment method {md(repr(method))}")
    return OBJECTIVES.get(stage.kind.name, f"not recorded in the lineage: {PROVIDER}")


def _heading(number: str, title: str) -> list[str]:
    return [f"## {number}. {title}", ""]


def _item(letter: str, title: str, *lines: str) -> list[str]:
    return [f"### ({letter}) {title}", "", *lines, ""]


def _files(stage: Stage) -> list[str]:
    rows = ["| file | bytes | sha256 |", "|---|---|---|"]
    for name, record in sorted((stage.lineage.get("files") or {}).items()):
        rows.append(f"| {md(name)} | {md(record.get('bytes'))} | `{md(record.get('sha256'))}` |")
    return rows


def _section_1(history: History, name: str) -> list[str]:
    stage = history.model
    output = "next-token scores" if stage.config.get("head", "lm") == "lm" else "one score per sequence"
    return [
        *_heading("1", "A general description of the AI system"),
        *_item("a", "Its intended purpose, the name of the provider and the version of the system, reflecting its "
               "relation to previous versions",
               f"- Intended purpose: {PROVIDER}", f"- Provider: {PROVIDER}",
               f"- Model `{md(name)}`, version: sha256 of its weights `{md(stage.model_sha256 or 'not recorded')}`",
               "- Relation to previous versions (the checkpoints it was made from, oldest first):", "",
               *lineage_lines(history)),
        *_item("b", "How the system interacts with hardware or software, including other AI systems, that are not "
               "part of it", "- The model reads token ids made by its tokenizer (tokenizer.json in the checkpoint "
               f"folder, when present) and returns {output}. Other interactions: {PROVIDER}"),
        *_item("c", "The versions of relevant software or firmware, and any requirements related to version updates",
               f"- Software that made this checkpoint: {software(stage)}",
               f"- Version-update requirements: {PROVIDER}"),
        *_item("d", "All the forms in which the system is placed on the market or put into service (software "
               "packages, downloads, APIs, ...)", f"- {PROVIDER}", "",
               f"The model as Heron wrote it: the folder `{md(stage.path)}`, whose files the lineage hashes:", "",
               *_files(stage)),
        *_item("e", "The hardware on which the system is intended to run",
               f"- {PROVIDER} (the hardware used in development is in 2(c))"),
        *_item("f", "Where the system is a component of products: photographs or illustrations of their external "
               "features, marking and internal layout", f"- {PROVIDER}"),
        *_item("g", "A basic description of the user interface provided to the deployer", f"- {PROVIDER}"),
        *_item("h", "Instructions for use for the deployer (Article 13)", f"- {PROVIDER}"),
    ]


def _third_parties(history: History) -> list[str]:
    imported = history.imported
    if imported is None:
        return ["- Pre-trained systems from third parties: none in the recorded history."]
    source = imported.lineage["source"]
    files = "; ".join(f"{md(k)} `{md(v)}`" for k, v in sorted((source.get("files") or {}).items()))
    return [f"- Pre-trained weights from a third party: `{md(hub_id(str(source.get('path'))))}` (Hugging Face "
            f"`{md(source.get('model_type'))}`), converted by Heron; sha256 of the files read: {files}",
            f"- Their licence, provenance and training: {PROVIDER}"]


def _section_2(history: History, evaluations: Sequence[Evaluation]) -> list[str]:
    stage = history.model
    rows, total = energy_rows(history)
    objectives = [f"  - {s.kind.name} (`{md(s.path)}`): {objective(s)}" for s in reversed(history.stages)]
    data = [line for facts in data_facts(history) for line in (*data_table(facts), "")]
    return [
        *_heading("2", "A detailed description of the elements of the AI system and of the process for its "
                  "development"),
        *_item("a", "The methods and steps performed for the development, including recourse to pre-trained "
               "systems or tools provided by third parties and how they were used, integrated or modified",
               "Development steps, from the lineage (oldest first):", "", *lineage_lines(history), "",
               *_third_parties(history), "- Tools: Heron and PyTorch (versions in 1(c))."),
        *_item("b", "The design specifications: the general logic of the system and its algorithms; key design "
               "choices with their rationale and assumptions, including about the persons or groups on whom it is "
               "to be used; main classification choices; what it is designed to optimise for and the relevance of "
               "its parameters; expected output and output quality; trade-offs made to comply with Chapter III, "
               "Section 2",
               f"- Model: {architecture(stage.config)}", "- What each step optimised:", *objectives,
               f"- Rationale, assumptions, persons or groups concerned, expected output quality and trade-offs: "
               f"{PROVIDER}"),
        *_item("c", "The system architecture (how software components build on or feed into each other and "
               "integrate into the overall processing), and the computational resources used to develop, train, "
               "test and validate it",
               f"- Architecture of the system around the model: {PROVIDER}",
               "- Computational resources, per step (Heron's energy meter):", "", *rows, "",
               f"- Total recorded: {total:.4g} g CO2e"),
        *_item("d", "Data requirements: datasheets describing the training methodologies and techniques and the "
               "training data sets, their provenance, scope and main characteristics, how the data were obtained "
               "and selected, labelling procedures and data cleaning methodologies",
               *(data or ["No data sets are recorded in the lineage."]),
               f"- Provenance, scope, how obtained and selected, labelling and cleaning: {PROVIDER}"),
        *_item("e", "Assessment of the human oversight measures needed under Article 14, including the technical "
               "measures that help deployers interpret the outputs (Article 13(3)(d))",
               "- Heron can write an interpretability report for a prompt (`heron explain`); whether and how it "
               f"serves oversight: {PROVIDER}", f"- Assessment of the oversight measures: {PROVIDER}"),
        *_item("f", "Where applicable, pre-determined changes to the system and its performance, and the technical "
               "solutions that keep it compliant with Chapter III, Section 2", f"- {PROVIDER}"),
        *_item("g", "The validation and testing procedures: the validation and testing data and their main "
               "characteristics; metrics for accuracy, robustness and the other requirements of Chapter III, "
               "Section 2, and for potentially discriminatory impacts; test logs and test reports, dated and "
               "signed by the responsible persons", *_validation(history, evaluations)),
        *_item("h", "Cybersecurity measures put in place",
               f"- Every file of the checkpoint is listed with its size and sha256 in {LINEAGE_FILE} (table in "
               "1(d)); Heron verifies them when it loads the model, so a changed or truncated file is refused.",
               f"- Other measures: {PROVIDER}"),
    ]


def _validation(history: History, evaluations: Sequence[Evaluation]) -> list[str]:
    lines = evaluation_table(evaluations) if evaluations else [
        "- No evaluation of this checkpoint is recorded (`heron eval`, then `heron card --eval FILE`)."]
    logs = [f"- Per-step training log: `{md(log)}`" for log in _metric_logs(history)]
    return [*lines, "", *logs, f"- Robustness and discriminatory-impact metrics: {PROVIDER}",
            f"- Dated and signed test reports: {PROVIDER}"]


def _metric_logs(history: History) -> list[Path]:
    """The metrics.jsonl files of the runs that made the history, where they still exist."""
    found = []
    for stage in reversed(history.stages):
        out_dir = lookup(stage.lineage, ("recipe", "out_dir")) or lookup(stage.lineage, ("alignment", "recipe",
                                                                                         "out_dir"))
        if out_dir and (Path(out_dir) / METRICS_LOG).is_file():
            found.append(Path(out_dir) / METRICS_LOG)
    return found


def _section_3(history: History, evaluations: Sequence[Evaluation]) -> list[str]:
    config = history.model.config
    measured = "; ".join(f"{md(k)} {v:.6g} on {md(e.dataset)} ({md(e.split or 'split not given')})"
                         for e in evaluations for k, v in e.metrics.items()) or "none recorded"
    tokenizer = lookup(history.model.lineage, ("files", TOKENIZER_FILE, "sha256"))
    return [
        *_heading("3", "Detailed information about the monitoring, functioning and control of the AI system"),
        f"- Capabilities and limitations in performance: measured: {measured}. The degrees of accuracy for "
        f"specific persons or groups, and the overall expected level for the intended purpose: {PROVIDER}",
        f"- Foreseeable unintended outcomes and sources of risks to health and safety, fundamental rights and "
        f"discrimination: {PROVIDER}",
        f"- Human oversight measures (Article 14), including technical measures to interpret outputs: {PROVIDER}",
        f"- Specifications on input data: token ids below {md(config.get('vocab_size'))}, at most "
        f"{md(config.get('max_seq_len'))} tokens a sequence" + (f", made by the tokenizer with sha256 `{md(tokenizer)}`"
                                                             if tokenizer else "") + f"; other input specifications: "
        f"{PROVIDER}", ""]


def _sections_4_to_9(history: History, audit_log: str | None) -> list[str]:
    audit = f"- Audit log of events: `{md(audit_log)}`" if audit_log else f"- Where the event logs are kept: {PROVIDER}"
    return [
        *_heading("4", "A description of the appropriateness of the performance metrics for the specific AI system"),
        f"- {PROVIDER} (the metrics recorded are described in 2(g))", "",
        *_heading("5", "A detailed description of the risk management system in accordance with Article 9"),
        f"- {PROVIDER}", "",
        *_heading("6", "A description of relevant changes made by the provider to the system through its "
                  "lifecycle"),
        "Changes recorded by Heron, oldest first (each checkpoint's lineage.json):", "",
        *lineage_lines(history), "", audit, f"- Changes to the system around the model: {PROVIDER}", "",
        *_heading("7", "A list of the harmonised standards applied in full or in part, whose references are "
                  "published in the Official Journal of the European Union; where none are applied, a detailed "
                  "description of the solutions adopted to meet the requirements of Chapter III, Section 2, "
                  "including other relevant standards and technical specifications applied"),
        f"- {PROVIDER}", "",
        *_heading("8", "A copy of the EU declaration of conformity referred to in Article 47"),
        f"- {PROVIDER}", "",
        *_heading("9", "A detailed description of the system in place to evaluate the AI system's performance in "
                  "the post-market phase in accordance with Article 72, including the post-market monitoring plan "
                  "referred to in Article 72(3)"),
        f"- {PROVIDER}", audit if audit_log else "", "",
    ]


def annex_iv(folder: str | os.PathLike[str], *, evaluations: Sequence[Evaluation] = (),
             audit_log: str | None = None, name: str | None = None,
             resolve: Callable[[Path], Path] = Path) -> str:
    """The Annex IV document (Markdown) for the checkpoint in `folder`."""
    history = read_history(folder, resolve=resolve)
    evaluations = [*lineage_evaluations(history.model), *evaluations]
    name = name or model_name(history.model)
    lines: list[Any] = [
        f"# Technical documentation for {md(name)} (EU AI Act, Annex IV)", "",
        "Drawn up after Annex IV, \"Technical documentation referred to in Article 11(1)\", of Regulation (EU) "
        "2024/1689 (the Artificial Intelligence Act; http://data.europa.eu/eli/reg/2024/1689/oj). The section "
        "titles paraphrase the Annex. Written by `heron card --annex-iv` from the model's lineage; every "
        f"\"{PROVIDER}\" is for the provider to fill.", "",
        *_section_1(history, name), *_section_2(history, evaluations), *_section_3(history, evaluations),
        *_sections_4_to_9(history, audit_log)]
    return "\n".join(lines).rstrip() + "\n"


def write_annex_iv(folder: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                   *, replace_edited: bool = False, **options: Any) -> Path:
    """Write `annex_iv(folder, **options)` to `out` (default: ANNEX_IV.md in the checkpoint folder);
    `replace_edited` as in `write_document`."""
    text = annex_iv(folder, **options)
    return write_document(folder, Path(folder) / ANNEX_IV_FILE if out is None else Path(out), text, "card.annex_iv",
                          replace_edited=replace_edited)


__all__ = ["ANNEX_IV_FILE", "annex_iv", "objective", "write_annex_iv"]
