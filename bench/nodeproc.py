"""``ptx-node serve|worker --config FILE`` as a subprocess, for the benchmarks (bench/e2e.py, bench/load.py).

The node runs in its own session (so its own process group). Its embedded workers start
sessions of their own, so a signal to the node's group does not reach them: the SIGKILLs here
walk the process tree instead.

Imported as ``nodeproc``: the benchmark scripts run as ``python bench/SCRIPT.py``, which puts
bench/ first on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from node.config import write_config_file  # noqa: E402
from node.demo.pacs import wait_until  # noqa: E402

__all__ = ["NodeProcess", "kill_tree", "process_tree"]

READY = "ptx-node ready"


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (parents before children), found with ``pgrep -P``."""
    found, frontier = [pid], [pid]
    while frontier:
        out = subprocess.run(["pgrep", "-P", str(frontier.pop())], capture_output=True, text=True).stdout
        children = [int(p) for p in out.split()]
        found += children
        frontier += children
    return found


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to ``pid`` and every descendant; returns how many processes were signalled."""
    pids = process_tree(pid)
    for each in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, sig)
    return len(pids)


class NodeProcess:
    """``python -m node.cli COMMAND --config FILE`` in ``workdir``, output appended to a log there.

    ``name`` names the config and log files (``NAME.toml``, ``NAME.log``; default: the command).
    """

    #: seconds ``stop`` waits after SIGTERM before it SIGKILLs the process tree
    stop_timeout: float = 60.0
    #: characters of the node's log put in the error when it exits before it is ready (0: none)
    log_tail_on_error: int = 0

    def __init__(self, workdir: Path, config: dict[str, Any], command: str = "serve",
                 name: str | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.command = command
        name = name or command
        self.config_path = write_config_file(workdir / f"{name}.toml", config)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return int(self.config["scp"]["port"])

    @property
    def ae_title(self) -> str:
        return str(self.config["scp"]["ae_title"])

    @property
    def database_url(self) -> str:
        return str(self.config["database_url"])

    def env(self) -> dict[str, str]:
        """This environment without any ``PTX_NODE_*`` (the config file decides), unbuffered output."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PTX_NODE_")}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, wait: bool = True, timeout: float = 300.0, interval: float = 0.2) -> Self:
        """Start it; for ``serve`` (with ``wait``), return once its log says it is ready again."""
        args = [sys.executable, "-m", "node.cli", self.command, "--config", str(self.config_path)]
        mark = self.log_text().count(READY)  # a restart appends to the same log
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env(), cwd=REPO,
                                         start_new_session=True)
        if wait and self.command == "serve":
            wait_until(lambda: self._ready(mark), timeout, interval=interval, what="ptx-node to be ready")
        return self

    def _ready(self, before: int) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            message = f"ptx-node exited {self.proc.returncode}"
            if self.log_tail_on_error:
                message += f":\n{self.log_text()[-self.log_tail_on_error:]}"
            raise RuntimeError(message)
        return self.log_text().count(READY) > before

    def stop(self) -> None:
        """SIGTERM the process group; after ``stop_timeout`` s, SIGKILL the whole process tree."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.wait()
        self.proc = None

    def jobs(self) -> list[Any]:
        """Every job row in the node's database (detached ``node.db.Job`` objects)."""
        from sqlalchemy import select

        from node.db import Job, get_sessionmaker

        with get_sessionmaker(self.database_url)() as session:
            jobs = list(session.scalars(select(Job)))
            session.expunge_all()
        return jobs
