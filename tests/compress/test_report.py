"""The efficiency report: sizes, perplexity, speed and energy for each variant; the Pareto front."""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch

import heron
from heron.cli.main import main

from heron.compress.report import VariantRow, checkpoint_bytes, derives_from, measure, pareto_front, write_report
from heron.core import ModelConfig, Transformer
from heron.data import load_shards
from heron.generate import perplexity
from heron.govern.energy import provenance
from heron.train.checkpoint import save_model_folder

torch.set_num_threads(1)


def test_pareto_front_by_brute_force():
    points = [(1.0, 5.0), (2.0, 4.0), (3.0, 4.5), (0.5, 9.0), (2.0, 4.0), (4.0, 3.0)]
    # (3.0, 4.5) is beaten by (2.0, 4.0); the two equal points beat neither one another.
    assert pareto_front(points) == [True, True, False, True, True, True]


def test_report_rows_match_direct_measurements(tmp_path):
    torch.manual_seed(0)
    folders = []
    for name, d_model in (("wide", 64), ("narrow", 32)):
        model = Transformer(ModelConfig(vocab_size=128, d_model=d_model, n_layers=2, n_heads=2, max_seq_len=128))
        folders.append(save_model_folder(tmp_path / name, model))
    val = np.random.default_rng(0).integers(0, 128, size=2000).astype(np.uint16)
    with pytest.warns(UserWarning, match="narrow: its lineage .* does not lead back"):
        rows = measure(folders, val, seq_len=32, batch_size=4, max_batches=2, new_tokens=8, rounds=2)
    assert [r.name for r in rows] == ["wide", "narrow"]
    assert rows[0].size_ratio == 1.0 and rows[1].size_ratio == checkpoint_bytes(folders[1]) / checkpoint_bytes(folders[0])
    assert 0.2 < rows[1].size_ratio < 0.5  # about a quarter of the weights, plus the same small files
    (folders[0] / "trainer_state.pt").write_bytes(b"x" * 10_000)  # optimizer state: not part of the model
    assert checkpoint_bytes(folders[0]) == rows[0].size_bytes
    narrow, _ = heron.load(folders[1])
    assert rows[1].perplexity == perplexity(narrow, val, seq_len=32, batch_size=4, max_batches=2)
    assert all(r.decode_tokens_per_s > 0 and r.joules_per_token > 0 and r.energy_source for r in rows)
    md = write_report(rows, tmp_path / "report")
    table = md.read_text()
    assert "| narrow |" in table and f"| {provenance(rows[1].energy_source, rows[1].energy_measured)} |" in table
    assert json.loads((tmp_path / "report" / "report.json").read_text())[1]["name"] == "narrow"
    assert (tmp_path / "report" / "pareto.png").stat().st_size > 0


def test_the_cli_writes_the_report(tmp_path, capsys, code_model):
    model, tokenizer, shards = code_model(d_model=32, max_seq_len=128)
    first = save_model_folder(tmp_path / "a" / "model", model, tokenizer=tokenizer)
    second = save_model_folder(tmp_path / "b" / "model", model, tokenizer=tokenizer,
                               lineage={"pruned_from": str(first.resolve())})
    scratch = save_model_folder(tmp_path / "c" / "model", model, tokenizer=tokenizer)  # no lineage: a baseline
    args = ["compress", "report", str(first), str(second), "--baseline", str(scratch), "--shards", str(shards),
            "--out", str(tmp_path / "report"), "--seq-len", "16", "--max-batches", "1", "--new-tokens", "4"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second is the first's variant, the third a declared baseline
        assert main(args) == 0
    out, err = capsys.readouterr()
    assert "| variant | size (MB)" in out and f"| {second} |" in out and f"| {scratch} |" in out  # whole paths
    assert "warning" not in err
    assert (tmp_path / "report" / "pareto.png").is_file()


def test_a_short_context_model_is_scored_and_decoded_within_it(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=2, max_seq_len=24))
    folder = save_model_folder(tmp_path / "short", model)
    val = np.random.default_rng(0).integers(0, 128, size=500).astype(np.uint16)
    row, = measure([folder], val, seq_len=128, batch_size=4, max_batches=2, new_tokens=64, rounds=1)
    assert row.perplexity == perplexity(model.eval(), val, seq_len=24, batch_size=4, max_batches=2)
    assert row.decode_tokens_per_s > 0


def test_shards_without_validation_tokens_are_named_before_any_model_is_loaded(tmp_path):
    """perplexity's error named its own argument (`tokens: need at least 2 tokens ...`), once a model had loaded."""
    shards = tmp_path / "shards"
    shards.mkdir()
    np.arange(100, dtype="<u2").tofile(shards / "train_000000.bin")
    train = {"tokens": 100, "shards": [{"file": "train_000000.bin", "tokens": 100}]}
    (shards / "meta.json").write_text(json.dumps({"format": 1, "dtype": "uint16", "train": train,
                                                  "val": {"tokens": 0, "shards": []}}))
    with pytest.raises(ValueError, match=re.escape(f"{shards}: the validation split holds 0 tokens; nothing to score")):
        measure([tmp_path / "no-model"], load_shards(shards))

def test_a_run_folder_counts_the_checkpoint_it_loads_not_the_whole_run(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=2, max_seq_len=64))
    run = tmp_path / "run"
    for step in (1, 2):
        save_model_folder(run / "checkpoints" / f"step_{step:08d}", model)
    (run / "loss.png").write_bytes(b"x" * 50_000)
    val = np.random.default_rng(0).integers(0, 128, size=500).astype(np.uint16)
    whole, step = measure([run, run / "checkpoints" / "step_00000002"], val, names=["run", "step"], seq_len=16,
                          batch_size=2, max_batches=1, new_tokens=2, rounds=1)
    assert whole.size_bytes == step.size_bytes == checkpoint_bytes(run / "checkpoints" / "step_00000002")
    assert step.size_ratio == 1.0


def test_a_variant_nested_in_the_reference_is_not_counted_in_its_size(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=2, max_seq_len=64))
    reference = save_model_folder(tmp_path / "reference", model)
    alone = checkpoint_bytes(reference)
    save_model_folder(reference / "variant", model)  # written before require_new_folder refused it
    assert checkpoint_bytes(reference) == alone


def test_variants_are_traced_back_through_their_lineage(tmp_path):
    """A warning only for a variant whose quantized_from / pruned_from / distillation teacher
    chain does not reach the reference: here a variant of a variant passes, a stranger does not."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=2, max_seq_len=64))
    reference = save_model_folder(tmp_path / "reference", model)
    pruned = save_model_folder(tmp_path / "pruned", model, lineage={"pruned_from": str(reference)})
    quantised = save_model_folder(tmp_path / "quantised", model, lineage={"quantized_from": str(pruned)})
    student = save_model_folder(tmp_path / "student", model, lineage={"distillation": {"teacher": str(quantised)}})
    stranger = save_model_folder(tmp_path / "stranger", model, lineage={"pruned_from": str(tmp_path / "gone")})
    assert all(derives_from(v, reference) for v in (reference, pruned, quantised, student))
    assert not derives_from(stranger, reference) and not derives_from(reference, pruned)
    val = np.random.default_rng(0).integers(0, 128, size=500).astype(np.uint16)
    with pytest.warns(UserWarning) as caught:
        measure([reference, student, stranger], val, seq_len=16, batch_size=2, max_batches=1, new_tokens=2, rounds=1)
    assert [str(w.message).split(":")[0] for w in caught] == [str(stranger)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a declared baseline is measured without the lineage warning
        rows = measure([reference, stranger], val, seq_len=16, batch_size=2, max_batches=1, new_tokens=2, rounds=1,
                       baselines=[stranger])
    assert [row.name for row in rows] == ["reference", "stranger"]
    with pytest.raises(ValueError, match="baselines: .*gone not among the folders measured"):
        measure([reference], val, baselines=[tmp_path / "gone"])


def test_an_import_is_followed_both_ways(tmp_path):
    """A variant made straight from a Hugging Face folder is a variant of the checkpoint imported from it
    (an import is exact), and a variant of that import derives from the folder."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=2, max_seq_len=64))
    hf = save_model_folder(tmp_path / "hf", model)  # stands in for the Hugging Face folder: resolvable, no history
    imported = save_model_folder(tmp_path / "imported", model,
                                 lineage={"source": {"kind": "huggingface", "path": str(hf)}})
    from_hf = save_model_folder(tmp_path / "from-hf", model, lineage={"quantized_from": str(hf)})
    from_import = save_model_folder(tmp_path / "from-import", model, lineage={"pruned_from": str(imported)})
    assert derives_from(imported, hf) and derives_from(from_import, hf) and derives_from(from_hf, imported)
    assert derives_from(hf, imported)  # the same weights
    assert not derives_from(imported, from_hf) and not derives_from(hf, from_import)


ROW = VariantRow("tiny", "tiny", 1000, 1.0, 12.5, 100.0, 0.5, "estimate", False)


def test_a_report_replaces_only_an_earlier_report(tmp_path):
    write_report([ROW], tmp_path / "report")
    assert write_report([ROW], tmp_path / "report").is_file()  # an earlier report's files are replaced
    model = save_model_folder(tmp_path / "model", Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1,
                                                                          n_heads=2, max_seq_len=16)))
    notes, other = tmp_path / "notes", tmp_path / "other"
    notes.mkdir()
    (notes / "report.md").write_text("my notes\n")  # a report's name, but no report wrote it
    other.mkdir()
    (other / "report.json").write_text("[]")
    (other / "data.csv").write_text("a,b\n")
    for folder, complaint in ((model, f"{model}: holds a model (lineage.json); write the report to a folder of its own"),
                              (notes, f"{notes}: holds report.md, but not an earlier report's report.json"),
                              (other, f"{other}: holds data.csv, not a report's files")):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        with pytest.raises(FileExistsError, match=re.escape(complaint)):
            write_report([ROW], folder)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_report_written_before_a_field_was_added_or_dropped_is_still_replaced(tmp_path):
    """report.json rows need the core fields only: the demo reruns into the same report folder."""
    out = tmp_path / "report"
    write_report([ROW], out)
    rows = json.loads((out / "report.json").read_text())
    older = [{k: v for k, v in row.items() if k != "energy_measured"} | {"retired_field": 1} for row in rows]
    (out / "report.json").write_text(json.dumps(older))
    assert write_report([ROW], out).is_file()
    (out / "report.json").write_text(json.dumps([{"name": "mine"}]))  # not a report's rows
    with pytest.raises(FileExistsError, match="not an earlier report's report.json"):
        write_report([ROW], out)


def test_the_cli_checks_the_report_folder_before_measuring(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.md").write_text("my notes\n")
    args = ["compress", "report", str(tmp_path / "no-model"), "--shards", str(tmp_path / "no-shards"),
            "--out", str(notes)]
    assert main(args) == 2  # the folder is named, not the missing shards that measuring would read first
    assert capsys.readouterr().err.startswith(f"heron compress: error: {notes}: holds report.md")
    assert (notes / "report.md").read_text() == "my notes\n"
