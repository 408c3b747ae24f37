"""Real peers for the tests: Orthanc as the PACS, the node as a subprocess, test data.

No mocks: Orthanc is the Debian package started on free ports with a generated
config; the node runs as `ptx-node serve` exactly as an admin would start it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.config import write_config_file
from node.demo.pacs import LocalOrthanc, free_port, wait_until
from node.proc import die_with_parent

REQUIRE_SERVICES = os.environ.get("PTX_REQUIRE_SERVICES", "") not in ("", "0", "false")


def require_service(available: bool, name: str, reason: str = "") -> None:
    """Skip when a service is missing; under PTX_REQUIRE_SERVICES=1 fail instead."""
    if available:
        return
    message = f"{name} is not available{': ' + reason if reason else ''}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (PTX_REQUIRE_SERVICES=1: missing services are failures)")
    pytest.skip(message)


def require_tool(tool: str) -> str:
    path = shutil.which(tool)
    require_service(path is not None, tool, "install it (see the README's test command)")
    assert path is not None
    return path





# --- Orthanc ---------------------------------------------------------------------------------------


class Orthanc(LocalOrthanc):
    """The product's local Orthanc runner; missing Orthanc skips (or fails in CI)."""

    def start(self) -> Orthanc:
        require_service(LocalOrthanc.available(), "Orthanc", "apt-get install orthanc orthanc-dicomweb")
        super().start()
        return self


# --- the node ---------------------------------------------------------------------------------------


class NodeProcess:
    """`ptx-node serve` as a subprocess with a generated config."""

    def __init__(self, workdir: Path, config: dict[str, Any], extra_args: list[str] | None = None) -> None:
        self.workdir = workdir
        self.config = config
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[str] | None = None
        self.config_path = write_config_file(workdir / "node.toml", config)
        self.output: list[str] = []

    @property
    def port(self) -> int:
        return int(self.config["scp"]["port"])

    @property
    def ae_title(self) -> str:
        return str(self.config["scp"].get("ae_title", "PTXNODE"))

    @property
    def database_url(self) -> str:
        return str(self.config["database_url"])

    def start(self, timeout: float = 120) -> NodeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PTX_NODE_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path = self.workdir / "node.log"
        self.log = open(self.log_path, "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config_path), *self.extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, text=True, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        wait_until(self._ready, timeout, what="ptx-node to be ready")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"ptx-node exited {self.proc.returncode}:\n{self.log_text()[-4000:]}")
        return "ptx-node ready" in self.log_text()

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    # jobs
    def session(self):
        from node.db import get_sessionmaker

        return get_sessionmaker(self.database_url)()

    def jobs(self) -> list[Any]:
        from sqlalchemy import select

        from node.db import Job

        with self.session() as session:
            return list(session.scalars(select(Job).order_by(Job.id)))

    def wait_for_terminal(self, count: int, timeout: float = 300) -> list[Any]:
        from node.db import TERMINAL_STATUSES

        def done() -> list[Any] | None:
            jobs = self.jobs()
            if len(jobs) >= count and all(j.status in TERMINAL_STATUSES for j in jobs):
                return jobs
            return None

        try:
            return wait_until(done, timeout, interval=0.5, what=f"{count} job(s) to finish")
        except AssertionError:
            summary = [(j.id, j.status, j.error) for j in self.jobs()]
            raise AssertionError(f"jobs did not finish: {summary}\n--- node log ---\n{self.log_text()[-6000:]}") from None


def base_node_config(workdir: Path, *, destinations: list[dict[str, Any]] | None = None,
                     database_url: str | None = None, broker_url: str | None = None,
                     checkpoint: Path | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    """A node config for tests: embedded default unless URLs are given, fast timings."""
    config: dict[str, Any] = {
        "spool_dir": str(workdir / "spool"),
        "database_url": database_url or f"sqlite:///{workdir / 'jobs.sqlite'}",
        "broker_url": broker_url or f"sqla+sqlite:///{workdir / 'broker.sqlite'}",
        "log_level": "INFO",
        "scp": {"ae_title": "PTXNODE", "bind_address": "127.0.0.1", "port": free_port()},
        "model": {"allow_untrained": checkpoint is None, "device": "cpu", "tta": True},
        "worker": {"embedded_workers": 1, "lease_s": 8.0, "heartbeat_s": 1.0, "requeue_after_s": 10.0,
                   "sweep_interval_s": 1.0, "max_attempts": 3},
        "delivery": {"max_attempts": 4, "backoff_initial_s": 1.0, "backoff_max_s": 4.0, "timeout_s": 10.0},
        "http": {"enabled": False},
    }
    if checkpoint is not None:
        config["model"]["checkpoint"] = str(checkpoint)
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    if destinations:
        config["destinations"] = destinations
    return config


# --- test data ----------------------------------------------------------------------------------------


def make_phantom(path: Path, seed: int = 1, size: int = 512, **attrs: object) -> Path:
    """A generated chest CR phantom (trainer.synth, reproducible by seed) written to ``path``."""
    import numpy as np

    from trainer.synth import make_phantom as phantom
    from trainer.synth import write_dicom

    image, _mask = phantom(np.random.default_rng(seed), size)
    return write_dicom(path, image, **attrs)


def pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    require_service(path is not None, f"pydicom test file {name}", "pip install pydicom-data")
    return Path(path)


def deid_file(relative: str) -> Path:
    import deid_data  # type: ignore[import-untyped]

    base = Path(deid_data.__file__).parent
    path = base / relative
    if not path.exists():
        matches = list(base.rglob(Path(relative).name))
        require_service(bool(matches), f"deid-data {relative}")
        path = matches[0]
    return path


@contextlib.contextmanager
def running(*things: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for thing in reversed(things):
            thing.stop()


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
