"""`ptx-node worker`: a Celery worker that runs jobs on the CPU or a GPU."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

from node.config import NodeConfig
from node.db import dispose_engines
from node.tasks import app, set_worker_config, worker_config

__all__ = ["run_worker"]

log = logging.getLogger(__name__)

_heartbeat_stop = threading.Event()


def _heartbeat(config: NodeConfig) -> None:
    from node.pipeline import get_segmenter, record_worker

    while True:
        try:
            record_worker(config, get_segmenter(config))
        except Exception:
            log.exception("worker heartbeat failed")  # e.g. the model does not load
        if _heartbeat_stop.wait(15.0):
            return


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
    except Exception:
        # Jobs will fail with the reason recorded on their rows; the worker stays up.
        log.exception("could not load the model")
    threading.Thread(target=_heartbeat, args=(config,), name="heartbeat", daemon=True).start()


@worker_process_shutdown.connect
def _on_process_shutdown(**_: Any) -> None:
    _heartbeat_stop.set()


def run_worker(config: NodeConfig, *, concurrency: int | None = None) -> int:
    set_worker_config(config)
    if config.model.checkpoint is None and not config.model.allow_untrained:
        log.error("no model checkpoint configured; pass --allow-untrained to serve an untrained network")
        return 2
    argv = [
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
    return 0
