"""Fixtures for the whole suite."""
from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

import pytest

from heron.govern.audit import LOG_ENV


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
