"""`ptx-node worker`: a Celery worker that runs jobs on the CPU or a GPU.

A worker that cannot serve (no CUDA where `cuda` was asked for, a checkpoint whose
weights do not match their manifest) says why in one line, records the reason in its
`workers` row (status page, `/metrics`, `ptx-node workers`) and exits non-zero before
it subscribes to the queue: the jobs wait QUEUED for a worker that can serve them, and a
supervisor (systemd's `Restart=on-failure`, `ptx-node serve`) sees the failure.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

from node.config import NodeConfig
from node.db import dispose_engines, get_sessionmaker, utcnow
from node.preflight import ServingProblem, worker_problem
from node.reasons import first_line
from node.tasks import app, set_worker_config, worker_config

__all__ = ["EXIT_CANNOT_SERVE", "record_cannot_serve", "run_worker"]

log = logging.getLogger(__name__)

# Exit status of a worker that cannot load its model (systemd and `serve` restart it).
EXIT_CANNOT_SERVE = 3

_heartbeat_stop = threading.Event()
# Set by a pool process whose model failed to load after the preflight passed; shared
# memory created before the fork, read by the main process after Celery stops.
_child_cannot_serve: Any = None


def _heartbeat(config: NodeConfig) -> None:
    from node.pipeline import get_segmenter, record_worker

    while True:
        try:
            record_worker(config, get_segmenter(config))
        except Exception as exc:  # the database may be down for a moment; say so once per beat
            log.warning("worker heartbeat failed: %s", first_line(exc))
        if _heartbeat_stop.wait(15.0):
            return


def record_cannot_serve(config: NodeConfig, problem: ServingProblem) -> None:
    """This process's `workers` row says it cannot serve, and why; never raises."""
    from node.metrics import count_event
    from node.pipeline import worker_row

    try:
        with get_sessionmaker(config.database_url)() as session:
            record = worker_row(session)
            record.device = config.model.device
            record.last_seen = utcnow()
            record.settings_digest = config.shared_settings_digest()
            record.serving_error = problem.reason
            record.serving_error_code = problem.code
            session.commit()
    except Exception as exc:  # the reason is still on stderr
        log.warning("could not record in the database why this worker cannot serve: %s", first_line(exc))
    count_event(config.database_url, "ptx_worker_start_failures_total", {"reason": problem.code})


def _load_failure_reason(exc: Exception, config: NodeConfig) -> str:
    """Words for the workers row and the status page: the checkpoint's own sentence where it
    has one (written for people), never another library's exception text."""
    from model.checkpoint import CheckpointError

    if isinstance(exc, CheckpointError) and str(exc):
        return str(exc).splitlines()[0]
    if isinstance(exc, MemoryError):
        return f"not enough memory on {config.model.device} for the network"
    return f"the network could not be built or run on {config.model.device} (the worker's log has the details)"


@worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    # A forked child must not share its parent's database connections.
    dispose_engines()
    config = worker_config()
    import torch

    from node.pipeline import get_segmenter

    if config.model.device != "cuda":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        # Load (and on the CPU, export to ONNX once) before the first job, not during it.
        get_segmenter(config).warmup()
    except Exception as exc:
        reason = _load_failure_reason(exc, config)
        log.error("model load failed", exc_info=True)  # the detail, for the log only
        print(f"ptx-node worker: cannot serve: could not load the model: {reason}", file=sys.stderr, flush=True)
        record_cannot_serve(config, ServingProblem("model_load_failed", f"could not load the model: {reason}"))
        if _child_cannot_serve is not None:
            _child_cannot_serve.value = 1
        os.kill(os.getppid(), signal.SIGTERM)  # the whole worker stops; no job reaches this process
        os._exit(EXIT_CANNOT_SERVE)
    threading.Thread(target=_heartbeat, args=(config,), name="heartbeat", daemon=True).start()


@worker_process_shutdown.connect
def _on_process_shutdown(**_: Any) -> None:
    _heartbeat_stop.set()


def run_worker(config: NodeConfig, *, concurrency: int | None = None) -> int:
    global _child_cannot_serve
    set_worker_config(config)
    problem = worker_problem(config)
    if problem is not None:
        print(f"ptx-node worker: cannot serve: {problem.reason}", file=sys.stderr, flush=True)
        record_cannot_serve(config, problem)
        return EXIT_CANNOT_SERVE
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # Celery's own warning is many lines (filtered)
        log.warning("worker runs as root; the shipped systemd units and images run it as the ptx user")
    _child_cannot_serve = multiprocessing.Value("i", 0)
    argv = [
        "--quiet",  # no ASCII banner: the config it shows is what `config check` prints
        "worker",
        f"--loglevel={config.log_level}",
        "-Q", config.worker.queue,
        f"--concurrency={concurrency or config.worker.concurrency}",
        "--pool=prefork",
        "--without-gossip",
        "--without-mingle",
        "-n", f"ptx-{os.getpid()}@%h",
    ]
    app.worker_main(argv)
    return EXIT_CANNOT_SERVE if _child_cannot_serve.value else 0
