"""`ptx-node demo`: the whole path on one machine, results on screen.

Starts a local receiving PACS (Orthanc when installed, else the built-in folder
receiver), the node on its embedded default (SQLite jobs, SQLite broker, one
worker), sends sample radiographs, waits for the jobs to finish, prints the job
table and writes the overlays as PNG files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE

from node.config import write_config_file
from node.demo.pacs import LocalOrthanc, free_port, wait_until
from node.demo.receiver import FolderReceiver
from node.proc import die_with_parent

__all__ = ["run_demo"]


def _default_inputs() -> list[Path]:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    if path is None:
        raise SystemExit("ptx-node demo: pydicom-data is not installed and no input files were given")
    return [Path(path)]


def _send_pynetdicom(paths: list[Path], port: int, ae_title: str) -> None:
    ae = AE(ae_title="DEMOSCU")
    datasets = [dcmread(p) for p in paths]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise SystemExit("ptx-node demo: could not associate with the node")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status and "Status" in status else -1
            print(f"  sent {Path(ds.filename).name}: status 0x{code:04X}")
    finally:
        assoc.release()


def _returned_seg(job: Any, pacs: Any, use_orthanc: bool, out: Path) -> Any:
    """The SEG of ``job`` as the PACS received it, or None."""
    from io import BytesIO

    uid = job.seg_sop_instance_uid
    if not uid:
        return None
    if use_orthanc:
        ids = pacs.find_sop(uid)
        return dcmread(BytesIO(pacs.instance_file(ids[0]))) if ids else None
    path = out / "received" / f"{uid}.dcm"
    return dcmread(path) if path.is_file() else None


def _phantom_dice(known_mask: Path, jobs: list[Any], pacs: Any, use_orthanc: bool, out: Path) -> str:
    """``phantom Dice vs known mask: 0.NN`` for the SEG that came back, at the phantom's resolution."""
    import cv2
    import highdicom as hd
    import numpy as np

    truth = cv2.imread(str(known_mask), cv2.IMREAD_GRAYSCALE)
    if truth is None:
        return f"phantom Dice vs known mask: n/a (cannot read {known_mask})"
    truth = truth > 127
    job = next((j for j in jobs if j.sop_instance_uid == known_mask.stem), None)
    if job is None:
        return f"phantom Dice vs known mask: n/a (no job for SOP Instance {known_mask.stem})"
    seg_dataset = _returned_seg(job, pacs, use_orthanc, out)
    if seg_dataset is None:
        predicted = np.zeros_like(truth)  # no SEG: the node found nothing
        note = " (no SEG came back: nothing found)"
    else:
        seg = hd.seg.Segmentation.from_dataset(seg_dataset)
        predicted = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[job.sop_instance_uid], segment_numbers=[1], ignore_spatial_locations=True,
        )[0, :, :, 0].astype(bool)
        note = ""
    if predicted.shape != truth.shape:
        return f"phantom Dice vs known mask: n/a (SEG is {predicted.shape}, mask {truth.shape})"
    total = int(predicted.sum()) + int(truth.sum())
    dice = 1.0 if total == 0 else 2.0 * int((predicted & truth).sum()) / total
    return f"phantom Dice vs known mask: {dice:.2f}{note}"


def _write_config(out: Path, scp_port: int, destination: dict[str, Any], checkpoint: str | None) -> Path:
    model: dict[str, Any] = {"device": "auto", "allow_untrained": not checkpoint}
    if checkpoint:
        model["checkpoint"] = Path(checkpoint).resolve()
    return write_config_file(out / "node.toml", {
        "spool_dir": out / "spool",
        "database_url": f"sqlite:///{out / 'jobs.sqlite'}",
        "broker_url": f"sqla+sqlite:///{out / 'broker.sqlite'}",
        "scp": {"ae_title": "PTXNODE", "port": scp_port},
        "model": model,
        "http": {"port": 0},
        "destinations": [destination],
    })


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    inputs = [Path(p) for p in args.inputs] or _default_inputs()
    use_orthanc = LocalOrthanc.available() and not args.no_orthanc

    pacs: Any
    if use_orthanc:
        pacs = LocalOrthanc(out / "orthanc").start()
        destination = {"name": "orthanc", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
        print(f"PACS: Orthanc at {pacs.url} (DICOM {pacs.ae_title}@127.0.0.1:{pacs.dicom_port})")
    else:
        pacs = FolderReceiver(out / "received", ae_title="DEMOPACS").start()
        destination = {"name": "receiver", "ae_title": "DEMOPACS", "host": "127.0.0.1", "port": pacs.port}
        print(f"PACS: built-in receiver writing to {out / 'received'} (Orthanc not installed)")

    scp_port = free_port()
    config_path = _write_config(out, scp_port, destination, args.checkpoint)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTX_NODE_")}
    log_path = out / "node.log"
    with open(log_path, "w") as log:
        node = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent,
        )
    try:
        wait_until(lambda: "ptx-node ready" in log_path.read_text() or node.poll() is not None, 180,
                   what="the node to start")
        if node.poll() is not None:
            print(log_path.read_text()[-3000:], file=sys.stderr)
            return 1
        print(f"node: PTXNODE@127.0.0.1:{scp_port}, config {config_path}, log {log_path}")
        if use_orthanc:
            pacs.add_modality("ptx", "PTXNODE", scp_port)
            ids = [pacs.upload(p) for p in inputs]
            print(f"routing {len(ids)} image(s) from Orthanc to the node (/modalities/ptx/store)")
            pacs.store_to_modality("ptx", ids)
        else:
            print(f"sending {len(inputs)} image(s) to the node")
            _send_pynetdicom(inputs, scp_port, "PTXNODE")

        from sqlalchemy import select

        from node.db import TERMINAL_STATUSES, Job, get_sessionmaker
        from node.report import format_job_table

        factory = get_sessionmaker(f"sqlite:///{out / 'jobs.sqlite'}")

        def finished() -> list[Job] | None:
            with factory() as session:
                jobs = list(session.scalars(select(Job).order_by(Job.id)))
            return jobs if len(jobs) >= len(inputs) and all(j.status in TERMINAL_STATUSES for j in jobs) else None

        started = time.monotonic()
        jobs = wait_until(finished, args.timeout, interval=0.5, what="the jobs to finish")
        print(f"\nall jobs finished in {time.monotonic() - started:.1f}s\n")
        print(format_job_table(jobs))
        print()
        for job in jobs:
            png = Path(job.output_dir or "") / "overlay.png"
            if job.output_dir and png.exists():
                target = out / f"overlay-job{job.id}.png"
                shutil.copyfile(png, target)
                print(f"overlay for job {job.id}: {target}")
        if use_orthanc:
            for job in jobs:
                if job.study_instance_uid:
                    series = pacs.study_series(job.study_instance_uid)
                    names = ", ".join(
                        f"{s['MainDicomTags'].get('Modality', '?')} {s['MainDicomTags'].get('SeriesDescription', '')!r}"
                        for s in series
                    )
                    print(f"Orthanc study of job {job.id}: {len(series)} series: {names}")
            print(f"browse them in Orthanc Explorer: {pacs.url}/app/explorer.html (stopped when the demo ends)")
        else:
            print(f"received by the PACS: {sorted(p.name for p in (out / 'received').glob('*.dcm'))}")
        for known_mask in getattr(args, "known_mask", None) or []:
            print(_phantom_dice(Path(known_mask), jobs, pacs, use_orthanc, out))
        print(f"\njobs database: {out / 'jobs.sqlite'}  (try: ptx-node jobs --config {config_path})")
        return 0 if all(j.status != "FAILED" for j in jobs) else 1
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        pacs.stop()
