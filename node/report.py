"""Plain-text tables for the admin: the job list of `ptx-node jobs` and the demo, the
worker list of `ptx-node workers` (here, not in the CLI, so the demo needs no CLI import)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from node.reasons import format_reason

__all__ = ["format_job_table", "format_table"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _fmt_latency(job: Any) -> str:
    end = job.delivered_at or job.finished_at
    if not end:
        return ""
    return f"{(end - job.received_at).total_seconds():.1f}s"


def format_job_table(jobs: list[Any]) -> str:
    header = ("ID", "STATUS", "RECEIVED (UTC)", "MOD", "FROM", "RESULT", "MAX P", "AREA mm2", "LATENCY",
              "WORKER", "REASON")
    rows = []
    untrained = False
    for job in jobs:
        if job.positive is None:
            result = ""
        else:
            result = "PTX" if job.positive else "neg"
            if job.untrained:
                result += " (UNTRAINED)"
                untrained = True
        # The lease holder of a job in progress: the worker to look at when it hangs.
        holder = job.worker or "" if job.status in ("RUNNING", "SENDING") and job.lease_until else ""
        rows.append((
            str(job.id), job.status, job.received_at.strftime("%Y-%m-%d %H:%M:%S"), job.modality or "",
            job.calling_ae or job.source, result,
            "" if job.max_probability is None else f"{job.max_probability:.2f}",
            "" if job.area_mm2 is None else f"{job.area_mm2:.0f}",
            _fmt_latency(job), holder, format_reason(job.reason_code, job.error)[:90],
        ))
    lines = [format_table(header, rows)]
    if not rows:
        lines.append("(no jobs)")
    if untrained:
        lines.append("(UNTRAINED): made by an untrained network (--allow-untrained, the demo); not a finding")
    return "\n".join(lines)
