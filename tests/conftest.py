"""Shared fixtures. Service helpers live in tests/services.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import Orthanc, require_service

os.environ.setdefault("OMP_NUM_THREADS", "2")

# (database, job id, reason) of jobs in PostgreSQL databases, read before each is dropped
_POSTGRES_JOB_REASONS: list[tuple[str, int, str]] = []
# Figures a test reports (the header-mutation counts): shown at the end of every run, -q or not
RUN_NOTES: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RUN_NOTES:
        terminalreporter.section("figures")
        for note in RUN_NOTES:
            terminalreporter.write_line(note)


def _sqlite_job_reasons(base: Path) -> list[tuple[str, int, str]]:
    """Every job reason in every SQLite job database under the run's temporary folder."""
    import sqlite3

    found = []
    for path in sorted(base.rglob("*.sqlite")):
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as conn:
                columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
                if "error" not in columns:
                    continue
                found += [(str(path), int(i), str(e)) for i, e in
                          conn.execute("SELECT id, error FROM jobs WHERE error IS NOT NULL")]
        except sqlite3.Error:
            continue  # not a database (or not ours)
    return found


@pytest.fixture(scope="session", autouse=True)
def no_exception_text_in_job_reasons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fails the run if any job the suite created records a Python exception name or a traceback."""
    yield
    from node.reasons import exception_text_in

    reasons = _sqlite_job_reasons(tmp_path_factory.getbasetemp()) + _POSTGRES_JOB_REASONS
    bad = [(where, job_id, text) for where, job_id, text in reasons if exception_text_in(text)]
    RUN_NOTES.append(f"job reasons checked suite-wide: {len(reasons)} reason(s), {len(bad)} with exception text")
    if bad:
        lines = "\n".join(f"  {where} job {job_id}: {text[:200]}" for where, job_id, text in bad[:20])
        pytest.fail(f"{len(bad)} job reason(s) hold a Python exception name or traceback:\n{lines}", pytrace=False)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        yield pacs
    finally:
        pacs.stop()


def _reachable(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def redis_url() -> Iterator[str]:
    require_service(_reachable("127.0.0.1", 6379), "Redis at 127.0.0.1:6379")
    import redis

    # Parallel test runs on one machine each take their own database number.
    db = int(os.environ.get("PTX_TEST_REDIS_DB", "9"))
    client = redis.Redis(host="127.0.0.1", port=6379, db=db)
    client.flushdb()
    yield f"redis://127.0.0.1:6379/{db}"
    client.flushdb()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    require_service(_reachable("127.0.0.1", 5432), "PostgreSQL at 127.0.0.1:5432")
    import psycopg

    name = f"ptx_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    yield url
    from node.db import dispose_engines

    dispose_engines()
    with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={name}", autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('public.jobs')").fetchone()[0]
        if exists:
            _POSTGRES_JOB_REASONS.extend(
                (name, int(i), str(e)) for i, e in conn.execute("SELECT id, error FROM jobs WHERE error IS NOT NULL"))
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
