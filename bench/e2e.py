"""End-to-end benchmark: Orthanc -> ptx-node -> Orthanc on the CPU, next to the model alone.

Three measurements in one run, all on this machine's CPU:

1. Latency. A real Orthanc (``node.demo.pacs.LocalOrthanc``) routes N radiographs to
   ``ptx-node serve`` (embedded default: SQLite jobs, SQLite Celery broker, one embedded
   worker, destination = that Orthanc) through ``/modalities/ptx/store``. For each image:
   from the start of the REST call that makes Orthanc send the C-STORE to the moment the
   SEG is stored in Orthanc (a thread polls Orthanc's ``/changes`` every 50 ms).
   "sequential": send one, wait for its job to end, send the next (pure per-image
   latency); "burst": ``--burst-n`` more in one call (latency counted from the call's
   start, plus throughput). One warm-up image goes first and is not counted. Every image gets a SEG
   (``negative = ["seg", "sr", "gsps", "sc"]``, as for a positive), so the figure is the full work for every image.
2. Model only, in the same run, interleaved with the sequential latency (same image, right
   after its job ended, so background load hits both alike): ``model.Segmenter.predict(ds)``
   with the worker's configuration (same input size, TTA on, CPU, same thread count, same
   runtime), plus the node's own output steps timed in-process (decode, SEG, SC, PNG, the
   C-STORE to Orthanc) to split the non-model time. The job rows (received, queued,
   started, delivered, inference_ms) and the node's log give the same split from the node.
3. Intake. The node's SCP (fsync + job row commit; ``embedded_workers = 0``, model not
   loaded) vs a bare pynetdicom store SCP (``node.demo.receiver.FolderReceiver``) on the same
   files, sent by dcmtk ``storescu`` in one association; plus the bare SCP with an fsync of
   each file and its directory (what durability alone costs). Two sets: 200 small phantoms
   + 4 RG1_UNCR ("mixed"), and 20 RG1_UNCR copies ("large", radiograph-sized). Median of
   ``--repeats`` rounds, the receivers taking turns going first.

``--profile`` adds untimed passes: py-spy (if installed) on the worker and on the SCP, and
the node's StoreSCP in-process with and without its Enqueuer thread.

    python bench/e2e.py                          # defaults: N=20, 512 px, untrained UNet++/B4
    python bench/e2e.py --checkpoint ckpt/ --out bench/out/e2e.json
    python bench/e2e.py --smoke                  # small and quick: checks that it runs
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from nodeproc import NodeProcess, process_tree  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from node.demo.pacs import LocalOrthanc, free_port, wait_until  # noqa: E402

__all__ = ["main"]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
KINDS = ("RG1_UNCR", "cat", "phantom")
OVERHEAD_GOAL = 0.30
INTAKE_GOAL = 0.80


# --- small helpers ---------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float | None:
    """Percentile with linear interpolation (numpy's default); None for no data."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def _median(values: Iterable[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return float(statistics.median(clean)) if clean else None


def _epoch_utc(value: dt.datetime | None) -> float | None:
    """A naive UTC datetime from the job table as a Unix time."""
    if value is None:
        return None
    return calendar.timegm(value.timetuple()) + value.microsecond / 1e6


def _fmt(value: float | None, unit: str = "s", digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def machine_info() -> dict[str, Any]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor() or "?"
    import torch

    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_at_start": list(os.getloadavg()),
    }


# --- inputs -------------------------------------------------------------------------------------------


@dataclass
class Sample:
    kind: str
    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    rows: int
    columns: int
    nbytes: int


def pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise SystemExit(f"bench/e2e.py: pydicom test file {name} missing (pip install pydicom-data)")
    return Path(path)


def deid_file(relative: str) -> Path:
    import deid_data  # type: ignore[import-untyped]

    base = Path(deid_data.__file__).parent
    matches = [base / relative] if (base / relative).exists() else list(base.rglob(Path(relative).name))
    if not matches:
        raise SystemExit(f"bench/e2e.py: deid-data {relative} missing (pip install deid-data)")
    return matches[0]


def copy_with_new_uids(source: Path, dest: Path, kind: str) -> Sample:
    """The same pixels as a new instance in a new study: a distinct job for the node."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return Sample(kind, dest, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), int(ds.Rows), int(ds.Columns),
                  dest.stat().st_size)


def make_phantom_file(dest: Path, seed: int, size: int) -> Path:
    from trainer.synth import make_phantom, write_dicom

    image, _mask = make_phantom(np.random.default_rng(seed), size)
    return write_dicom(dest, image, PatientID=f"BENCH-{seed:04d}")  # write_dicom gives new UIDs


def latency_inputs(folder: Path, n: int, phantom_size: int, templates: dict[str, Path]) -> list[Sample]:
    """n radiographs cycling RG1_UNCR, cat, phantom; each its own instance and study."""
    samples = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        samples.append(copy_with_new_uids(templates[kind], folder / f"{i:03d}-{kind}.dcm", kind))
    return samples


# --- the node as an admin runs it -------------------------------------------------------------------


def node_config(workdir: Path, *, workers: int, orthanc: LocalOrthanc | None, input_size: int,
                checkpoint: Path | None) -> dict[str, Any]:
    """The embedded default (SQLite jobs, SQLite broker), explicit where the benchmark needs it."""
    model: dict[str, Any] = {"device": "cpu", "tta": True, "untrained_input_size": input_size}
    if checkpoint is not None:
        model["checkpoint"] = str(checkpoint)
    else:
        model["allow_untrained"] = True
    config: dict[str, Any] = {
        "spool_dir": str(workdir / "spool"),
        "database_url": f"sqlite:///{workdir / 'jobs.sqlite'}",
        "broker_url": f"sqla+sqlite:///{workdir / 'broker.sqlite'}",
        "log_level": "INFO",
        "scp": {"ae_title": "PTXNODE", "bind_address": "127.0.0.1", "port": free_port()},
        "model": model,
        "worker": {"embedded_workers": workers},
        "http": {"enabled": False},
        # Every image gets a SEG: the latency is "C-STORE to SEG stored" for all of them.
        "outputs": {"negative": ["seg", "sr", "gsps", "sc"]},
    }
    if orthanc is not None:
        config["destinations"] = [{"name": "orthanc", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                                   "port": orthanc.dicom_port}]
    return config


class NodeServer(NodeProcess):
    """`ptx-node serve --config FILE` as a subprocess (its own session); node.toml, node.log."""

    stop_timeout = 40.0
    log_tail_on_error = 4000

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        super().__init__(workdir, config, name="node")

    def start(self, wait: bool = True, timeout: float = 120.0, interval: float = 0.1) -> Self:
        return super().start(wait=wait, timeout=timeout, interval=interval)

    def pids(self) -> list[int]:
        """The serve process and its embedded workers (for profilers)."""
        if self.proc is None:
            return []
        # Embedded workers run in their own sessions: walk the process tree, not the group.
        return process_tree(self.proc.pid)

    # job rows
    def jobs_by_sop(self) -> dict[str, Any]:
        return {j.sop_instance_uid: j for j in self.jobs()}

    def wait_terminal(self, sop_uids: Sequence[str], timeout: float, interval: float = 0.05) -> dict[str, Any]:
        from node.db import TERMINAL_STATUSES

        def done() -> dict[str, Any] | None:
            jobs = self.jobs_by_sop()
            if all(uid in jobs and jobs[uid].status in TERMINAL_STATUSES for uid in sop_uids):
                return {uid: jobs[uid] for uid in sop_uids}
            return None

        try:
            return wait_until(done, timeout, interval=interval, what=f"{len(sop_uids)} job(s) to end")
        except AssertionError:
            raise RuntimeError(f"jobs did not end in {timeout:.0f}s\n--- node log ---\n{self.log_text()[-4000:]}") from None


# --- Orthanc's change feed ------------------------------------------------------------------------------


class ChangeWatcher:
    """Records when each new instance appears in Orthanc (polls /changes every `interval` s).

    At 50 ms the poll costs about 2.5% of one core (Orthanc and this process together),
    and it runs during the model-only measurement too, so both sides carry it.
    """

    def __init__(self, orthanc: LocalOrthanc, interval: float = 0.05) -> None:
        self.orthanc = orthanc
        self.interval = interval
        self.seen: dict[str, float] = {}  # Orthanc instance id -> Unix time first seen
        self.polls = 0
        self._since = int(orthanc.get("/changes?last").get("Last", 0))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="orthanc-changes", daemon=True)

    def start(self) -> ChangeWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                page = self.orthanc.get(f"/changes?since={self._since}&limit=1000")
            except OSError:
                page = None
            now = time.time()
            if page:
                with self._lock:
                    for change in page.get("Changes", []):
                        if change.get("ChangeType") == "NewInstance":
                            self.seen.setdefault(change["ID"], now)
                    self._since = int(page.get("Last", self._since))
                    self.polls += 1
            if page and not page.get("Done", True):
                continue
            self._stop.wait(self.interval)

    def settle(self, timeout: float = 5.0) -> None:
        """Wait for two more complete polls, so everything stored so far has a time."""
        target = self.polls + 2
        wait_until(lambda: self.polls >= target, timeout, interval=self.interval, what="Orthanc change poll")

    def output_times(self) -> dict[str, float]:
        """SOP Instance UID -> first-seen time, for every instance seen (resolved after the fact)."""
        with self._lock:
            seen = dict(self.seen)
        out = {}
        for orthanc_id, when in seen.items():
            tags = self.orthanc.get(f"/instances/{orthanc_id}").get("MainDicomTags", {})
            out[str(tags.get("SOPInstanceUID", ""))] = when
        return out


# --- node-side timestamps ---------------------------------------------------------------------------

_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ (\S+) \[\d+\] (.*)$")
_WRITTEN = re.compile(r"^job (\d+): (?:positive|negative) \(.*\) in (\d+) ms")
_DELIVERED = re.compile(r"^job (\d+): delivered \d+ instance")


def log_marks(log_text: str) -> dict[int, dict[str, float]]:
    """Per job: when outputs were written and when delivery ended (node log, local time)."""
    marks: dict[int, dict[str, float]] = {}
    for line in log_text.splitlines():
        m = _LOG_LINE.match(line)
        if not m:
            continue
        when = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000.0
        message = m.group(4)
        if w := _WRITTEN.match(message):
            marks.setdefault(int(w.group(1)), {})["written"] = when
        elif d := _DELIVERED.match(message):
            marks.setdefault(int(d.group(1)), {}).setdefault("delivered_log", when)
    return marks


@dataclass
class JobTiming:
    """One image through the node; all times in seconds."""

    kind: str
    sop_instance_uid: str
    status: str
    latency_seg_s: float | None  # C-STORE start -> SEG seen in Orthanc
    latency_all_s: float | None  # C-STORE start -> last output (SC) seen in Orthanc
    send_s: float | None  # C-STORE start -> job row received (Orthanc sends, SCP decodes)
    intake_s: float | None  # received -> queued (spool fsync, row commit, broker publish)
    pickup_s: float | None  # queued -> started (broker poll, Celery dispatch, claim)
    inference_s: float | None  # the worker's model.predict (preprocess, network+TTA, postprocess)
    worker_other_s: float | None  # started -> outputs written, minus inference: decode, SEG/SC/PNG, DB
    delivery_s: float | None  # outputs written -> SEG seen in Orthanc
    done_s: float | None  # C-STORE start -> job row delivered_at (DONE)
    error: str | None = None


def job_timing(sample: Sample, t_send: float, job: Any, marks: dict[int, dict[str, float]],
               seen: dict[str, float]) -> JobTiming:
    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    received, queued = _epoch_utc(job.received_at), _epoch_utc(job.queued_at)
    started, delivered = _epoch_utc(job.started_at), _epoch_utc(job.delivered_at)
    seg_seen = seen.get(job.seg_sop_instance_uid or "")
    sc_seen = seen.get(job.sc_sop_instance_uid or "")
    written = marks.get(job.id, {}).get("written")
    inference = job.inference_ms / 1000.0 if job.inference_ms is not None else None
    all_seen = max(t for t in (seg_seen, sc_seen) if t is not None) if (seg_seen or sc_seen) else None
    worker_other = diff(started, written)
    if worker_other is not None and inference is not None:
        worker_other -= inference
    return JobTiming(
        kind=sample.kind, sop_instance_uid=sample.sop_instance_uid, status=str(job.status),
        latency_seg_s=diff(t_send, seg_seen), latency_all_s=diff(t_send, all_seen),
        send_s=diff(t_send, received), intake_s=diff(received, queued), pickup_s=diff(queued, started),
        inference_s=inference, worker_other_s=worker_other, delivery_s=diff(written, seg_seen),
        done_s=diff(t_send, delivered), error=job.error,
    )


# --- model only, and the node's output steps in-process --------------------------------------------------


@dataclass
class ModelTiming:
    kind: str
    predict_s: float  # Segmenter.predict(ds): decode + preprocess + network (TTA) + postprocess
    stages_s: dict[str, float] = field(default_factory=dict)


class InProcess:
    """The worker's model configuration and its output steps, run in this process."""

    def __init__(self, *, input_size: int, checkpoint: Path | None, threads: int, orthanc: LocalOrthanc,
                 workdir: Path) -> None:
        import torch

        from model import Segmenter
        from node.config import Destination, NodeConfig
        from node.outputs import AlgorithmInfo, OutputOptions

        torch.set_num_threads(threads)
        if checkpoint is not None:
            self.segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu", tta=True, num_threads=threads)
        else:
            self.segmenter = Segmenter.untrained(device="cpu", input_size=input_size, tta=True, num_threads=threads)
        self.threads = threads
        self.algorithm = AlgorithmInfo.from_segmenter(self.segmenter)
        self.options = OutputOptions(negative=["seg", "sr", "gsps", "sc"])
        self.destination = Destination(name="orthanc", ae_title=orthanc.ae_title, host="127.0.0.1",
                                       port=orthanc.dicom_port)
        self.config = NodeConfig(destinations=[self.destination])
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def runtime(self) -> str:
        return self.segmenter.runtime_name

    def warm_up(self, sample: Sample) -> None:
        """One untimed pass (runtime session, highdicom's first-call set-up), as the node's warm-up job."""
        self.measure(sample, stages=True)

    def measure(self, sample: Sample, *, stages: bool = True) -> ModelTiming:
        from model import source_image_from_dataset
        from node.delivery import send_dimse
        from node.outputs import build_overlay, build_seg, write_png

        ds = pydicom.dcmread(sample.path)
        t = time.perf_counter()
        prediction = self.segmenter.predict(ds, tta=True)
        timing = ModelTiming(sample.kind, time.perf_counter() - t)
        if not stages:
            return timing

        marks: dict[str, float] = {}

        def lap(name: str, start: float) -> float:
            now = time.perf_counter()
            marks[name] = now - start
            return now

        t = time.perf_counter()
        ds = pydicom.dcmread(sample.path)
        t = lap("dcmread", t)
        source = source_image_from_dataset(ds)
        t = lap("decode", t)
        seg = build_seg(ds, prediction.mask, algorithm=self.algorithm, series_instance_uid=generate_uid(),
                        sop_instance_uid=generate_uid(), options=self.options)
        t = lap("seg_build", t)
        seg_path = self.workdir / f"{sample.sop_instance_uid}-seg.dcm"
        _save_fsync(seg, seg_path)
        t = lap("seg_write", t)
        sc, rgb = build_overlay(ds, source.pixels, prediction, algorithm=self.algorithm,
                                series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
                                options=self.options)
        t = lap("sc_build", t)
        sc_path = self.workdir / f"{sample.sop_instance_uid}-sc.dcm"
        _save_fsync(sc, sc_path)
        t = lap("sc_write", t)
        write_png(rgb, self.workdir / f"{sample.sop_instance_uid}.png")
        t = lap("png_write", t)
        send_dimse(self.destination, [seg_path, sc_path], calling_ae_title="PTXBENCH", timeout_s=60)
        lap("send_seg_sc", t)
        timing.stages_s = marks
        return timing


def _save_fsync(ds: pydicom.Dataset, path: Path) -> None:
    # As node.durable.write_durably does: the node fsyncs its outputs before sending them.
    ds.save_as(path, enforce_file_format=True)
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


# --- phase 1+2: latency and model-only --------------------------------------------------------------------


def run_latency(args: argparse.Namespace, work: Path, templates: dict[str, Path]) -> dict[str, Any]:
    orthanc = LocalOrthanc(work / "orthanc").start()
    node = None
    try:
        config = node_config(work / "node", workers=1, orthanc=orthanc, input_size=args.input_size,
                             checkpoint=args.checkpoint)
        t = time.perf_counter()
        node = NodeServer(work / "node", config).start()
        orthanc.add_modality("ptx", node.ae_title, node.port)
        print(f"  node ready in {time.perf_counter() - t:.1f}s; Orthanc {orthanc.url}", flush=True)

        # Warm-up: one image through the node (model load, ONNX export/cache, first job), not counted.
        warm = copy_with_new_uids(templates["phantom"], work / "inputs" / "warmup.dcm", "phantom")
        t = time.perf_counter()
        orthanc.store_to_modality("ptx", [orthanc.upload(warm.path)])
        node.wait_terminal([warm.sop_instance_uid], timeout=args.timeout)
        print(f"  node warm-up image done in {time.perf_counter() - t:.1f}s", flush=True)
        inproc = InProcess(input_size=args.input_size, checkpoint=args.checkpoint, threads=args.threads,
                           orthanc=orthanc, workdir=work / "inprocess")
        t = time.perf_counter()
        inproc.warm_up(warm)
        print(f"  in-process model warm-up in {time.perf_counter() - t:.1f}s (runtime {inproc.runtime}, "
              f"{inproc.threads} threads)", flush=True)

        samples = latency_inputs(work / "inputs" / "sequential", args.n, args.phantom_size, templates)
        ids = [orthanc.upload(s.path) for s in samples]
        watcher = ChangeWatcher(orthanc).start()
        sends: list[tuple[Sample, float]] = []
        model: list[ModelTiming] = []
        for i, (sample, orthanc_id) in enumerate(zip(samples, ids, strict=True)):
            t_send = time.time()
            orthanc.store_to_modality("ptx", [orthanc_id])
            # Coarse poll: only decides when to go on; the SEG's time comes from the watcher.
            node.wait_terminal([sample.sop_instance_uid], timeout=args.timeout, interval=0.25)
            elapsed = time.time() - t_send
            watcher.settle()
            sends.append((sample, t_send))
            model.append(inproc.measure(sample, stages=not args.no_stages))
            print(f"  [{i + 1}/{len(samples)}] {sample.kind:8s} {sample.columns}x{sample.rows}: node {elapsed:.2f}s "
                  f"(job ended), model {model[-1].predict_s:.2f}s", flush=True)
        seen = watcher.output_times()
        watcher.stop()
        jobs = node.jobs_by_sop()
        marks = log_marks(node.log_text())
        sequential = [job_timing(s, t, jobs[s.sop_instance_uid], marks, seen) for s, t in sends]

        profile: dict[str, Any] | None = None
        if args.profile:
            profile = profile_worker(args, node, orthanc, work, templates)

        burst: dict[str, Any] | None = None
        if args.burst_n > 0:
            samples_b = latency_inputs(work / "inputs" / "burst", args.burst_n, args.phantom_size, templates)
            ids_b = [orthanc.upload(s.path) for s in samples_b]
            watcher = ChangeWatcher(orthanc).start()
            t_send = time.time()
            orthanc.store_to_modality("ptx", ids_b)
            t_stored = time.time()
            node.wait_terminal([s.sop_instance_uid for s in samples_b], timeout=args.timeout * len(samples_b),
                               interval=0.5)
            watcher.settle()
            seen_b = watcher.output_times()
            watcher.stop()
            jobs = node.jobs_by_sop()
            marks = log_marks(node.log_text())
            timings_b = [job_timing(s, t_send, jobs[s.sop_instance_uid], marks, seen_b) for s in samples_b]
            last = max((t.latency_seg_s for t in timings_b if t.latency_seg_s is not None), default=None)
            burst = {
                "timings": [asdict(t) for t in timings_b],
                "store_call_s": t_stored - t_send,
                "makespan_s": last,
                "images_per_s": (len(samples_b) / last) if last else None,
                "latency_seg_p50_s": _pct([t.latency_seg_s for t in timings_b if t.latency_seg_s is not None], 50),
                "latency_seg_p95_s": _pct([t.latency_seg_s for t in timings_b if t.latency_seg_s is not None], 95),
            }
            print(f"  burst of {len(samples_b)}: last SEG after {_fmt(last)}", flush=True)
        return {
            "sequential": [asdict(t) for t in sequential],
            "model": [asdict(m) for m in model],
            "burst": burst,
            "profile": profile,
            "runtime": inproc.runtime,
            "input_size": inproc.segmenter.input_size,
            "model_name": f"{inproc.segmenter.name} {inproc.segmenter.version}"
                     f"{' (untrained UNet++/EfficientNet-B4)' if inproc.segmenter.untrained else ''}",
            "threads": inproc.threads,
            "node_log_tail": node.log_text()[-3000:] if any(t.status != "DONE" for t in sequential) else None,
        }
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


# --- phase 3: intake ---------------------------------------------------------------------------------------------


def intake_inputs(folder: Path, count: int, size: int, rg1_copies: int, rg1: Path) -> tuple[int, int]:
    """`count` copies of one phantom (distinct SOP Instance UIDs) plus RG1_UNCR copies."""
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    ds = pydicom.dcmread(make_phantom_file(folder.parent / "intake-phantom.dcm", seed=12345, size=size)) if count else None
    for i in range(count):
        assert ds is not None
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"phantom-{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    for i in range(rg1_copies):
        total += copy_with_new_uids(rg1, folder / f"rg1-{i:02d}.dcm", "RG1_UNCR").nbytes
    return count + rg1_copies, total


def storescu(folder: Path, port: int, called_ae: str) -> float:
    """Send every file in `folder` in one association; returns the wall time."""
    cmd = ["storescu", "-aet", "BENCHSCU", "-aec", called_ae, "+sd", "+r", "-nh", "127.0.0.1", str(port), str(folder)]
    t = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr[-2000:]}")
    return elapsed


def intake_node_round(work: Path, folder: Path, warmup: Path, expected: int, input_size: int) -> float:
    config = node_config(work, workers=0, orthanc=None, input_size=input_size, checkpoint=None)
    node = NodeServer(work, config).start()
    try:
        storescu(warmup, node.port, node.ae_title)  # untimed: first-call imports, broker tables
        elapsed = storescu(folder, node.port, node.ae_title)
        jobs = node.jobs_by_sop()
    finally:
        node.stop()
    if len(jobs) != expected + 1:
        raise RuntimeError(f"node recorded {len(jobs)} jobs, expected {expected} + 1 warm-up")
    return elapsed


def durable_store(receiver: Any, event: Any) -> int:
    """FolderReceiver's store handler plus what durability costs and nothing else: fsync the file
    and its directory before answering (no database, no selection, no hashing)."""
    from node.status import StoreStatus

    try:
        ds = event.dataset
        ds.file_meta = event.file_meta
    except Exception:
        return StoreStatus.CANNOT_DECODE
    path = receiver.folder / f"{ds.SOPInstanceUID}.dcm"
    with open(path, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
        fh.flush()
        os.fsync(fh.fileno())
    dir_fd = os.open(receiver.folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    with receiver._lock:
        receiver.received.append(path)
    return StoreStatus.SUCCESS


def intake_bare_round(work: Path, folder: Path, warmup: Path, expected: int, *, durable: bool = False) -> float:
    from node.demo.receiver import FolderReceiver

    receiver = FolderReceiver(work / "received", ae_title="BARESCP")
    if durable:
        receiver._store = lambda event: durable_store(receiver, event)  # type: ignore[method-assign]
    receiver.start()
    try:
        storescu(warmup, receiver.port, receiver.ae_title)  # untimed, as for the node
        elapsed = storescu(folder, receiver.port, receiver.ae_title)
    finally:
        receiver.stop()
    if len(receiver.received) != expected + 1:
        raise RuntimeError(f"bare SCP stored {len(receiver.received)} files, expected {expected} + 1 warm-up")
    return elapsed


@dataclass(frozen=True)
class IntakeSet:
    name: str
    phantoms: int
    phantom_size: int
    rg1_copies: int


def run_intake(args: argparse.Namespace, work: Path, rg1: Path) -> dict[str, Any]:
    if shutil.which("storescu") is None:
        raise SystemExit("bench/e2e.py: dcmtk storescu is needed for the intake benchmark")
    sets = [IntakeSet("mixed", args.intake_count, args.intake_size, args.intake_rg1)]
    if args.intake_large > 0:
        # Radiograph-sized instances (RG1_UNCR: 1841x1955, 7.2 MB): the usual case for a CR/DX node.
        sets.append(IntakeSet("large", 0, args.intake_size, args.intake_large))
    return {s.name: run_intake_set(args, work / s.name, s, rg1) for s in sets}


def run_intake_set(args: argparse.Namespace, work: Path, spec: IntakeSet, rg1: Path) -> dict[str, Any]:
    folder = work / "files"
    count, nbytes = intake_inputs(folder, spec.phantoms, spec.phantom_size, spec.rg1_copies, rg1)
    # One instance sent before the timed set, to every receiver, in every round.
    warmup = copy_with_new_uids(rg1, work / "warmup" / "rg1-warmup.dcm", "RG1_UNCR").path.parent
    print(f"  set {spec.name!r}: {spec.phantoms} phantoms ({spec.phantom_size} px) + {spec.rg1_copies} RG1_UNCR = "
          f"{count} instances, {nbytes / 1e6:.0f} MB", flush=True)
    subprocess.run(["sync"], check=False)
    rounds: list[dict[str, float]] = []
    for r in range(args.repeats):
        receivers = ("node", "bare", "bare_fsync")
        order = receivers[r % 3:] + receivers[:r % 3]  # rotate who goes first
        times: dict[str, float] = {}
        for which in order:
            round_dir = work / f"{which}-{r}"
            if which == "node":
                times[which] = intake_node_round(round_dir, folder, warmup, count, args.input_size)
            else:
                times[which] = intake_bare_round(round_dir, folder, warmup, count, durable=which == "bare_fsync")
            shutil.rmtree(round_dir, ignore_errors=True)
            subprocess.run(["sync"], check=False)
        rounds.append(times)
        print(f"    round {r + 1}/{args.repeats}: node {count / times['node']:.1f} inst/s, "
              f"bare {count / times['bare']:.1f} inst/s, bare+fsync {count / times['bare_fsync']:.1f} inst/s",
              flush=True)

    def summary(which: str) -> dict[str, Any]:
        wall = [rd[which] for rd in rounds]
        med = statistics.median(wall)
        return {"wall_s": wall, "median_wall_s": med, "instances_per_s": count / med, "mb_per_s": nbytes / 1e6 / med}

    node, bare, bare_fsync = summary("node"), summary("bare"), summary("bare_fsync")
    result: dict[str, Any] = {
        "instances": count,
        "bytes": nbytes,
        "phantoms": spec.phantoms,
        "phantom_size": spec.phantom_size,
        "rg1_copies": spec.rg1_copies,
        "repeats": args.repeats,
        "node": node,
        "bare": bare,
        "bare_fsync": bare_fsync,
        "ratio": node["instances_per_s"] / bare["instances_per_s"],
        # Against a receiver that is as durable as the node (fsync file + directory) but does nothing else.
        "ratio_vs_bare_fsync": node["instances_per_s"] / bare_fsync["instances_per_s"],
        "ratio_per_round": [rd["bare"] / rd["node"] for rd in rounds],
    }
    if args.profile:
        result["profile"] = profile_intake(work / "profile", folder, warmup, count, args.input_size)
    return result


# --- profiles (py-spy, optional; untimed extra passes) ------------------------------------------------


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


class SpyRecorder:
    """`py-spy record` on a process and its children; raw collapsed stacks."""

    def __init__(self, pid: int, out: Path, rate: int = 100) -> None:
        self.out = out
        binary = py_spy()
        if binary is None:
            raise SystemExit("bench/e2e.py: --profile needs py-spy (pip install py-spy)")
        self.proc = subprocess.Popen(
            [binary, "record", "-p", str(pid), "--subprocesses", "--idle", "--threads", "-r", str(rate),
             "-f", "raw", "-o", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # py-spy attaches

    def stop(self) -> Path:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self.out


def spy_inclusive(raw: Path, within: str, top: int = 25) -> dict[str, Any]:
    """Inclusive share of each function called under `within`, over the samples that pass through it."""
    totals: dict[str, int] = {}
    samples = 0
    if not raw.exists():
        return {"samples": 0, "functions": []}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if within not in stack or not count.isdigit():
            continue
        samples += int(count)
        seen: set[str] = set()
        frames = [re.sub(r" \(.*?:\d+\)$", "", frame) for frame in stack.split(";")]
        below = next(i for i, frame in enumerate(frames) if within in frame)
        for name in frames[below + 1:]:  # what `within` spends its time in
            if name not in seen:
                seen.add(name)
                totals[name] = totals.get(name, 0) + int(count)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return {"samples": samples, "functions": [(name, round(100.0 * n / samples, 1)) for name, n in ranked]}


def profile_worker(args: argparse.Namespace, node: NodeServer, orthanc: LocalOrthanc, work: Path,
                   templates: dict[str, Path]) -> dict[str, Any]:
    """py-spy on the embedded worker while a few more images go through, one at a time."""
    samples = latency_inputs(work / "inputs" / "profile", 2 * len(KINDS), args.phantom_size, templates)
    ids = [orthanc.upload(s.path) for s in samples]
    spy = SpyRecorder(node.proc.pid, work / "worker-spy.txt")
    for sample, orthanc_id in zip(samples, ids, strict=True):
        orthanc.store_to_modality("ptx", [orthanc_id])
        node.wait_terminal([sample.sop_instance_uid], timeout=args.timeout, interval=0.25)
    raw = spy.stop()
    return {"images": len(samples), "raw": str(raw), "process_job": spy_inclusive(raw, "process_job", top=40)}


def profile_intake(work: Path, folder: Path, warmup: Path, count: int, input_size: int) -> dict[str, Any]:
    config = node_config(work, workers=0, orthanc=None, input_size=input_size, checkpoint=None)
    node = NodeServer(work, config).start()
    try:
        storescu(warmup, node.port, node.ae_title)
        spy = SpyRecorder(node.proc.pid, work.parent / "intake-spy.txt", rate=200)
        elapsed = storescu(folder, node.port, node.ae_title)
        raw = spy.stop()
    finally:
        node.stop()
    shutil.rmtree(work, ignore_errors=True)
    return {"wall_s_under_profiler": elapsed, "instances": count, "raw": str(raw),
            "c_store_handler": spy_inclusive(raw, "StoreSCP._handle_store"),
            "enqueuer_thread": spy_inclusive(raw, "Enqueuer._run", top=12),
            "enqueuer_ablation": enqueuer_ablation(work, folder, warmup, count, input_size)}


_ablation_broker_path: Path | None = None


def _ablation_broker() -> Path:
    global _ablation_broker_path
    if _ablation_broker_path is None:
        _ablation_broker_path = Path(tempfile.mkdtemp(prefix="ptx-e2e-broker-")) / "broker.sqlite"
    return _ablation_broker_path


def queued_count(database_url: str) -> int:
    from sqlalchemy import func, select

    from node.db import Job, JobStatus, get_sessionmaker

    with get_sessionmaker(database_url)() as session:
        return int(session.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)) or 0)


def enqueuer_ablation(work: Path, folder: Path, warmup: Path, count: int, input_size: int,
                      rounds: int = 2) -> dict[str, Any]:
    """The node's StoreSCP in this process, with and without its Enqueuer thread (broker publish +
    QUEUED mark): how much the hand-off to the broker costs the C-STORE path."""
    from node.config import load_config
    from node.db import dispose_engines, migrate
    from node.scp import Enqueuer, StoreSCP
    from node.tasks import configure_app

    rates: dict[str, list[float]] = {"with_enqueuer": [], "without_enqueuer": []}
    for r in range(rounds):
        for variant in (("with_enqueuer", "without_enqueuer") if r % 2 == 0 else ("without_enqueuer", "with_enqueuer")):
            round_dir = work / f"ablation-{variant}-{r}"
            raw = node_config(round_dir, workers=0, orthanc=None, input_size=input_size, checkpoint=None)
            raw["scp"]["port"] = 0
            # One broker file for every round in this process: Celery's producer pool stays bound to the
            # first broker URL it published to, so a fresh file per round would make every publish fail.
            raw["broker_url"] = f"sqla+sqlite:///{_ablation_broker()}"
            config = load_config(overrides=raw)
            migrate(config.database_url)
            configure_app(config)
            enqueuer = Enqueuer(config) if variant == "with_enqueuer" else None
            if enqueuer is not None:
                enqueuer.start()
            scp = StoreSCP(config, enqueuer)
            scp.start()
            try:
                storescu(warmup, scp.port, config.scp.ae_title)
                rates[variant].append(count / storescu(folder, scp.port, config.scp.ae_title))
                if enqueuer is not None:
                    enqueuer.stop()
                    enqueuer = None
                    if queued_count(config.database_url) != count + 1:
                        raise RuntimeError("the Enqueuer did not publish every job; the ablation is not valid")
            finally:
                scp.stop()
                if enqueuer is not None:
                    enqueuer.stop()
                dispose_engines()
                shutil.rmtree(round_dir, ignore_errors=True)
    return {k: {"instances_per_s": v, "median": statistics.median(v)} for k, v in rates.items()}


# --- report -----------------------------------------------------------------------------------------------------


def summarize_latency(result: dict[str, Any]) -> dict[str, Any]:
    seq = result["sequential"]
    model = result["model"]
    lat = [t["latency_seg_s"] for t in seq if t["latency_seg_s"] is not None]
    pred = [m["predict_s"] for m in model]
    p50_lat, p50_model = _pct(lat, 50), _pct(pred, 50)
    paired = [
        (t["latency_seg_s"] - m["predict_s"]) / m["predict_s"]
        for t, m in zip(seq, model, strict=True) if t["latency_seg_s"] is not None
    ]
    breakdown = {
        key: _median(t[key] for t in seq)
        for key in ("send_s", "intake_s", "pickup_s", "inference_s", "worker_other_s", "delivery_s",
                    "latency_seg_s", "latency_all_s", "done_s")
    }
    stage_keys = sorted({k for m in model for k in m["stages_s"]}, key=lambda k: list(model[0]["stages_s"]).index(k)
                        if model and k in model[0]["stages_s"] else 99)
    stages = {k: _median(m["stages_s"].get(k) for m in model) for k in stage_keys}
    per_kind = {}
    for kind in KINDS:
        lk = [t["latency_seg_s"] for t in seq if t["kind"] == kind and t["latency_seg_s"] is not None]
        mk = [m["predict_s"] for m in model if m["kind"] == kind]
        if lk:
            per_kind[kind] = {"n": len(lk), "latency_seg_p50_s": _pct(lk, 50), "model_p50_s": _pct(mk, 50),
                              "inference_p50_s": _median(t["inference_s"] for t in seq if t["kind"] == kind),
                              "worker_other_p50_s": _median(t["worker_other_s"] for t in seq if t["kind"] == kind),
                              "delivery_p50_s": _median(t["delivery_s"] for t in seq if t["kind"] == kind)}
    return {
        "n": len(seq),
        "done": sum(1 for t in seq if t["status"] == "DONE"),
        "latency_seg_p50_s": p50_lat,
        "latency_seg_p95_s": _pct(lat, 95),
        "latency_all_p50_s": _pct([t["latency_all_s"] for t in seq if t["latency_all_s"] is not None], 50),
        "model_p50_s": p50_model,
        "model_p95_s": _pct(pred, 95),
        "overhead": (p50_lat - p50_model) / p50_model if p50_lat and p50_model else None,
        "overhead_paired_median": _median(paired),
        "overhead_goal": OVERHEAD_GOAL,
        "breakdown_median_s": breakdown,
        "inprocess_stages_median_s": stages,
        "per_kind": per_kind,
    }


def print_report(report: dict[str, Any]) -> None:
    lat = report.get("latency_summary")
    if lat:
        print("\n== Latency: Orthanc -> node -> Orthanc, sequential (C-STORE start -> SEG stored in Orthanc)")
        print(f"  images {lat['n']} (DONE {lat['done']}), model {report['latency']['model_name']}, runtime "
              f"{report['latency']['runtime']}, {report['latency']['threads']} threads, input "
              f"{report['latency']['input_size']} px, TTA hflip")
        print(f"  {'':30s} {'p50':>8s} {'p95':>8s}")
        print(f"  {'node latency (to SEG)':30s} {_fmt(lat['latency_seg_p50_s']):>8s} {_fmt(lat['latency_seg_p95_s']):>8s}")
        print(f"  {'node latency (to SC, all out)':30s} {_fmt(lat['latency_all_p50_s']):>8s}")
        print(f"  {'model only: predict(ds)':30s} {_fmt(lat['model_p50_s']):>8s} {_fmt(lat['model_p95_s']):>8s}")
        ok = lat["overhead"] is not None and lat["overhead"] < OVERHEAD_GOAL
        print(f"  overhead (p50 latency - p50 model) / p50 model = {_fmt(100 * lat['overhead'], '%', 1)} "
              f"(paired per image: {_fmt(100 * (lat['overhead_paired_median'] or 0), '%', 1)}); "
              f"goal < {OVERHEAD_GOAL:.0%}: {'MET' if ok else 'MISSED'}")
        print("\n  where the time goes (median per image, from job rows + node log):")
        names = {
            "send_s": "C-STORE start -> row received", "intake_s": "received -> queued (fsync, commit, publish)",
            "pickup_s": "queued -> started (queue pickup)", "inference_s": "inference (row inference_ms)",
            "worker_other_s": "decode + SEG/SC/PNG + DB (worker)", "delivery_s": "outputs written -> SEG in Orthanc",
            "latency_seg_s": "total to SEG", "done_s": "total to job DONE",
        }
        for key, label in names.items():
            print(f"    {label:44s} {_fmt(lat['breakdown_median_s'].get(key)):>8s}")
        if lat["inprocess_stages_median_s"]:
            print("  the worker's non-model steps timed in-process (median):")
            for key, value in lat["inprocess_stages_median_s"].items():
                print(f"    {key:44s} {_fmt(value):>8s}")
        print("  per kind (p50): latency / model / overhead | worker: inference / other / delivery")
        for kind, v in lat["per_kind"].items():
            over = (v["latency_seg_p50_s"] - v["model_p50_s"]) / v["model_p50_s"] if v["model_p50_s"] else None
            print(f"    {kind:10s} n={v['n']:2d} {_fmt(v['latency_seg_p50_s'])} / {_fmt(v['model_p50_s'])} / "
                  f"{_fmt(None if over is None else 100 * over, '%', 0)} | {_fmt(v['inference_p50_s'])} / "
                  f"{_fmt(v['worker_other_p50_s'])} / {_fmt(v['delivery_p50_s'])}")
        burst = report["latency"].get("burst")
        if burst:
            print(f"\n  burst (all {len(burst['timings'])} in one call): latency to SEG from the call's start "
                  f"p50 {_fmt(burst['latency_seg_p50_s'])}, p95 {_fmt(burst['latency_seg_p95_s'])}; "
                  f"last SEG at {_fmt(burst['makespan_s'])} = {_fmt(burst['images_per_s'], ' img/s')}")
    for name, intake in (report.get("intake") or {}).items():
        print(f"\n== Intake, set {name!r}: {intake['instances']} instances ({intake['phantoms']} phantoms "
              f"{intake['phantom_size']} px + {intake['rg1_copies']} RG1_UNCR), {intake['bytes'] / 1e6:.0f} MB; "
              f"storescu, one association, median of {intake['repeats']}")
        print(f"  {'receiver':40s} {'inst/s':>8s} {'MB/s':>8s}")
        for key, label in (("node", "ptx-node SCP (fsync + job row commit)"),
                           ("bare", "bare pynetdicom SCP (FolderReceiver)"),
                           ("bare_fsync", "same + fsync file and directory")):
            v = intake[key]
            print(f"  {label:40s} {v['instances_per_s']:8.1f} {v['mb_per_s']:8.1f}")
        ok = intake["ratio"] >= INTAKE_GOAL
        print(f"  ratio node/bare = {intake['ratio']:.2f}x (per round {', '.join(f'{r:.2f}' for r in intake['ratio_per_round'])}); "
              f"goal >= {INTAKE_GOAL}x: {'MET' if ok else 'MISSED'}; node / (bare + fsync) = "
              f"{intake['ratio_vs_bare_fsync']:.2f}x")
        if intake.get("profile"):
            _print_profile("py-spy, node SCP C-STORE handler (inclusive % of handler time)",
                           intake["profile"]["c_store_handler"], 15)
            ablation = intake["profile"]["enqueuer_ablation"]
            print("  in-process StoreSCP, inst/s (median): with its Enqueuer thread "
                  f"{ablation['with_enqueuer']['median']:.1f}, without {ablation['without_enqueuer']['median']:.1f}")
    profile = (report.get("latency") or {}).get("profile")
    if profile:
        _print_profile("py-spy, worker process_job (inclusive % of job time)", profile["process_job"], 30)


def _print_profile(title: str, data: dict[str, Any], top: int) -> None:
    print(f"\n  {title}, {data['samples']} samples:")
    for name, share in data["functions"][:top]:
        print(f"    {share:5.1f}%  {name}")


def _setup_argparser(args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="radiographs per latency mode (after one warm-up)")
    parser.add_argument("--input-size", type=int, default=512, help="network input size (untrained network)")
    parser.add_argument("--checkpoint", type=Path, help="model checkpoint directory (default: untrained UNet++/B4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="model threads in-process (default: torch's default, as the worker uses)")
    parser.add_argument("--phantom-size", type=int, default=1024, help="side of the synthetic phantom radiographs")
    parser.add_argument("--burst-n", type=int, default=10, help="radiographs sent all at once (0: skip)")
    parser.add_argument("--no-stages", action="store_true", help="skip the in-process timing of the output steps")
    parser.add_argument("--intake-count", type=int, default=200, help="phantom copies for the intake rate")
    parser.add_argument("--intake-size", type=int, default=512, help="side of the intake phantom")
    parser.add_argument("--intake-rg1", type=int, default=4, help="RG1_UNCR copies added to the mixed intake set")
    parser.add_argument("--intake-large", type=int, default=20,
                        help="RG1_UNCR copies in a second, radiograph-sized intake set (0: skip)")
    parser.add_argument("--profile", action="store_true",
                        help="also run py-spy on the worker and the SCP (extra, untimed passes)")
    parser.add_argument("--repeats", type=int, default=3, help="intake rounds (median reported)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-intake", action="store_true")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one job")
    parser.add_argument("--workdir", type=Path, help="keep inputs, logs and databases here (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny run (n=2, 256 px, 20 intake files, 1 round)")
    parsed = parser.parse_args(args)
    if parsed.smoke:
        parsed.n, parsed.burst_n, parsed.input_size, parsed.phantom_size = 2, 2, 256, 512
        parsed.intake_count, parsed.intake_rg1, parsed.intake_large, parsed.repeats = 20, 1, 2, 1
    if parsed.n < 1 or parsed.repeats < 1 or parsed.intake_count < 1:
        parser.error("--n, --repeats and --intake-count must be at least 1")
    if parsed.input_size % 32:
        parser.error("--input-size must be a multiple of 32")
    if parsed.checkpoint is not None:
        parsed.checkpoint = parsed.checkpoint.resolve()
    return parsed


def main(argv: Sequence[str] | None = None) -> int:
    args = _setup_argparser(argv)
    # Source headers with odd values (cat.dcm's one-word referring physician) make highdicom chatty.
    warnings.filterwarnings("ignore", category=UserWarning, module="highdicom")
    import torch

    if args.threads is None:
        args.threads = torch.get_num_threads()
    if not LocalOrthanc.available() and not args.skip_latency:
        raise SystemExit("bench/e2e.py: Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join(["python", "bench/e2e.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    print(f"machine: {report['machine']['cpu_model']}, {report['machine']['cpus']} CPUs, "
          f"load {report['machine']['loadavg_at_start']}", flush=True)
    cleanup = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="ptx-e2e-", dir=os.environ.get("TMPDIR"))) if cleanup else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        templates = {
            "RG1_UNCR": pydicom_file("RG1_UNCR.dcm"),
            "cat": deid_file("animals/cat.dcm"),
            "phantom": make_phantom_file(work / "inputs" / "phantom-template.dcm", seed=7, size=args.phantom_size),
        }
        if not args.skip_latency:
            print(f"latency: N={args.n}, input {args.input_size} px, "
                  f"{'checkpoint ' + str(args.checkpoint) if args.checkpoint else 'untrained UNet++/B4'}", flush=True)
            report["latency"] = run_latency(args, work / "latency", templates)
            report["latency_summary"] = summarize_latency(report["latency"])
        if not args.skip_intake:
            print(f"intake: storescu -> node SCP vs bare SCP, {args.repeats} rounds per set", flush=True)
            report["intake"] = run_intake(args, work / "intake", templates["RG1_UNCR"])
    finally:
        if cleanup:
            shutil.rmtree(work, ignore_errors=True)
        if _ablation_broker_path is not None:
            shutil.rmtree(_ablation_broker_path.parent, ignore_errors=True)
    report["elapsed_s"] = time.perf_counter() - started
    report["machine"]["loadavg_at_end"] = list(os.getloadavg())
    print_report(report)
    print(f"\ntotal {report['elapsed_s']:.0f}s; load average at end {report['machine']['loadavg_at_end']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
