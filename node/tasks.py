"""The Celery task bodies: what a worker runs for a message (publishing is node.broker)."""

from __future__ import annotations

import os

from node.broker import RUN_JOB, app, configure_app, enqueue_job, enqueue_jobs, ptx_task
from node.config import CONFIG_FILE_ENV, NodeConfig, load_config
from node.pipeline import process_job

# app, configure_app, enqueue_job(s) and ptx_task are re-exported for existing callers.
__all__ = ["app", "configure_app", "enqueue_job", "enqueue_jobs", "ptx_task", "run_job",
           "set_worker_config", "worker_config"]

_runtime_config: NodeConfig | None = None


def worker_config() -> NodeConfig:
    """The config a worker process runs with (from PTX_NODE_CONFIG and the environment)."""
    global _runtime_config
    if _runtime_config is None:
        _runtime_config = load_config(os.environ.get(CONFIG_FILE_ENV) or None)
        configure_app(_runtime_config)
    return _runtime_config


def set_worker_config(config: NodeConfig) -> None:
    global _runtime_config
    _runtime_config = config
    configure_app(config)


@ptx_task(name=RUN_JOB)
def run_job(*, job_id: int) -> str:
    return process_job(worker_config(), job_id=job_id)
