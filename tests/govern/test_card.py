"""Model cards and Annex IV documents from real lineage (a tiny model trained and quantised here)
and from folders shaped like the other writers' (alignment, Hugging Face import): every figure
is checked against the lineage it came from, every unknown against the provider's marker."""
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from heron.govern.annex_iv import ANNEX_IV_FILE, annex_iv, write_annex_iv
from heron.govern.audit import LOG_ENV
from heron.govern.card import (PROVIDER, README_FILE, is_untouched_document, md, model_card, read_evaluations,
                               write_model_card)
from heron.govern.history import read_history

torch.set_num_threads(1)  # see tests/train/conftest.py

RECIPE = {
    "name": "cardtest",
    "model": {"preset": "test", "overrides": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
                                              "max_seq_len": 32}},
    "data": {"synthetic": {"vocab_size": 32, "n_tokens": 2048, "seed": 0}, "seq_len": 16},
    "optim": {"lr": 1e-2},
    "schedule": {"warmup_steps": 1},
    "train": {"steps": 2, "batch_size": 8, "eval_every": 2, "eval_batches": 2, "ckpt_every": 2, "progress": False},
}
HF_SNAPSHOT = "/cache/huggingface/hub/models--acme--tiny-lm/snapshots/0123abcd"


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def lineage(folder: Path) -> dict:
    return json.loads((folder / "lineage.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkpoint of a tiny model trained for two steps on synthetic data."""
    from heron.train import train
    from heron.train.recipe import recipe_from_dict

    out = tmp_path_factory.mktemp("run")
    return train(recipe_from_dict({**RECIPE, "out_dir": str(out)})).checkpoint


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory) -> Path:
    from heron.compress.quantize import QuantizeSettings
    from heron.compress.quantize_checkpoint import QuantizeCheckpointSettings, quantize_checkpoint

    target = tmp_path_factory.mktemp("q") / "int8"
    quantize_checkpoint(trained, target, QuantizeCheckpointSettings(QuantizeSettings()), progress=False)
    return target


def fake_checkpoint(folder: Path, record: dict, config: dict | None = None) -> Path:
    """A folder shaped like save_model_folder's: only the JSON a card reads."""
    folder.mkdir(parents=True)
    base = {"format": 1, "heron_version": "0.1.0", "torch_version": "2.13.0", "python_version": "3.11.7",
            "files": {"model.safetensors": {"bytes": 10, "sha256": "ab" * 32}}}
    (folder / "lineage.json").write_text(json.dumps({**base, **record}))
    (folder / "config.json").write_text(json.dumps(config or {"vocab_size": 32, "d_model": 32, "n_layers": 2,
                                                              "n_heads": 2, "max_seq_len": 32, "head": "lm"}))
    return folder


@pytest.fixture
def aligned(trained, tmp_path) -> Path:
    """Shaped like align/run.py's lineage: DPO on the synthetic task, from the trained checkpoint."""
    energy = {"joules": 90.0, "seconds": 3.0, "source": "rapl:/sys/class/powercap/intel-rapl:0 (package-0)",
              "measured": True, "tokens": None, "joules_per_token": None, "grid_g_per_kwh": 300.0,
              "co2e_grams": 90.0 / 3.6e6 * 300.0, "unavailable": []}
    recipe = {"name": "task-dpo", "out_dir": str(tmp_path / "dpo"), "base": str(trained),
              "data": {"task": {"kind": "repeat", "n": 64, "seed": 0, "target": 3, "max_count": 5}, "file": None,
                       "max_len": 64},
              "fit": {"steps": 5, "batch_size": 4, "lr": 1e-4, "seed": 0},
              "preference": {"loss": "dpo", "beta": 0.1, "sft_weight": 1.0}}
    return fake_checkpoint(tmp_path / "dpo" / "model", {"alignment": {
        "method": "dpo", "base": str(trained), "recipe": recipe, "final": {"step": 5, "loss": 0.4},
        "energy": energy}})


@pytest.fixture
def imported(tmp_path) -> Path:
    """Shaped like interop/convert.py's lineage: converted from a Hugging Face cache snapshot."""
    return fake_checkpoint(tmp_path / "imported", {"source": {
        "kind": "huggingface", "path": HF_SNAPSHOT, "model_type": "llama", "family": "llama",
        "files": {"config.json": "cd" * 32, "model.safetensors": "ef" * 32}}})


# ----- the YAML front matter ------------------------------------------------------------------------------


def test_front_matter_is_valid_hugging_face_metadata(trained):
    hub = pytest.importorskip("huggingface_hub")
    text = model_card(trained)
    meta = front_matter(text)
    card = hub.ModelCard(text)  # parses the metadata, model-index included; raises on an invalid one
    assert isinstance(card.data, hub.ModelCardData)
    hub.ModelCardData(**meta)
    assert card.data.model_name == "cardtest"
    assert {(r.task_type, r.dataset_type, r.metric_type) for r in card.data.eval_results} == {
        ("text-generation", "synthetic-permutation", "loss"), ("text-generation", "synthetic-permutation",
                                                                "perplexity")}
    assert meta["license"] == "other" and meta["pipeline_tag"] == "text-generation"
    assert all(isinstance(t, str) for t in meta["tags"]) and "heron" in meta["tags"]
    assert set(meta["co2_eq_emissions"]) == {"emissions", "source", "training_type", "geographical_location",
                                             "hardware_used"}
    assert isinstance(meta["co2_eq_emissions"]["emissions"], float)
    assert meta["metrics"] == ["loss", "perplexity"]


def test_values_come_from_the_lineage(trained):
    meta, record = front_matter(model_card(trained)), lineage(trained)
    assert meta["co2_eq_emissions"]["emissions"] == record["energy"]["co2e_grams"]
    assert meta["co2_eq_emissions"]["training_type"] == "pre-training"
    assert record["energy"]["source"] in meta["co2_eq_emissions"]["source"]
    assert "estimated: estimate" not in meta["co2_eq_emissions"]["source"]  # an estimate is said once
    assert meta["datasets"] == ["synthetic-permutation"]
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"] == {"type": "synthetic-permutation", "name": "synthetic-permutation",
                                 "split": "validation", "revision": record["data"]["sha256"]}
    values = {m["type"]: m["value"] for m in result["metrics"]}
    assert values == {"loss": record["metrics"]["val_loss"], "perplexity": math.exp(record["metrics"]["val_loss"])}
    assert "base_model" not in meta  # trained from random weights: no base


def test_derived_checkpoint_names_its_base_and_not_its_bases_metrics(trained, quantized):
    text = model_card(quantized)
    meta, record = front_matter(text), lineage(quantized)
    assert meta["base_model"] == record["quantized_from"] == str(trained)
    assert meta["base_model_relation"] == "quantized"
    assert meta["co2_eq_emissions"]["emissions"] == record["energy"]["co2e_grams"]
    assert meta["co2_eq_emissions"]["training_type"] == "post-training quantization"
    assert "model-index" not in meta and "metrics" not in meta  # its own performance was never measured
    assert "that figure is not this checkpoint's" in text
    assert meta["datasets"] == ["synthetic-permutation"]  # its base's training data, through the history
    assert {"quantized", "int8"} <= set(meta["tags"])


def test_alignment_history_is_followed_to_the_training_data(aligned, trained):
    text = model_card(aligned)
    meta = front_matter(text)
    assert meta["base_model"] == lineage(aligned)["alignment"]["base"] == str(trained)
    assert meta["base_model_relation"] == "finetune" and "dpo" in meta["tags"]
    assert meta["datasets"] == ["synthetic-permutation", "synthetic-repeat-task"]
    assert meta["co2_eq_emissions"]["emissions"] == pytest.approx(90.0 / 3.6e6 * 300.0)
    assert meta["co2_eq_emissions"]["hardware_used"] == "CPU, energy metered by RAPL"
    history = read_history(aligned)
    assert [s.kind.name for s in history.stages] == ["alignment", "pretrain"] and history.unreadable is None
    total = lineage(aligned)["alignment"]["energy"]["co2e_grams"] + lineage(trained)["energy"]["co2e_grams"]
    assert f"**Total recorded:** {total:.4g} g CO2e" in text


def test_imported_checkpoint_names_the_hub_model_and_marks_what_heron_cannot_know(imported):
    text = model_card(imported)
    meta = front_matter(text)
    assert meta["base_model"] == "acme/tiny-lm"  # the cache snapshot's model id
    assert "co2_eq_emissions" not in meta and "datasets" not in meta  # no energy, no data recorded: none invented
    origin = f"the Hugging Face weights `{HF_SNAPSHOT}`"
    assert f"The history starts from {origin}; its training data: {PROVIDER}" in text
    assert f"The energy of making {origin}: {PROVIDER}" in text
    history = read_history(imported)  # the import's lineage describes its source: nothing more to follow
    assert [s.kind.name for s in history.stages] == ["import"] and history.unreadable is None


def test_a_moved_base_ends_the_history_and_is_said_to(tmp_path):
    gone = str(tmp_path / "deleted" / "step_00000100")
    folder = fake_checkpoint(tmp_path / "int4", {"quantized_from": gone, "quantization": {"scheme": "int4"}})
    text = model_card(folder)
    assert front_matter(text)["base_model"] == gone  # as recorded, though it is gone
    history = read_history(folder)
    assert history.unreadable == gone and "no such checkpoint folder" in history.why_unreadable
    assert f"0. `{gone}`: not readable now" in text
    assert f"The history starts from `{gone}`, which could not be read; its training data: {PROVIDER}" in text


def test_a_parent_recorded_by_a_name_that_moves_on_ends_the_history(tmp_path, monkeypatch):
    """Older Heron recorded a parent as typed: `run/checkpoints/latest`, or the run folder. Since the run
    went on, that name leads to a later checkpoint than the one quantised: the history stops there,
    saying why, rather than describe the later one as the parent. The step folder itself is followed."""
    from heron.train.checkpoint import resolve_checkpoint

    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (8, 12):
        fake_checkpoint(checkpoints / f"step_{step:08d}", {"recipe": {"name": "tiny"}, "step": step})
    (checkpoints / "latest").symlink_to("step_00000012")
    monkeypatch.chdir(tmp_path)
    later = f"(it now leads to {checkpoints / 'step_00000012'})"
    for recorded, says in (("run/checkpoints/latest", later), (str(checkpoints / "latest"), later),
                           (str(tmp_path / "run"), later), ("run/checkpoints/step_00000008", "")):
        folder = fake_checkpoint(tmp_path / "q" / str(len(says)) / recorded.replace("/", "-"),
                                 {"quantized_from": recorded})
        history = read_history(folder, resolve=resolve_checkpoint)
        assert [s.kind.name for s in history.stages] == ["quantization"] and history.unreadable == recorded
        assert f"recorded as {recorded}, a relative path, a link or a run folder{' ' + says if says else ','}" \
            in history.why_unreadable
    exact = fake_checkpoint(tmp_path / "q" / "exact", {"quantized_from": str(checkpoints / "step_00000008")})
    history = read_history(exact, resolve=resolve_checkpoint)
    assert history.unreadable is None and [s.lineage["step"] for s in history.stages[1:]] == [8]
    (tmp_path / "run").rename(tmp_path / "moved")  # the disk moved, a link left where it was: the same folder
    (tmp_path / "run").symlink_to(tmp_path / "moved")
    history = read_history(exact, resolve=resolve_checkpoint)
    assert history.unreadable is None and [s.lineage["step"] for s in history.stages[1:]] == [8]


def test_a_base_that_is_a_hugging_face_folder_is_an_origin_not_a_lost_checkpoint(tmp_path):
    """Quantising a Hugging Face folder directly (no import first) leaves a lineage whose
    parent has config.json and no lineage.json: third-party weights, not an unreadable stage."""
    hf = tmp_path / "hf-llama"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    folder = fake_checkpoint(tmp_path / "int8", {"quantized_from": str(hf), "quantization": {"scheme": "int8"}})
    history = read_history(folder)
    assert history.unreadable is None
    assert (history.hugging_face.path, history.hugging_face.model_type) == (str(hf), "llama")
    text = model_card(folder)
    assert f"0. `{hf}`: a Hugging Face `llama` folder, third-party weights" in text and "not readable" not in text
    assert f"The history starts from the Hugging Face weights `{hf}`; its training data: {PROVIDER}" in text


def test_distillation_names_its_teacher(trained, tmp_path):
    record = {k: v for k, v in lineage(trained).items() if k != "files"}
    record["distillation"] = {"teacher": str(trained), "temperature": 2.0, "alpha": 0.5, "hidden_weight": 0.0}
    student = fake_checkpoint(tmp_path / "student", record)
    meta = front_matter(model_card(student))
    assert meta["base_model"] == str(trained) and "base_model_relation" not in meta  # no Hub relation fits
    assert meta["co2_eq_emissions"]["training_type"] == "pre-training (knowledge distillation)"
    assert "distillation" in meta["tags"] and meta["model-index"][0]["results"][0]["metrics"][0]["value"] == (
        record["metrics"]["val_loss"])
    assert [s.kind.name for s in read_history(student).stages] == ["distillation", "pretrain"]


def test_unknowns_are_marked_for_the_provider(trained):
    text = model_card(trained)
    meta = front_matter(text)
    assert meta["license"] == "other" and meta["license_name"] == "to-be-completed-by-the-provider"
    assert meta["co2_eq_emissions"]["geographical_location"] == PROVIDER
    assert "language" not in meta and "library_name" not in meta
    for field in ("Developed by", "License", "Primary intended uses", "Primary intended users",
                  "Out-of-scope use cases", "Human life, mitigations, risks and harms, use cases"):
        assert f"**{field}:** {PROVIDER}" in text, field
    for heading in ("Model details", "Intended use", "Factors", "Metrics", "Evaluation data", "Training data",
                    "Quantitative analyses", "Ethical considerations", "Caveats and recommendations",
                    "Environmental impact"):
        assert f"\n## {heading}\n" in text, heading
    licensed = front_matter(model_card(trained, license="apache-2.0"))
    assert licensed["license"] == "apache-2.0" and "license_name" not in licensed


def test_evaluation_results_file_adds_model_index_results(trained, tmp_path):
    results = tmp_path / "eval.json"
    results.write_text(json.dumps({"results": [{"task": "text-generation", "dataset": "held-out-code",
                                                "split": "test", "metrics": {"perplexity": 17.5}}]}))
    meta = front_matter(model_card(trained, evaluations=read_evaluations(results)))
    added = meta["model-index"][0]["results"][-1]
    assert added["dataset"] == {"type": "held-out-code", "name": "held-out-code", "split": "test"}
    assert added["metrics"] == [{"type": "perplexity", "value": 17.5, "name": "Test perplexity"}]
    results.write_text(json.dumps([{"task": "text-generation", "dataset": "x", "metrics": {"ppl": 1},
                                    "splt": "test"}]))
    with pytest.raises(ValueError, match=r"eval.json, result 0: unknown key 'splt'"):
        read_evaluations(results)


def test_an_evaluation_results_file_that_is_not_utf8_is_named(tmp_path):
    """The decoder's own message named neither the file nor the flag's argument."""
    results = tmp_path / "eval.json"
    results.write_bytes(b'\xff\xfe[{"task": "t"}]')
    with pytest.raises(ValueError, match=re.escape(f"{results}: not UTF-8 text (invalid start byte at byte 0)")):
        read_evaluations(results)

# ----- Annex IV ---------------------------------------------------------------------------------------------


def test_annex_iv_has_every_section_in_order_filled_from_lineage(trained, tmp_path):
    text = annex_iv(trained, audit_log="runs/audit.db")
    record = lineage(trained)
    assert re.findall(r"^## (\d)\. ", text, flags=re.M) == [str(n) for n in range(1, 10)]
    sections = dict(zip(range(1, 10), re.split(r"^## \d\. ", text, flags=re.M)[1:]))
    assert re.findall(r"^### \((\w)\)", sections[1], flags=re.M) == list("abcdefgh")
    assert re.findall(r"^### \((\w)\)", sections[2], flags=re.M) == list("abcdefgh")
    assert record["data"]["sha256"] in sections[2]  # (d): the data and its hash
    assert f"{record['energy']['joules']:.4g}" in sections[2]  # (c): compute and energy
    assert f"{record['step']} steps, {record['tokens_seen']:,} tokens" in sections[2]  # (a): the recipe's run
    assert f"{record['metrics']['val_loss']:.6g}" in sections[2]  # (g): validation
    assert record["files"]["model.safetensors"]["sha256"] in sections[1]  # (a): the version
    assert record["torch_version"] in sections[1]  # (c): software versions
    assert "`runs/audit.db`" in sections[6] and "`runs/audit.db`" in sections[9]
    for n in (4, 5, 7, 8, 9):
        assert PROVIDER in sections[n], n
    assert "Regulation (EU) 2024/1689" in text


def test_annex_iv_follows_the_chain_of_base_models(aligned, trained):
    text = annex_iv(aligned)
    section_6 = text.split("## 6. ")[1].split("## 7. ")[0]
    assert section_6.index(f"`{trained}`") < section_6.index(f"`{aligned}`")  # oldest first
    assert "DPO alignment" in section_6 and "synthetic-repeat-task" in text
    assert f"Where the event logs are kept: {PROVIDER}" in section_6


def test_annex_iv_names_third_party_weights(imported):
    text = annex_iv(imported)
    assert "Pre-trained weights from a third party: `acme/tiny-lm`" in text and "ef" * 32 in text


# ----- values as data ---------------------------------------------------------------------------------------
# A lineage or an evaluation file may come with a downloaded checkpoint: its text is written as text, and opens
# no HTML tag, code span, table cell or heading of its own (to a renderer that reads front matter, or not).

FORGED = "x`\n\n<script>alert(1)</script><img src=x onerror=alert(2)>\n\n## Evaluation results\n\nperplexity 1.01 `|"


def forged_documents(tmp_path: Path) -> tuple[Path, list[str]]:
    folder = fake_checkpoint(tmp_path / "forged", {"source": {
        "kind": "huggingface", "path": FORGED, "model_type": f"llama{FORGED}", "family": FORGED,
        "files": {"config.json": FORGED}}})
    results = tmp_path / "eval.json"
    results.write_text(json.dumps([{"task": FORGED, "dataset": FORGED, "split": FORGED, "revision": FORGED,
                                    "metrics": {FORGED: 1.0}, "source": FORGED}]))
    evaluations = read_evaluations(results)
    return folder, [model_card(folder, evaluations=evaluations), annex_iv(folder, evaluations=evaluations)]


def test_lineage_and_evaluation_text_cannot_write_markup(tmp_path):
    folder, documents = forged_documents(tmp_path)
    for text in documents:
        assert "<script" not in text and "<img" not in text
        assert not [line for line in text.splitlines() if re.match(r" {0,3}#+ Evaluation results", line)]
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # shown, as text
    meta = front_matter(documents[0])  # the metadata keeps the value exactly
    assert meta["base_model"] == FORGED and meta["model-index"][0]["results"][0]["dataset"]["name"] == FORGED
    assert f"conversion of the Hugging Face `llama{md(FORGED)}` folder `{md(FORGED)}`" in documents[0]
    assert md(FORGED).count("`") == 0 and md(FORGED).count("|") == 0 and "\n" not in md(FORGED)


def test_plain_values_are_written_as_they_are():
    for value in ("/runs/tiny/checkpoints/step_00000002", "synthetic-permutation", "ab" * 32, "dpo", "Q and A"):
        assert md(value) == value
    assert (md(0.001), md([0.9, 0.95]), md(None), md(12)) == ("0.001", "[0.9, 0.95]", "None", "12")


# ----- writing ----------------------------------------------------------------------------------------------


def test_default_locations_are_inside_the_checkpoint(aligned):
    assert write_model_card(aligned) == aligned / README_FILE
    assert write_annex_iv(aligned) == aligned / ANNEX_IV_FILE
    assert (aligned / README_FILE).read_text().startswith("---\n")


def test_write_is_atomic(aligned, monkeypatch):
    target = write_model_card(aligned)
    old_card = target.read_text()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # the rename that would put the new card in place
    with pytest.raises(OSError, match="disk full"):
        write_model_card(aligned, license="mit")
    assert target.read_text() == old_card
    assert sorted(p.name for p in aligned.iterdir()) == ["README.md", "config.json", "lineage.json"]


def test_an_untouched_card_is_rewritten_an_edited_one_only_when_asked(aligned):
    target = write_model_card(aligned)
    assert is_untouched_document(target.read_text())
    assert "license: mit" in write_model_card(aligned, license="mit").read_text()  # untouched: replaced
    edited = target.read_text().replace(PROVIDER, "Heron's authors", 1)
    target.write_text(edited)
    assert not is_untouched_document(edited)
    with pytest.raises(FileExistsError, match="README.md: exists and is not as heron card wrote it"):
        write_model_card(aligned)
    assert target.read_text() == edited
    assert write_model_card(aligned, replace_edited=True).read_text() != edited


def test_a_checkpoint_file_is_never_replaced_by_a_document(aligned):
    config = (aligned / "config.json").read_text()
    for replace_edited in (False, True):
        with pytest.raises(FileExistsError, match="config.json: is one of the checkpoint's own files"):
            write_annex_iv(aligned, aligned / "config.json", replace_edited=replace_edited)
    assert (aligned / "config.json").read_text() == config


def test_a_log_that_cannot_take_the_record_stops_the_write(aligned, tmp_path, monkeypatch):
    monkeypatch.setenv(LOG_ENV, str(tmp_path))  # a folder: no SQLite database opens there
    with pytest.raises(ValueError, match="cannot open audit log"):
        write_model_card(aligned, tmp_path / "card.md")
    assert not (tmp_path / "card.md").exists()


def test_a_folder_without_lineage_or_config_is_named_in_the_error(tmp_path, imported):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'hf'}: not a Heron checkpoint: it has no "
                                                          "lineage.json (a Hugging Face folder")):
        model_card(tmp_path / "hf")
    (imported / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{imported}: not a Heron checkpoint: it has no config")):
        annex_iv(imported)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nowhere'}: no such checkpoint folder")):
        model_card(tmp_path / "nowhere")
