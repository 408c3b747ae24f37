"""The checks a process runs before it opens a port or takes a job, shared by
`ptx-node serve`, `ptx-node worker` and `ptx-node config check` so that what the
check passes, the process accepts; each problem is one line an admin can act on.

- ``config_problems``: what the configuration alone says (no model, an exposed
  HTTP server without a token, a spool that cannot be written);
- ``connection_problems``: the job database and the broker answer;
- ``worker_problem``: whether this machine can load the model (device, checkpoint),
  as a reason code and a sentence; a worker that has one exits before taking a job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from node.config import NodeConfig
from node.disk import existing_parent
from node.reasons import first_line

__all__ = ["ServingProblem", "config_problems", "connection_problems", "worker_problem"]


@dataclass(frozen=True)
class ServingProblem:
    """Why a worker cannot serve: a short code (a metric label) and the reason in words."""

    code: str
    reason: str


def _model_configured(config: NodeConfig) -> str | None:
    if config.model.checkpoint is None and not config.model.allow_untrained:
        return ("no model checkpoint configured ([model] checkpoint or --checkpoint); pass --allow-untrained "
                "to run an untrained network (every output then says UNTRAINED)")
    return None


def _checkpoint_present(config: NodeConfig) -> str | None:
    from model.checkpoint import CheckpointError, read_manifest

    if config.model.checkpoint is None:
        return None
    try:
        read_manifest(config.model.checkpoint)
    except CheckpointError as exc:
        return f"model.checkpoint: {exc}"
    return None


def _spool_writable(spool_dir: Path) -> str | None:
    existing = existing_parent(spool_dir)
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"spool_dir {spool_dir}: {existing} is not writable by this user"
    return None


def config_problems(config: NodeConfig, *, role: str = "serve") -> list[str]:
    """Problems that stop ``role`` ("serve" or "worker") from starting, from the config alone."""
    problems = [p for p in (_model_configured(config), _spool_writable(config.spool_dir)) if p]
    loads_model = role == "worker" or config.worker.embedded_workers > 0
    if loads_model and (missing := _checkpoint_present(config)):
        problems.append(missing)
    if role == "serve":
        problems += _listener_problems(config)
    problems += _tls_problems(config, role)
    return problems


def _listener_problems(config: NodeConfig) -> list[str]:
    """What StoreSCP and the HTTP server would refuse when they start."""
    from node.scp import ScpConfigError, check_caller_exposure

    problems: list[str] = []
    try:
        check_caller_exposure(config)
    except ScpConfigError as exc:
        problems.append(str(exc))
    if config.http.enabled:
        from node.http.app import HttpConfigError, check_exposure

        try:
            check_exposure(config)
        except HttpConfigError as exc:
            problems.append(str(exc))
    return problems


def _tls_problems(config: NodeConfig, role: str) -> list[str]:
    """Certificates and keys load (the SCP's when serving; each TLS destination's always)."""
    from node.tls import TlsConfigError, client_context, server_context

    problems: list[str] = []
    contexts = [(lambda: server_context(config.scp.tls))] if role == "serve" and config.scp.tls.enabled else []
    for dest in config.destinations:
        tls = getattr(dest, "tls", None)
        if tls is not None and tls.enabled:
            contexts.append(lambda tls=tls, name=dest.name: client_context(tls, where=f"destination {name}"))
    for build in contexts:
        try:
            build()
        except TlsConfigError as exc:
            problems.append(str(exc))
    return problems


def connection_problems(config: NodeConfig) -> list[str]:
    """The job database and the broker answer (a short timeout each)."""
    from sqlalchemy import text

    from node.db import get_engine

    redacted = config.redacted()
    problems: list[str] = []
    try:
        with get_engine(config.database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error is the same answer: not reachable
        problems.append(f"cannot use the job database {redacted['database_url']}: {first_line(exc)}")
    if not config.embedded_broker:
        from kombu import Connection

        try:
            with Connection(config.broker_url, connect_timeout=5) as broker:
                broker.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:  # kombu wraps each transport's errors differently
            problems.append(f"cannot reach the broker {redacted['broker_url']}: {first_line(exc)}")
    return problems


def worker_problem(config: NodeConfig) -> ServingProblem | None:
    """Can this machine serve the model? Verifies the device and the checkpoint's weights
    (sha256; every member of an ensemble) without building the network, so a forked worker
    can still take the GPU."""
    from model.checkpoint import CheckpointError, load_weights

    if (reason := _model_configured(config)) is not None:
        return ServingProblem("no_checkpoint", reason)
    if config.model.device == "cuda":
        # NVML answers without initialising CUDA in this (parent) process, so forked
        # children can still use the GPU.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        import torch

        if not torch.cuda.is_available():
            return ServingProblem("device_unavailable",
                                  "model.device is cuda but CUDA is not available on this machine "
                                  "(no GPU, driver or CUDA-enabled torch); use --device cpu or fix the driver")
    if config.model.checkpoint is not None:
        try:
            load_weights(config.model.checkpoint)
        except CheckpointError as exc:
            return ServingProblem("checkpoint_invalid", f"checkpoint {config.model.checkpoint}: {exc}")
        except OSError as exc:
            return ServingProblem("checkpoint_unreadable", f"checkpoint {config.model.checkpoint}: {exc}")
    return None
