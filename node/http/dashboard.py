"""The admin status page: one read of the database into a snapshot, rendered as
plain HTML (no scripts, auto-refresh). Jobs carry no patient names; only the
patient ID hash exists in the database, and the page does not even show that.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.config import NodeConfig
from node.db import TERMINAL_STATUSES, Association, Job, JobStatus, WorkerRecord, utcnow
from node.disk import SpoolSpace, spool_space
from node.metrics import UNABLE_WINDOW_S, WORKER_ALIVE_S
from node.reasons import format_reason

__all__ = ["Snapshot", "WorkerView", "percentile", "render_status_page", "take_snapshot"]

WINDOW = dt.timedelta(hours=1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclasses.dataclass(frozen=True)
class WorkerView:
    name: str
    device: str | None
    model: str | None
    last_seen: dt.datetime
    jobs_done: int
    alive: bool
    serving_error: str | None = None
    # False: the worker runs with delivery/outputs/destinations that differ from the node's.
    same_settings: bool | None = None


@dataclasses.dataclass(frozen=True)
class Snapshot:
    taken_at: dt.datetime
    counts: dict[str, int]
    queue_depth: int
    latest_jobs: list[Job]
    workers: list[WorkerView]
    associations: list[Association]
    finished_last_hour: int
    done_last_hour: int
    latency_p50_s: float | None  # received -> delivered (or finished), DONE jobs of the last hour
    latency_p95_s: float | None
    inference_p50_ms: float | None
    inference_p95_ms: float | None
    model_served: str
    spool_space: SpoolSpace | None = None

    @property
    def workers_alive(self) -> int:
        return sum(1 for w in self.workers if w.alive)

    @property
    def cannot_serve(self) -> str | None:
        """Why no worker can serve, when none can and one said why (else None)."""
        if self.workers_alive:
            return None
        recent = self.taken_at - dt.timedelta(seconds=UNABLE_WINDOW_S)
        for worker in self.workers:  # newest first
            if worker.serving_error and worker.last_seen >= recent:
                return f"{worker.name}: {worker.serving_error}"
        return None


def _model_label(name: str | None, version: str | None, sha: str | None, untrained: bool | None = None) -> str:
    label = " ".join(p for p in (name, version) if p) or "unknown model"
    if sha:
        label += f" (sha256 {sha[:12]})"
    if untrained:
        label += " UNTRAINED"
    return label


def _model_served(config: NodeConfig, workers: list[WorkerView], latest: list[Job]) -> str:
    alive = sorted({w.model for w in workers if w.alive and w.model})
    if alive:
        return ", ".join(alive)
    for job in latest:
        if job.model_name:
            return _model_label(job.model_name, job.model_version, job.checkpoint_sha256, job.untrained) + " (last job)"
    if config.model.checkpoint is not None:
        return f"checkpoint {config.model.checkpoint} (no worker alive)"
    return "untrained network (--allow-untrained)" if config.model.allow_untrained else "no checkpoint configured"


def take_snapshot(session: Session, config: NodeConfig, *, latest: int = 50, now: dt.datetime | None = None) -> Snapshot:
    now = now or utcnow()
    counts = {s.value: 0 for s in JobStatus}
    counts.update(dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all()))
    latest_jobs = list(session.scalars(select(Job).order_by(Job.id.desc()).limit(latest)))
    alive_since = now - dt.timedelta(seconds=WORKER_ALIVE_S)
    digest = config.shared_settings_digest()
    workers = [
        WorkerView(
            name=w.name,
            device=w.device,
            model=_model_label(w.model_name, w.model_version, w.checkpoint_sha256) if w.model_name else None,
            last_seen=w.last_seen,
            jobs_done=w.jobs_done or 0,
            alive=w.last_seen >= alive_since and not w.serving_error,
            serving_error=w.serving_error,
            same_settings=None if w.settings_digest is None else w.settings_digest == digest,
        )
        for w in session.scalars(select(WorkerRecord).order_by(WorkerRecord.last_seen.desc()).limit(100))
    ]
    associations = list(session.scalars(select(Association).order_by(Association.id.desc()).limit(20)))
    recent = session.execute(
        select(Job.status, Job.received_at, Job.finished_at, Job.delivered_at, Job.inference_ms).where(
            Job.received_at >= now - WINDOW
        )
    ).all()
    latencies: list[float] = []
    inference: list[float] = []
    finished = done = 0
    for status, received_at, finished_at, delivered_at, inference_ms in recent:
        if status in TERMINAL_STATUSES:
            finished += 1
        if status == JobStatus.DONE:
            done += 1
            end = delivered_at or finished_at
            if end is not None and received_at is not None:
                latencies.append((end - received_at).total_seconds())
        if inference_ms is not None:
            inference.append(float(inference_ms))
    return Snapshot(
        taken_at=now,
        counts=counts,
        queue_depth=counts[JobStatus.RECEIVED] + counts[JobStatus.QUEUED],
        latest_jobs=latest_jobs,
        workers=workers,
        associations=associations,
        finished_last_hour=finished,
        done_last_hour=done,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        inference_p50_ms=percentile(inference, 50),
        inference_p95_ms=percentile(inference, 95),
        model_served=_model_served(config, workers, latest_jobs),
        spool_space=_spool_space(config),
    )


def _spool_space(config: NodeConfig) -> SpoolSpace | None:
    try:
        return spool_space(config)
    except OSError:
        return None


# ---------------------------------------------------------------------------
# HTML


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _time(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _seconds(later: dt.datetime | None, earlier: dt.datetime | None) -> str:
    if later is None or earlier is None:
        return ""
    return _fmt_s((later - earlier).total_seconds())


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.2f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def _fmt_ms(ms: float | None) -> str:
    return "–" if ms is None else f"{ms:.0f} ms"


def _ago(now: dt.datetime, then: dt.datetime) -> str:
    seconds = max(0.0, (now - then).total_seconds())
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _result(job: Job) -> str:
    if job.positive is None:
        return ""
    text = "pneumothorax" if job.positive else "negative"
    if job.max_probability is not None:
        text += f", p={job.max_probability:.2f}"
    if job.positive and job.area_mm2:
        text += f", {job.area_mm2 / 100:.1f} cm²"
    elif job.positive and job.area_px:
        text += f", {job.area_px} px"
    return text


def _objects(job: Job) -> str:
    """The objects written for the job (SEG SR GSPS SC, delivery order), each with its SOP Instance UID."""
    from node.outputs import DELIVERY_ORDER

    cells = []
    for kind in DELIVERY_ORDER:
        uid = getattr(job, f"{kind}_sop_instance_uid", None)
        if uid:
            cells.append(f'<span data-object="{_e(kind)}" title="{_e(uid)}">{_e(str(kind).upper())}</span>')
    return " ".join(cells)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f24;background:#f6f8fa}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
.muted{color:#57606a} table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #d0d7de;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#eaeef2} td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:.6em} .card{background:#fff;border:1px solid #d0d7de;
border-radius:6px;padding:.5em .9em;min-width:9em} .card b{display:block;font-size:1.5em}
.s-DONE{color:#1a7f37} .s-FAILED{color:#cf222e;font-weight:600} .s-SKIPPED{color:#6e7781}
.s-RUNNING,.s-SENDING{color:#0969da} .s-RECEIVED,.s-QUEUED{color:#9a6700}
.err{color:#cf222e;max-width:40em;word-break:break-word} .uid{font-family:monospace;font-size:12px}
"""


def _disk_card(space: SpoolSpace | None) -> str:
    if space is None:
        return '<div class=card id=disk><b>?</b>spool disk unreadable</div>'
    state = ('<span class=s-FAILED>intake PAUSED: below the free-space watermark</span>' if space.low
             else "intake open")
    return (f'<div class=card id=disk data-paused="{str(space.low).lower()}"><b>{space.free_bytes / 2**30:.1f} GiB'
            f'</b>free on the spool disk ({space.free_percent:.0f}%, watermark {space.min_free_bytes / 2**30:.1f} GiB)'
            f' · {state}</div>')


def render_status_page(snapshot: Snapshot, config: NodeConfig, *, refresh_s: int = 10) -> str:
    s = snapshot
    out: list[str] = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">',
        f"<title>ptx-node {_e(config.scp.ae_title)} status</title><style>{_CSS}</style></head><body>",
        f"<h1>ptx-node <span class=muted>{_e(config.scp.ae_title)}</span></h1>",
        f'<div class=muted>at {_e(_time(s.taken_at))} UTC · model: <span id=model>{_e(s.model_served)}</span></div>',
        *([f'<p class=err id=cannot-serve><b>No worker can serve: jobs wait QUEUED.</b> {_e(s.cannot_serve)}</p>']
          if s.cannot_serve else []),
        "<h2>Now</h2><div class=cards>",
        f'<div class=card id=queue-depth><b>{s.queue_depth}</b>queue depth</div>',
        f'<div class=card id=running><b>{s.counts.get("RUNNING", 0) + s.counts.get("SENDING", 0)}</b>running or sending</div>',
        f'<div class=card id=workers-alive><b>{s.workers_alive}</b>workers alive</div>',
        f'<div class=card id=throughput><b>{s.done_last_hour}</b>done in the last hour ({s.finished_last_hour} finished)</div>',
        f'<div class=card id=latency><b>{_e(_fmt_s(s.latency_p50_s))}</b>p50 latency · p95 {_e(_fmt_s(s.latency_p95_s))}</div>',
        f'<div class=card id=inference><b>{_e(_fmt_ms(s.inference_p50_ms))}</b>p50 inference · p95 {_e(_fmt_ms(s.inference_p95_ms))}</div>',
        _disk_card(s.spool_space),
        "</div>",
        "<h2>Jobs by status</h2><table id=jobs-by-status><tr>",
    ]
    out += [f"<th class=s-{_e(k)}>{_e(k)}</th>" for k in s.counts]
    out.append("</tr><tr>")
    out += [f'<td class=num data-status="{_e(k)}">{v}</td>' for k, v in s.counts.items()]
    out.append("</tr></table>")

    out.append("<h2>Latest jobs</h2><table id=latest-jobs><tr><th>job</th><th>status</th><th>received (UTC)</th>"
               "<th>from</th><th>modality / view</th><th>study</th><th>wait</th><th>run</th><th>inference</th>"
               "<th>delivery</th><th>total</th><th>result</th><th>objects</th><th>attempts</th><th>reason / error</th></tr>")
    for job in s.latest_jobs:
        source = job.calling_ae or job.calling_host or ""
        end = job.delivered_at or job.finished_at
        out.append(
            f'<tr id="job-{job.id}" data-status="{_e(job.status)}">'
            f"<td class=num>{job.id}</td><td class=s-{_e(job.status)}>{_e(job.status)}</td>"
            f"<td>{_e(_time(job.received_at))}</td><td>{_e(job.source)} {_e(source)}</td>"
            f"<td>{_e(job.modality)} {_e(job.view_position)}</td>"
            f"<td class=uid>{_e(job.study_instance_uid)}</td>"
            f"<td class=num>{_seconds(job.started_at, job.received_at)}</td>"
            f"<td class=num>{_seconds(job.finished_at, job.started_at)}</td>"
            f"<td class=num>{_fmt_ms(job.inference_ms) if job.inference_ms is not None else ''}</td>"
            f"<td class=num>{_seconds(job.delivered_at, job.finished_at)}</td>"
            f"<td class=num>{_seconds(end, job.received_at) if job.status == JobStatus.DONE else ''}</td>"
            f"<td>{_e(_result(job))}</td><td class=objects>{_objects(job)}</td><td class=num>{job.attempts or 0}</td>"
            f"<td class=err>{_e(format_reason(job.reason_code, job.error))}</td></tr>"
        )
    if not s.latest_jobs:
        out.append('<tr><td colspan=15 class=muted>no jobs yet</td></tr>')
    out.append("</table>")

    out.append("<h2>Workers</h2><table id=workers><tr><th>worker</th><th>device</th><th>model</th>"
               "<th>last seen</th><th>jobs done</th><th>state</th><th>settings</th></tr>")
    for w in s.workers:
        state = f"<span class=err>cannot serve: {_e(w.serving_error)}</span>" if w.serving_error else (
            "alive" if w.alive else "gone")
        settings = {None: "unknown", True: "same as node",
                    False: "<span class=s-FAILED>DIFFERENT from the node</span>"}[w.same_settings]
        out.append(
            f'<tr data-worker="{_e(w.name)}"><td>{_e(w.name)}</td><td>{_e(w.device)}</td><td>{_e(w.model)}</td>'
            f"<td>{_e(_ago(s.taken_at, w.last_seen))}</td><td class=num>{w.jobs_done}</td>"
            f"<td>{state}</td><td>{settings}</td></tr>"
        )
    if not s.workers:
        out.append('<tr><td colspan=7 class=muted>no worker has reported</td></tr>')
    out.append("</table>")

    out.append("<h2>Associations and STOW-RS requests</h2><table id=associations><tr><th>time (UTC)</th>"
               "<th>protocol</th><th>caller</th><th>address</th><th>accepted</th><th>instances ok / rejected</th>"
               "<th>reason</th></tr>")
    for a in s.associations:
        out.append(
            f'<tr id="association-{a.id}"><td>{_e(_time(a.started_at))}</td><td>{_e(a.protocol)}</td>'
            f"<td>{_e(a.calling_ae)}</td><td>{_e(a.peer_address)}</td>"
            f"<td>{'yes' if a.accepted else '<span class=s-FAILED>no</span>'}"
            f"{f' <span class=refusals>({a.occurrences} times)</span>' if (a.occurrences or 1) > 1 else ''}</td>"
            f"<td class=num>{a.instances_accepted} / {a.instances_rejected}</td><td class=err>{_e(a.reject_reason)}</td></tr>"
        )
    if not s.associations:
        out.append('<tr><td colspan=7 class=muted>none yet</td></tr>')
    out.append("</table>")
    out.append('<p class=muted>JSON: <a href="jobs">/jobs</a> · <a href="associations">/associations</a> · '
               '<a href="metrics">/metrics</a></p></body></html>')
    return "\n".join(out)
