"""Fixtures for the whole suite."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from heron.core import ModelConfig, Transformer
from heron.data import Corpus, prepare_shards
from heron.govern.audit import LOG_ENV
from heron.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="session", autouse=True)
def audit_log_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Normal work records to the audit log ($HERON_AUDIT_LOG, else runs/audit.db in the
    working directory): point it at one temporary file for the session, so the suite
    never writes runs/audit.db. Worker subprocesses inherit the variable."""
    before = os.environ.get(LOG_ENV)
    os.environ[LOG_ENV] = str(tmp_path_factory.mktemp("audit") / "audit.db")
    yield os.environ[LOG_ENV]
    if before is None:
        os.environ.pop(LOG_ENV, None)
    else:
        os.environ[LOG_ENV] = before


@pytest.fixture
def killed_before_the_record(monkeypatch: pytest.MonkeyPatch) -> Callable[[ModuleType, Callable[[], object]], dict]:
    """killed_before_the_record(module, run): run `run` with `module.record_event` raising
    KeyboardInterrupt (a kill after the folder, before its audit record); return what that
    append was given (its keyword fields, and `event`)."""
    def run_killed(module: ModuleType, run: Callable[[], object]) -> dict:
        attempted: dict = {}

        def killed(event, **fields):
            attempted.update(fields, event=event)
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(module, "record_event", killed)
            with pytest.raises(KeyboardInterrupt):
                run()
        return attempted

    return run_killed


@pytest.fixture
def code_model(tmp_path: Path) -> Callable[..., tuple[Transformer, Tokenizer, Path]]:
    """code_model(d_model=16, max_seq_len=32): (a seeded, untrained one-layer model, the
    300-token BPE tokenizer it reads, the folder of token shards, half of them validation)
    of a generated Python corpus, all under tmp_path: what a command that takes a
    checkpoint and shards needs."""
    def make(d_model: int = 16, max_seq_len: int = 32) -> tuple[Transformer, Tokenizer, Path]:
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        for i in range(20):
            (corpus / f"m{i}.py").write_text(f"def f{i}(a):\n    return a + {i}\n" * 20)
        tokenizer = train_tokenizer([p.read_text() for p in corpus.iterdir()], vocab_size=300, progress=False)
        shards = prepare_shards(Corpus([corpus]), tokenizer, tmp_path / "shards", val_fraction=0.5, progress=False)
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=d_model, n_layers=1, n_heads=2,
                             max_seq_len=max_seq_len)
        return Transformer(config), tokenizer, shards.path

    return make
