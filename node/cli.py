"""`ptx-node`: serve, worker, jobs, workers, resend, config check, db upgrade, demo."""

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
import typing
import warnings
from pathlib import Path
from typing import Any

from node.config import CONFIG_FILE_ENV, ConfigError, NodeConfig, load_config
from node.proc import die_with_parent
from node.reasons import first_line
from node.report import format_job_table, format_table

__all__ = ["main"]

log = logging.getLogger("ptx-node")


class RedactLibraryValues(logging.Filter):
    """No header value reaches the logs: quoted text and non-ASCII text are replaced by
    <redacted> in every record's message (library warnings quote header values: pydicom's
    invalid-value warnings, highdicom's person-name warnings) and in the exception lines of
    tracebacks, whose file/line frames stay as they are."""

    _QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")
    _NON_ASCII = re.compile(r"[^\x00-\x7f]+")
    # A line break or terminal escape in a value a sender chose (a UID, an AE title) would
    # forge log lines: shown as \xNN, so one record stays one line.
    _CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

    @classmethod
    def redact(cls, text: str) -> str:
        text = cls._NON_ASCII.sub("<redacted>", cls._QUOTED.sub("<redacted>", text))
        return cls._CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)

    @classmethod
    def redact_traceback(cls, text: str) -> str:
        lines = []
        for line in text.splitlines():
            # '  File "x.py", line 3, in f' and the source lines under it are code, not data
            frame = line.startswith("  File \"") or line.startswith("    ")
            lines.append(line if frame else cls.redact(line))
        return "\n".join(lines)

    def filter(self, record: logging.LogRecord) -> bool:
        message = self.redact(record.getMessage())
        record.msg, record.args = message, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.redact_traceback(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = self.redact_traceback(record.exc_text)
        return True


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactLibraryValues())
    # pynetdicom logs every PDU and highdicom every copied module at INFO; alembic one line per
    # plugin and dialect detail (the node says which revision it migrated to); keep warnings.
    for noisy in ("pynetdicom", "highdicom", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # highdicom warns on every SC whose source holds a one-component PatientName: the name is
    # the archive's own value, which DICOM allows; the output keeps it as the source has it.
    warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent the intended person name",
                            category=UserWarning)
    # Celery's multi-line "superuser privileges" warning: said once, in one line, by cmd_worker.
    warnings.filterwarnings("ignore", message=r"You're running the worker with superuser privileges")


def _apply_cli_overrides(args: argparse.Namespace) -> None:
    """Command-line switches become PTX_NODE_ variables, so child workers see them too."""
    if getattr(args, "config", None):
        os.environ["PTX_NODE_CONFIG"] = str(Path(args.config).resolve())
    if getattr(args, "allow_untrained", False):
        os.environ["PTX_NODE_MODEL__ALLOW_UNTRAINED"] = "true"
    if getattr(args, "checkpoint", None):
        os.environ["PTX_NODE_MODEL__CHECKPOINT"] = str(Path(args.checkpoint).resolve())
    if getattr(args, "device", None):
        os.environ["PTX_NODE_MODEL__DEVICE"] = args.device
    if getattr(args, "port", None) is not None:
        os.environ["PTX_NODE_SCP__PORT"] = str(args.port)
    if getattr(args, "workers", None) is not None:
        os.environ["PTX_NODE_WORKER__EMBEDDED_WORKERS"] = str(args.workers)


_loaded: NodeConfig | None = None  # for naming the database in a one-line error


def _load(args: argparse.Namespace) -> NodeConfig:
    global _loaded
    _apply_cli_overrides(args)
    try:
        _loaded = load_config(os.environ.get(CONFIG_FILE_ENV) or None)
    except ConfigError as exc:
        _fail(str(exc), code=2)
    return _loaded


def _fail(message: str, *, code: int = 1) -> typing.NoReturn:
    """Exit with the message, one `ptx-node:` line per line of it (no traceback)."""
    for line in message.splitlines() or [""]:
        print(f"ptx-node: {line}", file=sys.stderr)
    raise SystemExit(code)


def _config_source() -> str:
    path = os.environ.get(CONFIG_FILE_ENV)
    return f"config {path}" if path else f"no config file: built-in defaults (pass -c FILE or set {CONFIG_FILE_ENV})"


def _database_label(config: NodeConfig) -> str:
    return str(config.redacted()["database_url"])


def _open_database(config: NodeConfig) -> Any:
    """The session factory of an existing job database; a command that reads jobs never
    creates an empty database where the admin expected theirs."""
    from alembic.runtime.migration import MigrationContext

    from node.db import get_engine, get_sessionmaker, migrate, sqlite_file

    database_file = sqlite_file(config.database_url)
    if database_file is not None and not database_file.exists():
        _fail(f"no job database at {database_file} ({_config_source()})")
    with get_engine(config.database_url).connect() as connection:
        revision = MigrationContext.configure(connection).get_current_revision()
    if revision is None:  # a database, but not the node's: the admin named the wrong one
        _fail(f"{_database_label(config)} holds no ptx-node jobs (no schema; `ptx-node db upgrade` creates it) "
              f"({_config_source()})")
    migrate(config.database_url)
    return get_sessionmaker(config.database_url)


# --- serve ------------------------------------------------------------------------------------


class WorkerSupervisor:
    """Keeps the embedded worker processes alive. A worker that exits is restarted after
    a delay that doubles with each quick failure (``first_delay_s`` up to ``max_delay_s``),
    so one that cannot load its model retries calmly instead of every second; a worker
    that ran ``stable_s`` before it exited starts the count over."""

    def __init__(self, count: int, *, first_delay_s: float = 2.0, max_delay_s: float = 60.0,
                 stable_s: float = 60.0) -> None:
        self._count = count
        self._procs: list[subprocess.Popen[bytes] | None] = []
        self._started: list[float] = []
        self._failures: list[int] = []
        self._restart_at: list[float] = []
        self._first_delay_s, self._max_delay_s, self._stable_s = first_delay_s, max_delay_s, stable_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "node.cli", "worker"]
        proc = subprocess.Popen(cmd, env=os.environ.copy(), start_new_session=True, preexec_fn=die_with_parent)
        log.info("started embedded worker pid %d", proc.pid)
        return proc

    def start(self) -> None:
        self._procs = [self._spawn() for _ in range(self._count)]
        self._started = [time.monotonic()] * self._count
        self._failures = [0] * self._count
        self._restart_at = [0.0] * self._count
        self._thread.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]

    def restart_delay_s(self, failures: int) -> float:
        return min(self._max_delay_s, self._first_delay_s * 2 ** max(0, failures - 1))

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            for i, proc in enumerate(self._procs):
                if proc is None:
                    if now >= self._restart_at[i] and not self._stop.is_set():
                        self._procs[i], self._started[i] = self._spawn(), now
                    continue
                code = proc.poll()
                if code is None or self._stop.is_set():
                    continue
                ran_s = now - self._started[i]
                self._failures[i] = 1 if ran_s >= self._stable_s else self._failures[i] + 1
                delay = self.restart_delay_s(self._failures[i])
                log.warning("embedded worker pid %d exited with status %s after %.0f s; restarting in %.0f s",
                            proc.pid, code, ran_s, delay)
                self._procs[i], self._restart_at[i] = None, now + delay

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        running = [p for p in self._procs if p is not None]
        for proc in running:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args)
    _setup_logging(config.log_level)
    from node.broker import configure_app
    from node.db import migrate
    from node.gc import RetentionThread, remove_leftover_temporaries
    from node.preflight import config_problems, connection_problems
    from node.probe import DestinationProber
    from node.scp import Enqueuer, StoreSCP
    from node.sweeper import Sweeper
    from node.tls import TlsConfigError

    # Everything that can be checked is checked before a port opens (what `config check` runs).
    problems = config_problems(config, role="serve") or connection_problems(config)
    if problems:
        _fail("\n".join(problems), code=2)
    config.spool_dir.mkdir(parents=True, exist_ok=True)
    before, after = migrate(config.database_url)
    log.info("database schema at revision %s%s", after, "" if before == after else f" (was {before or 'empty'})")
    configure_app(config)
    remove_leftover_temporaries(config)  # before listening: nothing of ours is in flight

    enqueuer = Enqueuer(config)
    try:
        scp = StoreSCP(config, enqueuer)
    except TlsConfigError as exc:
        _fail(str(exc), code=2)
    enqueuer.start()
    scp.start()
    sweeper = Sweeper(config)
    sweeper.start()
    prober = DestinationProber(config)
    prober.start()
    retention = RetentionThread(config) if config.retention.enabled else None
    if retention is not None:
        retention.start()
    http_handle = None
    if config.http.enabled:
        from node.http import start_http_server

        try:
            http_handle = start_http_server(config)
        except OSError as exc:
            scp.stop()
            _fail(str(exc), code=2)
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
    prober.stop()
    sweeper.stop()
    if retention is not None:
        retention.stop()
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


def cmd_jobs(args: argparse.Namespace) -> int:
    config = _load(args)
    from sqlalchemy import select

    from node.db import Job, JobStatus

    factory = _open_database(config)
    database = _database_label(config)
    if args.jobs_command == "show":
        with factory() as session:
            job = session.get(Job, args.id)
            if job is None:
                print(f"ptx-node: no job {args.id} in {database} ({_config_source()})", file=sys.stderr)
                return 1
            print(json.dumps({"database": database, **job.summary()}, indent=2, default=str))
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
            print(json.dumps({"database": database, "jobs": [j.summary() for j in jobs]}, indent=2, default=str))
            return 0
        print(f"database: {database}")
        print(format_job_table(jobs))
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    """The workers that reported, and whether each can serve with the node's settings."""
    config = _load(args)
    from sqlalchemy import select

    from node.db import WorkerRecord, utcnow
    from node.metrics import WORKER_ALIVE_S

    factory = _open_database(config)
    digest = config.shared_settings_digest()
    now = utcnow()
    with factory() as session:
        workers = list(session.scalars(select(WorkerRecord).order_by(WorkerRecord.last_seen.desc()).limit(args.limit)))
    rows = [worker_state(w, digest, now, WORKER_ALIVE_S) for w in workers]
    if args.json:
        print(json.dumps({"database": _database_label(config), "settings_digest": digest, "workers": rows},
                         indent=2, default=str))
        return 0
    print(f"database: {_database_label(config)}  (node settings digest {digest})")
    header = ("WORKER", "DEVICE", "MODEL", "LAST SEEN (UTC)", "JOBS", "STATE", "SETTINGS")
    table = [(r["name"], r["device"] or "", r["model"] or "", r["last_seen"], str(r["jobs_done"]), r["state"],
              r["settings"]) for r in rows]
    print(format_table(header, table))
    if not table:
        print("(no worker has reported)")
    return 0


def worker_state(worker: Any, node_digest: str, now: dt.datetime, alive_s: float) -> dict[str, Any]:
    """A worker row in words: alive / gone / cannot serve (why), settings same / differ."""
    alive = worker.last_seen >= now - dt.timedelta(seconds=alive_s)
    if worker.serving_error:
        state = f"cannot serve: {worker.serving_error}"
    else:
        state = "alive" if alive else "gone"
    if worker.settings_digest is None:
        settings = "unknown"
    elif worker.settings_digest == node_digest:
        settings = "same as node"
    else:
        settings = f"DIFFERENT from the node ({worker.settings_digest})"
    model = " ".join(p for p in (worker.model_name, worker.model_version) if p) or None
    return {"name": worker.name, "device": worker.device, "model": model,
            "last_seen": worker.last_seen.strftime("%Y-%m-%d %H:%M:%S"), "jobs_done": worker.jobs_done or 0,
            "alive": alive and not worker.serving_error, "state": state, "settings": settings,
            "settings_digest": worker.settings_digest}


def cmd_resend(args: argparse.Namespace) -> int:
    config = _load(args)
    from sqlalchemy import select

    from node.broker import enqueue_jobs
    from node.db import Delivery, DeliveryStatus, Job, JobStatus
    from node.deliveries import job_objects

    if args.id is None and not args.destination:
        print("ptx-node: resend needs a job ID, or --destination NAME for all its FAILED jobs", file=sys.stderr)
        return 2
    if args.destination and args.destination not in {d.name for d in config.destinations}:
        configured = ", ".join(d.name for d in config.destinations) or "none"
        print(f"ptx-node: no destination {args.destination!r}; configured destinations: {configured}",
              file=sys.stderr)
        return 2
    factory = _open_database(config)
    print(f"database: {_database_label(config)}")
    with factory() as session:
        if args.id is not None:
            job = session.get(Job, args.id)
            if job is None:
                print(f"ptx-node: no job {args.id} in {_database_label(config)} ({_config_source()})", file=sys.stderr)
                return 1
            if job.status in (JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.RECEIVED):
                print(f"ptx-node: job {job.id} is {job.status}; it has no outputs to resend yet", file=sys.stderr)
                return 1
            if not job_objects(job):
                print(f"ptx-node: job {job.id} ({job.status}) has no output objects (SEG, SR, GSPS, SC) written; "
                      "nothing to resend", file=sys.stderr)
                return 1
            jobs = [job]
        else:
            # Every FAILED job with a delivery to this destination that gave up.
            jobs = list(session.scalars(
                select(Job).where(Job.status == JobStatus.FAILED, Job.deliveries.any(
                    (Delivery.destination == args.destination) & (Delivery.status == DeliveryStatus.FAILED)))
                .order_by(Job.id)))
            jobs = [job for job in jobs if job_objects(job)]
        for job in jobs:
            for delivery in job.deliveries:
                if args.destination and delivery.destination != args.destination:
                    continue
                delivery.status = DeliveryStatus.PENDING
                delivery.attempts = 0
                delivery.last_error = None
                delivery.first_failed_at = delivery.next_attempt_at = None
            job.status = JobStatus.SENDING
            # Clearing the token fences off a worker still holding the job: its writes now fail.
            job.lease_until = job.lease_token = None
            job.next_attempt_at = None
            job.error = None
            job.reason_code = None
            job.delivered_at = None
        session.commit()
        ids = [job.id for job in jobs]
    if args.id is None:
        print(f"destination {args.destination}: {len(ids)} FAILED job(s) queued for re-delivery"
              + (f" ({', '.join(map(str, ids))})" if ids else ""))
    if ids and len(enqueue_jobs(config, ids)) < len(ids):
        print("ptx-node: broker unreachable; the node's sweeper will send the jobs when it is back", file=sys.stderr)
    if args.id is not None:
        kinds = ", ".join(obj.kind for obj, _path in job_objects(jobs[0]))
        print(f"job {args.id}: queued for re-delivery of {kinds}")
    return 0


# --- gc -----------------------------------------------------------------------------------------


def cmd_gc(args: argparse.Namespace) -> int:
    config = _load(args)
    from node.db import migrate
    from node.gc import collect_garbage

    migrate(config.database_url)
    report = collect_garbage(config, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    for label, paths in (("spooled input", report.spool_files), ("output folder", report.output_dirs),
                         ("unreferenced spool file", report.orphan_files), ("temporary file", report.temp_files)):
        for path in paths:
            print(f"{'would delete' if args.dry_run else 'deleted'} {label}: {path}")
    print(report.summary())
    return 0


# --- config / db --------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    """The effective configuration, then every check `serve` (or `worker`) runs before it starts."""
    from node.preflight import config_problems, connection_problems, worker_problem

    file = args.file or getattr(args, "config", None) or os.environ.get(CONFIG_FILE_ENV)
    os.environ.pop(CONFIG_FILE_ENV, None)
    try:
        config = load_config(file)
    except ConfigError as exc:
        _fail(str(exc), code=2)
    print(json.dumps(config.redacted(), indent=2))
    problems = config_problems(config, role=args.role)
    if args.connect:
        problems += connection_problems(config)
    if args.role == "worker" and not problems and (problem := worker_problem(config)) is not None:
        problems.append(problem.reason)
    if problems:
        _fail("\n".join(problems), code=2)
    print(f"ptx-node: {file or 'built-in defaults'}: ready to {args.role}"
          + ("" if args.connect else " (database and broker not contacted: --no-connect)"), file=sys.stderr)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    config = _load(args)
    from node.db import migrate

    before, after = migrate(config.database_url)
    database = _database_label(config)
    if before is None:
        print(f"database {database}: created the schema at revision {after}")
    elif before != after:
        print(f"database {database}: upgraded from revision {before} to {after}")
    else:
        print(f"database {database}: schema is current (revision {after})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo.run import run_demo

    return run_demo(args)


# --- parser -------------------------------------------------------------------------------------


def _setup_argparser(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ptx-node", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ptx-node {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # SUPPRESS: a nested subcommand's own default must not erase `-c` given before it
        # (`ptx-node db -c node.toml upgrade`).
        p.add_argument("--config", "-c", default=argparse.SUPPRESS,
                       help=f"TOML config file (default: ${CONFIG_FILE_ENV}, else built-in embedded defaults)")
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

    workers = with_config(sub.add_parser("workers", help="workers that reported: alive, can serve, same settings"))
    workers.add_argument("--limit", type=int, default=50)
    workers.add_argument("--json", action="store_true")
    workers.set_defaults(func=cmd_workers)

    resend = with_config(sub.add_parser(
        "resend", help="deliver a job's SEG/SC again, or (no ID) every FAILED job of --destination"))
    resend.add_argument("id", type=int, nargs="?")
    resend.add_argument("--destination", help="only this destination; without an ID: all its FAILED jobs")
    resend.set_defaults(func=cmd_resend)

    gc = with_config(sub.add_parser("gc", help="delete files and rows past their retention ([retention])"))
    gc.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    gc.add_argument("--json", action="store_true")
    gc.set_defaults(func=cmd_gc)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = with_config(config_sub.add_parser(
        "check", help="print the effective config, then run every check serve (or worker) runs before it starts"))
    check.add_argument("file", nargs="?", help=f"config file (or -c FILE, or ${CONFIG_FILE_ENV})")
    check.add_argument("--role", choices=["serve", "worker"], default="serve",
                       help="check as `serve` (default) or as `worker` (also loads the checkpoint, checks the device)")
    check.add_argument("--no-connect", dest="connect", action="store_false",
                       help="do not contact the database and the broker")
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
    demo.add_argument("--known-mask", action="append", default=[], metavar="PNG",
                      help="known mask of an input (file named <SOPInstanceUID>.png): print the returned SEG's Dice")
    demo.set_defaults(func=cmd_demo)
    return parser.parse_args(argv)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ptx-node")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = _setup_argparser(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = describe_startup_error(exc)
        if message is None:
            raise
        _fail(message)


def describe_startup_error(exc: BaseException) -> str | None:
    """One line for a configuration or connection error (no traceback); None for a bug."""
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

    if isinstance(exc, (DBAPIError, ArgumentError, NoSuchModuleError)):
        where = f" {_database_label(_loaded)}" if _loaded is not None else ""
        return f"job database{where}: {first_line(exc)}"
    if isinstance(exc, ConfigError | PermissionError | FileNotFoundError | OSError):
        return first_line(exc)
    return None


if __name__ == "__main__":
    sys.exit(main())
