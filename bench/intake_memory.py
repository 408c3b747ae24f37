"""Intake memory: the node's SCP receiving radiograph-sized instances with pynetdicom's
chunked receive (the default: each data set streamed to a file in the spool's
filesystem, header read with large values deferred, pixel hash streamed) vs the same
SCP with chunked receive off (the data set held in memory, decoded, and encoded again
for the spool: what the node did before).

Both run in one process, taking turns, on the same files sent by dcmtk ``storescu`` in
one association; the figure is the peak of Python-allocated memory (``tracemalloc``)
while the association runs, and the wall time. Database and fsync are the same in both.

    python bench/intake_memory.py                  # 8 copies of deid-data's cat.dcm (2614x3072, 16 MB)
    python bench/intake_memory.py --smoke          # 2 copies, 1 round
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import _config  # noqa: E402

from node.config import load_config  # noqa: E402
from node.db import migrate  # noqa: E402
from node.scp import StoreSCP  # noqa: E402


def _inputs(folder: Path, copies: int) -> int:
    import deid_data  # type: ignore[import-untyped]

    source = next(Path(deid_data.__file__).parent.rglob("cat.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(copies):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"cat-{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def _round(work: Path, files: Path, *, chunked: bool, tag: str, trace: bool) -> dict[str, float]:
    config = load_config(None, environ={}, overrides={
        "spool_dir": str(work / tag / "spool"), "database_url": f"sqlite:///{work / tag / 'jobs.sqlite'}",
        "scp": {"port": 0}, "disk": {"min_free_mb": 0, "min_free_percent": 0, "database_reserve_mb": 0}})
    migrate(config.database_url)
    scp = StoreSCP(config, enqueuer=None)
    scp.start()
    _config.STORE_RECV_CHUNKED_DATASET = chunked  # start() turns it on; the baseline turns it off
    try:
        if trace:  # tracing slows Python down: timed rounds run without it
            tracemalloc.start()
            baseline = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        run = subprocess.run(["storescu", "-aec", "PTXNODE", "+sd", "-nh", "127.0.0.1", str(scp.port), str(files)],
                             capture_output=True, text=True, timeout=1800)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] - baseline if trace else float("nan")
        tracemalloc.stop()
        if run.returncode != 0:
            raise RuntimeError(f"storescu failed: {run.stderr[-2000:]}")
    finally:
        scp.stop()
        _config.STORE_RECV_CHUNKED_DATASET = False
    return {"peak_mb": peak / 2**20} if trace else {"seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        args.copies, args.repeats = 2, 1
    with tempfile.TemporaryDirectory(prefix="ptx-intake-mem-") as tmp:
        work = Path(tmp)
        size = _inputs(work / "files", args.copies)
        rounds: dict[str, dict[str, list[float]]] = {"chunked": {"peak_mb": [], "seconds": []},
                                                     "in_memory": {"peak_mb": [], "seconds": []}}
        for r in range(args.repeats):
            order = ("chunked", "in_memory") if r % 2 == 0 else ("in_memory", "chunked")
            for trace in (True, False):
                for name in order:
                    out = _round(work, work / "files", chunked=name == "chunked", tag=f"{name}-{r}-{trace}",
                                 trace=trace)
                    for key, value in out.items():
                        rounds[name][key].append(value)
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "files": args.copies, "file_mb": size / 2**20 / args.copies, "repeats": args.repeats,
        **{name: {**{k: statistics.median(v) for k, v in rs.items()}, "rounds": rs} for name, rs in rounds.items()},
    }
    result["peak_ratio_in_memory_over_chunked"] = result["in_memory"]["peak_mb"] / max(result["chunked"]["peak_mb"], 1e-9)
    result["time_ratio_in_memory_over_chunked"] = result["in_memory"]["seconds"] / result["chunked"]["seconds"]
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
