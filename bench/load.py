"""Load and failure benchmark: exactly one result per image while things break.

Not a test: it measures, and prints what it measured next to a baseline from the same run.
The node runs its embedded default (``ptx-node serve``: SQLite jobs, SQLite broker, one
embedded worker) with a small untrained network (64 px, no TTA), so the figures are the
plumbing's, not the model's. Every image gets a SEG and an SC (``[outputs] positive = negative =
["seg", "sc"]``); everything else is the default configuration.

Scenarios (``--scenario``):

- ``kill``: 1,000 images from 4 parallel senders that behave like a PACS (an image whose
  C-STORE did not get Success is sent again on a new association); the node's whole
  process tree is SIGKILLed twice during intake and restarted; the embedded worker
  processes are SIGKILLed three times while jobs run. A bare pynetdicom store SCP counts
  what comes back. Baseline: the same SCP receiving the same images from the same four
  senders (intake rate).
- ``outage``: the receiving SCP is down for the first 15 minutes (``--outage-s``); default
  delivery settings; no admin action.
- ``redis``: production mode (PostgreSQL jobs, a private ``redis-server`` on its own port
  started here, a separate ``ptx-node worker``); Redis is shut down (no persistence, so
  queued messages are gone) for 30 s during intake and started again; no admin action.

Reported per scenario: accepted, lost (accepted, but no SEG or no SC at the receiver),
duplicated (more than one SEG or SC instance for a source), jobs by status, intake rate,
total time. Goal: all accepted, 0 lost, 0 duplicated, no admin action.

    nice python bench/load.py --scenario kill --out bench/out/load-kill.json
    python bench/load.py --scenario kill --images 40 --senders 2      # quick check that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from nodeproc import NodeProcess, kill_tree, process_tree  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from node.demo.pacs import free_port, wait_until  # noqa: E402

__all__ = ["main"]

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SC = "1.2.840.10008.5.1.4.1.1.7"


def log(message: str) -> None:
    print(f"{dt.datetime.now(dt.UTC).strftime('%H:%M:%S')} {message}", flush=True)


# --- the images ---------------------------------------------------------------------------------


def make_images(count: int, size: int) -> list[pydicom.Dataset]:
    """``count`` chest phantoms, each its own study (so the receiver can tell sources apart)."""
    from trainer.synth import make_phantom, write_dicom

    template_path = Path(tempfile.mkdtemp(prefix="ptx-load-")) / "template.dcm"
    rng = np.random.default_rng(9)
    image, _mask = make_phantom(rng, size)
    template = pydicom.dcmread(write_dicom(template_path, image))
    images = []
    for _ in range(count):
        ds = copy.deepcopy(template)  # Dataset.copy() is shallow: the UIDs would be shared
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        images.append(ds)
    shutil.rmtree(template_path.parent, ignore_errors=True)
    return images


# --- the PACS side --------------------------------------------------------------------------------


class CountingSCP:
    """A bare pynetdicom store SCP: counts what it gets, writes nothing (the baseline, and
    the receiver of the node's outputs)."""

    def __init__(self, ae_title: str = "PACS", port: int = 0) -> None:
        self.ae_title = ae_title
        self._port = port
        self._server: Any = None
        self._lock = threading.Lock()
        self.stores: list[tuple[str, str, str]] = []  # (study, SOP class, SOP instance)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self._port

    def start(self) -> CountingSCP:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        from node.scp import TRANSFER_SYNTAXES

        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 64
        ae.add_supported_context("1.2.840.10008.1.1")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        self._server = ae.start_server(("127.0.0.1", self._port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self._port = self.port
        return self

    def _store(self, event: Any) -> int:
        ds = event.dataset
        with self._lock:
            self.stores.append((str(ds.StudyInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        return 0x0000

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def by_study(self) -> dict[str, dict[str, set[str]]]:
        found: dict[str, dict[str, set[str]]] = {}
        with self._lock:
            for study, sop_class, sop in self.stores:
                found.setdefault(study, {}).setdefault(sop_class, set()).add(sop)
        return found


class Sender(threading.Thread):
    """Sends its images over one association; an image without a Success answer is sent
    again on a new association (what a PACS does)."""

    def __init__(self, name: str, images: list[pydicom.Dataset], port: int, called_ae: str,
                 on_accept: Any) -> None:
        super().__init__(name=name, daemon=True)
        self.images = images
        self.port = port
        self.called_ae = called_ae
        self.on_accept = on_accept
        self.accepted: list[str] = []
        self.resends = 0
        self.associations = 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=self.name[:16])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.connection_timeout = 5
        sop_class = str(self.images[0].SOPClassUID)
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
        assoc = None
        index = 0
        while index < len(self.images) and not self.stop_flag.is_set():
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called_ae)
                self.associations += 1
                if not assoc.is_established:
                    assoc = None
                    time.sleep(0.5)
                    continue
            ds = self.images[index]
            try:
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else None
            except Exception:
                code = None
            if code == 0x0000 or (code is not None and (code & 0xF000) == 0xB000):
                self.accepted.append(str(ds.SOPInstanceUID))
                self.on_accept()
                index += 1
                continue
            self.resends += 1
            with contextlib.suppress(Exception):
                assoc.abort()
            assoc = None
            time.sleep(0.2)
        if assoc is not None and assoc.is_established:
            assoc.release()


def send_all(images: list[pydicom.Dataset], senders: int, port: int, called_ae: str,
             on_accept: Any = None) -> tuple[list[Sender], float]:
    """Split the images over ``senders`` threads; returns them and the wall time to the last Success."""
    lock = threading.Lock()
    count = [0]

    def accepted() -> None:
        with lock:
            count[0] += 1
            if on_accept is not None:
                on_accept(count[0])

    threads = [Sender(f"SENDER{i}", images[i::senders], port, called_ae, accepted) for i in range(senders)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return threads, time.monotonic() - started


# --- the node -----------------------------------------------------------------------------------


def node_config(workdir: Path, receiver_port: int, *, database_url: str | None = None,
                broker_url: str | None = None, embedded_workers: int = 1) -> dict[str, Any]:
    return {
        "spool_dir": str(workdir / "spool"),
        "database_url": database_url or f"sqlite:///{workdir / 'jobs.sqlite'}",
        "broker_url": broker_url or f"sqla+sqlite:///{workdir / 'broker.sqlite'}",
        "log_level": "INFO",
        "scp": {"ae_title": "PTXNODE", "bind_address": "127.0.0.1", "port": free_port(), "max_associations": 16},
        "model": {"allow_untrained": True, "device": "cpu", "tta": False, "untrained_input_size": 64},
        "worker": {"embedded_workers": embedded_workers},
        "http": {"enabled": False},
        "outputs": {"positive": ["seg", "sc"], "negative": ["seg", "sc"]},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": receiver_port}],
    }


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Node(NodeProcess):
    """``ptx-node serve`` (or ``worker``) with files ``COMMAND.toml`` and ``COMMAND.log`` in ``workdir``."""

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def kill_all(self) -> int:
        """SIGKILL the node and everything it started (its embedded workers run in their own sessions)."""
        assert self.proc is not None
        killed = kill_tree(self.proc.pid)
        self.proc.wait()
        return killed

    def kill_workers(self) -> int:
        """SIGKILL the worker processes (the node's supervisor starts new ones)."""
        assert self.proc is not None
        pids = [p for p in process_tree(self.proc.pid)[1:]]
        workers = [p for p in pids if " worker" in _cmdline(p) or "celery" in _cmdline(p)]
        for pid in workers or pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(workers or pids)


# Where a scenario writes what it measured so far (a run may be cut short).
PARTIAL: dict[str, Any] = {"path": None, "images": None}


def wait_for_results(node: Node, receiver: CountingSCP, accepted: set[str], timeout_s: float,
                     on_progress: Any = None) -> float:
    """Until every accepted image has a terminal job and its outputs at the receiver."""
    from node.db import TERMINAL_STATUSES

    started = time.monotonic()
    last_log = 0.0
    while time.monotonic() - started < timeout_s:
        jobs = node.jobs()
        terminal = [j for j in jobs if j.status in TERMINAL_STATUSES]
        if on_progress is not None:
            on_progress(len(terminal))
        if time.monotonic() - last_log > 30:
            log(f"  {len(terminal)}/{len(jobs)} jobs terminal, {len(receiver.stores)} objects at the receiver "
                f"({Counter(j.status for j in jobs)})")
            last_log = time.monotonic()
            if PARTIAL["path"] is not None:
                done = {j.sop_instance_uid for j in terminal}
                so_far = tally(PARTIAL["images"], accepted & done, node, receiver)
                so_far.update({"partial": True, "accepted_total": len(accepted), "terminal": len(terminal),
                               "elapsed_after_intake_s": time.monotonic() - started})
                Path(PARTIAL["path"]).write_text(json.dumps(so_far, indent=2, default=str) + "\n")
        by_sop = {j.sop_instance_uid for j in terminal}
        if accepted <= by_sop and len(terminal) == len(jobs):
            return time.monotonic() - started
        time.sleep(1.0)
    return float("nan")


def tally(images: list[pydicom.Dataset], accepted: set[str], node: Node, receiver: CountingSCP) -> dict[str, Any]:
    study_of = {str(ds.SOPInstanceUID): str(ds.StudyInstanceUID) for ds in images}
    at_pacs = receiver.by_study()
    jobs = node.jobs()
    jobs_per_sop = Counter(j.sop_instance_uid for j in jobs)
    lost = [sop for sop in accepted
            if not at_pacs.get(study_of[sop], {}).get(SEG) or not at_pacs.get(study_of[sop], {}).get(SC)]
    duplicated = [sop for sop in accepted
                  if len(at_pacs.get(study_of[sop], {}).get(SEG, ())) > 1
                  or len(at_pacs.get(study_of[sop], {}).get(SC, ())) > 1]
    return {
        "images": len(images),
        "accepted": len(accepted),
        "lost": len(lost),
        "lost_examples": lost[:5],
        "duplicated": len(duplicated),
        "duplicated_examples": duplicated[:5],
        "job_rows": len(jobs),
        "sources_with_more_than_one_job": sum(1 for n in jobs_per_sop.values() if n > 1),
        "jobs_by_status": dict(Counter(j.status for j in jobs)),
        "objects_received_distinct": sum(len(v) for s in at_pacs.values() for v in s.values()),
        "c_stores_received": len(receiver.stores),
        "failed_reasons": sorted({(j.error or "")[:160] for j in jobs if j.status == "FAILED"})[:5],
    }


# --- scenarios --------------------------------------------------------------------------------------


def baseline_intake(images: list[pydicom.Dataset], senders: int) -> dict[str, Any]:
    scp = CountingSCP(ae_title="PTXNODE").start()
    try:
        threads, wall = send_all(images, senders, scp.port, "PTXNODE")
    finally:
        scp.stop()
    accepted = sum(len(t.accepted) for t in threads)
    return {"accepted": accepted, "wall_s": wall, "rate_per_s": accepted / wall}


def scenario_kill(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    images = make_images(args.images, args.size)
    PARTIAL["images"] = images
    log(f"kill: baseline intake of {len(images)} images from {args.senders} senders into a bare pynetdicom SCP")
    baseline = baseline_intake(images, args.senders)
    log(f"  baseline {baseline['rate_per_s']:.1f} images/s")

    receiver = CountingSCP().start()
    node = Node(work / "node", node_config(work / "node", receiver.port)).start()
    node_kills: list[dict[str, Any]] = []
    worker_kills: list[dict[str, Any]] = []
    kill_at = sorted({max(1, int(len(images) * f)) for f in (0.25, 0.6)})
    restart_lock = threading.Lock()

    def on_accept(count: int) -> None:
        if kill_at and count >= kill_at[0]:
            kill_at.pop(0)
            threading.Thread(target=restart, args=(count,), daemon=True).start()

    def restart(count: int) -> None:
        with restart_lock:
            t0 = time.monotonic()
            killed = node.kill_all()
            log(f"  SIGKILL node process tree ({killed} processes) after {count} accepted")
            node.start()
            node_kills.append({"after_accepted": count, "processes": killed, "down_s": time.monotonic() - t0})

    t_start = time.monotonic()
    threads, intake_wall = send_all(images, args.senders, node.port, "PTXNODE", on_accept)
    accepted = {sop for t in threads for sop in t.accepted}
    log(f"  intake: {len(accepted)} accepted in {intake_wall:.1f} s ({len(accepted) / intake_wall:.1f}/s), "
        f"{sum(t.resends for t in threads)} re-sends")
    worker_kill_at = [int(len(accepted) * f) for f in (0.2, 0.45, 0.7)]

    def on_progress(terminal: int) -> None:
        if worker_kill_at and terminal >= worker_kill_at[0]:
            worker_kill_at.pop(0)
            killed = node.kill_workers()
            worker_kills.append({"after_terminal": terminal, "processes": killed})
            log(f"  SIGKILL worker processes ({killed}) after {terminal} jobs terminal")

    settle = wait_for_results(node, receiver, accepted, args.timeout, on_progress)
    total = time.monotonic() - t_start
    time.sleep(2.0)
    result = tally(images, accepted, node, receiver)
    node.stop()
    receiver.stop()
    result.update({
        "senders": args.senders,
        "intake_wall_s": intake_wall,
        "intake_rate_per_s": len(accepted) / intake_wall,
        "baseline": baseline,
        "intake_ratio_to_baseline": (len(accepted) / intake_wall) / baseline["rate_per_s"],
        "re_sends": sum(t.resends for t in threads),
        "associations": sum(t.associations for t in threads),
        "node_kills": node_kills,
        "worker_kills": worker_kills,
        "after_intake_to_all_done_s": settle,
        "total_s": total,
    })
    return result


def scenario_outage(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    images = make_images(args.images, args.size)
    PARTIAL["images"] = images
    receiver_port = free_port()
    node = Node(work / "node", node_config(work / "node", receiver_port)).start()
    t_start = time.monotonic()
    log(f"outage: receiver down for {args.outage_s:.0f} s; sending {len(images)} images")
    threads, intake_wall = send_all(images, args.senders, node.port, "PTXNODE")
    accepted = {sop for t in threads for sop in t.accepted}
    remaining = args.outage_s - (time.monotonic() - t_start)
    while remaining > 0:
        statuses = Counter(j.status for j in node.jobs())
        log(f"  receiver down, {remaining:.0f} s to go: {dict(statuses)}")
        time.sleep(min(60.0, remaining))
        remaining = args.outage_s - (time.monotonic() - t_start)
    statuses_before = dict(Counter(j.status for j in node.jobs()))
    receiver = CountingSCP(port=receiver_port).start()
    t_up = time.monotonic()
    log(f"  receiver up after {t_up - t_start:.0f} s; jobs then: {statuses_before}")
    settle = wait_for_results(node, receiver, accepted, args.timeout)
    total = time.monotonic() - t_start
    time.sleep(2.0)
    result = tally(images, accepted, node, receiver)
    deliveries = _delivery_attempts(node.database_url)
    node.stop()
    receiver.stop()
    result.update({
        "senders": args.senders,
        "outage_s": args.outage_s,
        "intake_wall_s": intake_wall,
        "intake_rate_per_s": len(accepted) / intake_wall,
        "jobs_when_receiver_came_up": statuses_before,
        "receiver_up_to_all_done_s": settle,
        "delivery_attempts": deliveries,
        "admin_actions": 0,
        "total_s": total,
    })
    return result


def _delivery_attempts(database_url: str) -> dict[str, Any]:
    from sqlalchemy import func, select

    from node.db import Delivery, get_sessionmaker

    with get_sessionmaker(database_url)() as session:
        attempts = list(session.scalars(select(Delivery.attempts)))
        by_status = dict(session.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())
    return {"rows": len(attempts), "max": max(attempts, default=0),
            "mean": sum(attempts) / len(attempts) if attempts else 0.0, "by_status": by_status}


class PrivateRedis:
    """A redis-server of the benchmark's own, on its own port, without persistence."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "redis.log", "ab") as out:
            self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--dir", str(self.workdir)],
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_until(self._answers, 30, interval=0.1, what="redis-server to answer")
        return self

    def _answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None


def scenario_redis(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import psycopg

    images = make_images(args.images, args.size)
    PARTIAL["images"] = images
    name = f"ptx_load_{os.getpid()}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    redis_server = PrivateRedis(work / "redis").start()
    receiver = CountingSCP().start()
    config = node_config(work / "node", receiver.port, database_url=database_url,
                         broker_url=f"redis://127.0.0.1:{redis_server.port}/0", embedded_workers=0)
    node = Node(work / "node", config).start()
    worker = Node(work / "node", config, command="worker").start(wait=False)
    outage: dict[str, Any] = {}
    stop_at = [max(1, len(images) // 3)]

    def on_accept(count: int) -> None:
        if stop_at and count >= stop_at[0]:
            stop_at.pop(0)
            threading.Thread(target=redis_down, args=(count,), daemon=True).start()

    def redis_down(count: int) -> None:
        log(f"  redis-server stopped after {count} accepted")
        redis_server.stop()
        time.sleep(args.redis_down_s)
        redis_server.start()
        outage.update({"after_accepted": count, "down_s": args.redis_down_s})
        log("  redis-server started again (empty: it keeps nothing on disk)")

    t_start = time.monotonic()
    log(f"redis: {len(images)} images, PostgreSQL jobs, private redis-server on port {redis_server.port}")
    threads, intake_wall = send_all(images, args.senders, node.port, "PTXNODE", on_accept)
    accepted = {sop for t in threads for sop in t.accepted}
    wait_until(lambda: bool(outage), args.redis_down_s + 60, what="redis to be back")
    settle = wait_for_results(node, receiver, accepted, args.timeout)
    total = time.monotonic() - t_start
    time.sleep(2.0)
    result = tally(images, accepted, node, receiver)
    worker.stop()
    node.stop()
    receiver.stop()
    redis_server.stop()
    from node.db import dispose_engines

    dispose_engines()
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    result.update({
        "senders": args.senders,
        "intake_wall_s": intake_wall,
        "intake_rate_per_s": len(accepted) / intake_wall,
        "redis_outage": outage,
        "after_intake_to_all_done_s": settle,
        "admin_actions": 0,
        "total_s": total,
    })
    return result


SCENARIOS = {"kill": scenario_kill, "outage": scenario_outage, "redis": scenario_redis}


def _setup_argparser(args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="kill")
    parser.add_argument("--images", type=int, default=None, help="default: 1000 (kill), 200 (outage, redis)")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="phantom size in pixels")
    parser.add_argument("--outage-s", type=float, default=900.0, help="receiver down this long (outage)")
    parser.add_argument("--redis-down-s", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="longest wait for the results")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parsed = parser.parse_args(args)
    if parsed.images is None:
        parsed.images = 1000 if parsed.scenario == "kill" else 200
    return parsed


def main(argv: Sequence[str] | None = None) -> int:
    args = _setup_argparser(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix=f"ptx-load-{args.scenario}-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        PARTIAL["path"] = args.out.with_suffix(".partial.json")
    started = dt.datetime.now(dt.UTC)
    result = SCENARIOS[args.scenario](args, work)
    report = {
        "scenario": args.scenario,
        "started_utc": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_end": list(os.getloadavg())},
        "work": str(work),
        "result": result,
    }
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    goal = result["lost"] == 0 and result["duplicated"] == 0 and result["accepted"] == result["images"]
    log(f"{args.scenario}: accepted {result['accepted']}/{result['images']}, lost {result['lost']}, "
        f"duplicated {result['duplicated']}, jobs {result['jobs_by_status']}: goal {'met' if goal else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
