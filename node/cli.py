"""`ptx-node`: serve, worker, jobs, resend, config check, db upgrade, demo."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from node.config import ConfigError, NodeConfig, load_config
from node.proc import die_with_parent

__all__ = ["main"]

log = logging.getLogger("ptx-node")


class RedactLibraryValues(logging.Filter):
    """Library warnings quote header values (pydicom's invalid-value warnings, highdicom's
    person-name warnings): strip quoted text from them so no patient name reaches the logs."""

    _QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")
    _LOGGERS = ("py.warnings", "pydicom", "highdicom", "pynetdicom")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(self._LOGGERS):
            message = self._QUOTED.sub("<redacted>", record.getMessage())
            record.msg, record.args = message, None
        return True


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactLibraryValues())
    # pynetdicom logs every PDU and highdicom every copied module at INFO; keep warnings.
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _apply_cli_overrides(args: argparse.Namespace) -> None:
    """Command-line switches become PTX_NODE_ variables, so child workers see them too."""
    if getattr(args, "config", None):
        os.environ["PTX_NODE_CONFIG"] = str(Path(args.config).resolve())
    if getattr(args, "allow_untrained", False):
        os.environ["PTX_NODE_MODEL__ALLOW_UNTRAINED"] = "true"
    if getattr(args, "checkpoint", None):
        os.environ["PTX_NODE_MODEL__CHECKPOINT"] = json.dumps(str(Path(args.checkpoint).resolve()))
    if getattr(args, "device", None):
        os.environ["PTX_NODE_MODEL__DEVICE"] = json.dumps(args.device)
    if getattr(args, "port", None) is not None:
        os.environ["PTX_NODE_SCP__PORT"] = str(args.port)
    if getattr(args, "workers", None) is not None:
        os.environ["PTX_NODE_WORKER__EMBEDDED_WORKERS"] = str(args.workers)


def _load(args: argparse.Namespace) -> NodeConfig:
    _apply_cli_overrides(args)
    try:
        return load_config(os.environ.get("PTX_NODE_CONFIG") or None)
    except ConfigError as exc:
        print(f"ptx-node: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# --- serve ------------------------------------------------------------------------------------


class WorkerSupervisor:
    """Keeps the embedded worker processes alive: a crashed worker is restarted."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._procs: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "node.cli", "worker"]
        proc = subprocess.Popen(cmd, env=os.environ.copy(), start_new_session=True, preexec_fn=die_with_parent)
        log.info("started embedded worker pid %d", proc.pid)
        return proc

    def start(self) -> None:
        self._procs = [self._spawn() for _ in range(self._count)]
        self._thread.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for i, proc in enumerate(self._procs):
                code = proc.poll()
                if code is not None and not self._stop.is_set():
                    log.warning("embedded worker pid %d exited with %s; restarting", proc.pid, code)
                    self._procs[i] = self._spawn()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args)
    _setup_logging(config.log_level)
    from node.db import migrate
    from node.scp import Enqueuer, StoreSCP
    from node.sweeper import Sweeper
    from node.tasks import configure_app

    if config.model.checkpoint is None and not config.model.allow_untrained:
        print(
            "ptx-node: no model checkpoint configured ([model] checkpoint or --checkpoint); "
            "pass --allow-untrained to run an untrained network (every output then says UNTRAINED)",
            file=sys.stderr,
        )
        return 2
    config.spool_dir.mkdir(parents=True, exist_ok=True)
    migrate(config.database_url)
    configure_app(config)

    enqueuer = Enqueuer(config)
    enqueuer.start()
    scp = StoreSCP(config, enqueuer)
    scp.start()
    sweeper = Sweeper(config)
    sweeper.start()
    http_handle = None
    if config.http.enabled:
        try:
            from node.http import start_http_server
        except ImportError:
            log.warning("HTTP server not available in this build")
        else:
            http_handle = start_http_server(config)
    supervisor = WorkerSupervisor(config.worker.embedded_workers)
    supervisor.start()

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    http_note = f", status page http://{config.http.bind_address}:{http_handle.port}/" if http_handle else ""
    print(
        f"ptx-node ready: SCP {config.scp.ae_title}@{config.scp.bind_address}:{scp.port}{http_note}, "
        f"{config.worker.embedded_workers} embedded worker(s), database {config.redacted()['database_url']}",
        flush=True,
    )
    stop.wait()
    scp.stop()
    sweeper.stop()
    enqueuer.stop()
    if http_handle is not None:
        http_handle.stop()
    supervisor.stop()
    return 0


# --- worker -----------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    config = _load(args)
    _setup_logging(config.log_level)
    from node import worker

    return worker.run_worker(config, concurrency=args.concurrency)


# --- jobs / resend ----------------------------------------------------------------------------


_SINCE = re.compile(r"^(\d+)([smhd])$")


def _parse_since(value: str) -> dt.datetime:
    m = _SINCE.match(value)
    if m:
        seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(seconds=seconds)
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--since wants 30m, 2h, 1d or an ISO date, not {value!r}") from None
    return parsed.astimezone(dt.UTC).replace(tzinfo=None) if parsed.tzinfo else parsed


def _fmt_latency(job: Any) -> str:
    end = job.delivered_at or job.finished_at
    if not end:
        return ""
    return f"{(end - job.received_at).total_seconds():.1f}s"


def cmd_jobs(args: argparse.Namespace) -> int:
    config = _load(args)
    from sqlalchemy import select

    from node.db import Job, JobStatus, get_sessionmaker, migrate

    migrate(config.database_url)
    factory = get_sessionmaker(config.database_url)
    if args.jobs_command == "show":
        with factory() as session:
            job = session.get(Job, args.id)
            if job is None:
                print(f"ptx-node: no job {args.id}", file=sys.stderr)
                return 1
            print(json.dumps(job.summary(), indent=2, default=str))
        return 0
    query = select(Job).order_by(Job.id.desc()).limit(args.limit)
    if args.status:
        statuses = [s.strip().upper() for s in args.status.split(",")]
        bad = [s for s in statuses if s not in JobStatus.__members__]
        if bad:
            print(f"ptx-node: unknown status {', '.join(bad)}; valid: {', '.join(JobStatus)}", file=sys.stderr)
            return 2
        query = query.where(Job.status.in_(statuses))
    if args.since:
        query = query.where(Job.received_at >= args.since)
    with factory() as session:
        jobs = list(session.scalars(query))
        if args.json:
            print(json.dumps([j.summary() for j in jobs], indent=2, default=str))
            return 0
        print(format_job_table(jobs))
    return 0


def format_job_table(jobs: list[Any]) -> str:
    header = ("ID", "STATUS", "RECEIVED (UTC)", "MOD", "FROM", "RESULT", "MAX P", "AREA mm2", "LATENCY", "REASON")
    rows = []
    for job in jobs:
        if job.positive is None:
            result = ""
        else:
            result = "PTX" if job.positive else "neg"
        rows.append((
            str(job.id), job.status, job.received_at.strftime("%Y-%m-%d %H:%M:%S"), job.modality or "",
            job.calling_ae or job.source, result,
            "" if job.max_probability is None else f"{job.max_probability:.2f}",
            "" if job.area_mm2 is None else f"{job.area_mm2:.0f}",
            _fmt_latency(job), (job.error or "")[:60],
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if not rows:
        lines.append("(no jobs)")
    return "\n".join(lines)


def cmd_resend(args: argparse.Namespace) -> int:
    config = _load(args)
    from node.db import DeliveryStatus, Job, JobStatus, get_sessionmaker, migrate
    from node.pipeline import output_files
    from node.tasks import enqueue_job

    migrate(config.database_url)
    factory = get_sessionmaker(config.database_url)
    with factory() as session:
        job = session.get(Job, args.id)
        if job is None:
            print(f"ptx-node: no job {args.id}", file=sys.stderr)
            return 1
        if job.status in (JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.RECEIVED):
            print(f"ptx-node: job {job.id} is {job.status}; it has no outputs to resend yet", file=sys.stderr)
            return 1
        if not output_files(job).dicom_paths():
            print(f"ptx-node: job {job.id} ({job.status}) has no SEG/SC written; nothing to resend", file=sys.stderr)
            return 1
        for delivery in job.deliveries:
            if args.destination and delivery.destination != args.destination:
                continue
            delivery.status = DeliveryStatus.PENDING
            delivery.attempts = 0
            delivery.last_error = None
        job.status = JobStatus.SENDING
        job.lease_until = None
        job.next_attempt_at = None
        job.error = None
        job.delivered_at = None
        session.commit()
    if not enqueue_job(config, args.id):
        print("ptx-node: broker unreachable; the node's sweeper will send the job when it is back", file=sys.stderr)
    print(f"job {args.id}: queued for re-delivery")
    return 0


# --- config / db --------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    os.environ.pop("PTX_NODE_CONFIG", None)
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"ptx-node: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(config.redacted(), indent=2))
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    config = _load(args)
    from node.db import migrate

    migrate(config.database_url)
    print(f"database at {config.redacted()['database_url']} is at the latest schema")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    return run_demo(args)


# --- parser -------------------------------------------------------------------------------------


def _setup_argparser(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ptx-node", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help="TOML config file (default: built-in embedded defaults)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the DICOM node (SCP, sweeper, status page, embedded workers)"))
    serve.add_argument("--allow-untrained", action="store_true", help="serve an untrained network (outputs say UNTRAINED)")
    serve.add_argument("--checkpoint", help="model checkpoint directory")
    serve.add_argument("--port", type=int, help="SCP port")
    serve.add_argument("--workers", type=int, help="embedded worker processes (0 in production)")
    serve.add_argument("--device", choices=["cpu", "cuda", "auto"])
    serve.set_defaults(func=cmd_serve)

    worker = with_config(sub.add_parser("worker", help="run a Celery worker"))
    worker.add_argument("--device", choices=["cpu", "cuda", "auto"])
    worker.add_argument("--concurrency", type=int, default=None)
    worker.add_argument("--allow-untrained", action="store_true")
    worker.add_argument("--checkpoint")
    worker.set_defaults(func=cmd_worker)

    jobs = with_config(sub.add_parser("jobs", help="list recent jobs"))
    jobs.add_argument("--status", help="comma-separated statuses, e.g. FAILED,SKIPPED")
    jobs.add_argument("--since", type=_parse_since, help="30m, 2h, 1d or an ISO date")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(func=cmd_jobs, jobs_command=None)
    jobs_sub = jobs.add_subparsers(dest="jobs_command")
    show = with_config(jobs_sub.add_parser("show", help="one job in full"))
    show.add_argument("id", type=int)

    resend = with_config(sub.add_parser("resend", help="deliver a job's SEG/SC again"))
    resend.add_argument("id", type=int)
    resend.add_argument("--destination", help="only this destination")
    resend.set_defaults(func=cmd_resend)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="print the effective config; error on bad keys")
    check.add_argument("file")
    check.set_defaults(func=cmd_config)

    db = with_config(sub.add_parser("db", help="database tools"))
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = with_config(db_sub.add_parser("upgrade", help="apply migrations"))
    up.set_defaults(func=cmd_db)

    demo = sub.add_parser("demo", help="run the node on the embedded default against a local PACS and show results")
    demo.add_argument("inputs", nargs="*", help="DICOM files to send (default: pydicom-data RG1_UNCR.dcm)")
    demo.add_argument("--out", default="demo-out", help="where configs, databases and overlay PNGs go")
    demo.add_argument("--checkpoint", help="model checkpoint (default: untrained network)")
    demo.add_argument("--timeout", type=float, default=300.0)
    demo.add_argument("--no-orthanc", action="store_true", help="use the built-in receiver even if Orthanc is installed")
    demo.set_defaults(func=cmd_demo)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _setup_argparser(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
