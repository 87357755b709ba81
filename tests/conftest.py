"""Fixtures for the whole suite."""
from __future__ import annotations

import os

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
