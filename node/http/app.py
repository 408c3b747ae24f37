"""The node's HTTP API as an ASGI app: health check, job and association log as
JSON, the admin status page, Prometheus metrics and STOW-RS intake.

Every route except ``/healthz`` requires the configured token when one is set:
``Authorization: Bearer TOKEN``, HTTP Basic with the token as password (what
archives configure for a DICOMweb peer), ``?token=TOKEN`` (the status page then
sets a cookie and redirects, so the token leaves the address bar), or that cookie.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import logging
import re
import secrets
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from sqlalchemy import select, text
from sqlalchemy.orm import selectinload

from node.config import NodeConfig
from node.db import Association, Job, JobStatus, get_sessionmaker
from node.dicomweb import DICOM_JSON
from node.http.dashboard import render_status_page, take_snapshot
from node.http.stow import StowRequestError, log_rejected_request, store_upload
from node.metrics import CONTENT_TYPE, node_registry, render

__all__ = ["HttpConfigError", "check_exposure", "create_app", "parse_since"]

log = logging.getLogger(__name__)

TOKEN_COOKIE = "ptx_token"
MAX_UPLOAD_BYTES = 4 << 30  # one STOW-RS request; a chest X-ray study is well under 200 MB
_CHUNK = 1 << 20
_SINCE = re.compile(r"^(\d+)([smhd])$")


class HttpConfigError(ValueError):
    """The HTTP server's configuration would expose it unsafely."""


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_exposure(config: NodeConfig) -> None:
    """Refuse to serve without a token on anything but a loopback address."""
    if not config.http.token and not _is_loopback(config.http.bind_address):
        raise HttpConfigError(
            f"http.bind_address is {config.http.bind_address}, reachable from other machines, but no http.token "
            "is set: set [http] token (or PTX_NODE_HTTP__TOKEN) or bind to 127.0.0.1"
        )


def parse_since(value: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """``30m``, ``2h``, ``1d`` (ago) or an ISO 8601 date/time, as naive UTC."""
    match = _SINCE.match(value.strip())
    now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    if match:
        seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return now - dt.timedelta(seconds=seconds)
    try:
        parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"since must be like 30m, 2h, 1d or an ISO 8601 time, not {value!r}") from None
    return parsed.astimezone(dt.UTC).replace(tzinfo=None) if parsed.tzinfo else parsed


def _bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=message)


def _presented_credentials(request: Request) -> tuple[str | None, str | None]:
    """(token presented, caller name from HTTP Basic) from header, query or cookie."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), None
    if scheme.lower() == "basic" and value.strip():
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        return password, user or None
    query = request.query_params.get("token")
    if query:
        return query, None
    return request.cookies.get(TOKEN_COOKIE), None


def create_app(config: NodeConfig) -> FastAPI:
    """The ASGI app for ``config`` (the database must already be migrated)."""
    check_exposure(config)
    expected = config.http.token
    factory = get_sessionmaker(config.database_url)
    registry = node_registry(config.database_url)
    app = FastAPI(title="ptx-node", docs_url=None, redoc_url=None, openapi_url=None)

    def require_token(request: Request) -> str | None:
        """Checks the token; returns the caller name given with HTTP Basic, if any."""
        presented, caller = _presented_credentials(request)
        if expected is None:
            return caller
        if presented is not None and secrets.compare_digest(presented.encode(), expected.encode()):
            return caller
        reason = "missing token" if presented is None else "wrong token"
        if request.url.path.startswith("/dicom-web/"):
            # A refused STOW-RS request belongs in the association log, like a refused DICOM caller.
            client = request.client
            log_rejected_request(
                config, peer_address=client.host if client else None, peer_port=client.port if client else None,
                caller=caller, reason=f"HTTP 401: {reason}",
            )
        log.warning("HTTP %s %s from %s refused: %s", request.method, request.url.path,
                    request.client.host if request.client else "?", reason)
        raise HTTPException(
            status_code=401,
            detail=f"{reason}: send Authorization: Bearer <token> or ?token=<token>",
            headers={"WWW-Authenticate": 'Bearer realm="ptx-node", Basic realm="ptx-node"'},
        )

    protected = APIRouter(dependencies=[Depends(require_token)])

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        try:
            with factory() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            return JSONResponse({"status": "error", "database": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "database": "ok"})

    @protected.get("/", response_class=HTMLResponse)
    def status_page(request: Request) -> Response:
        if request.query_params.get("token") and expected:
            # Token accepted from the query: keep it in a cookie, drop it from the address bar.
            response: Response = RedirectResponse(url=request.url.path, status_code=303)
            response.set_cookie(TOKEN_COOKIE, expected, httponly=True, samesite="strict")
            return response
        with factory() as session:
            snapshot = take_snapshot(session, config)
            page = render_status_page(snapshot, config)
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @protected.get("/jobs")
    def list_jobs(
        status: Annotated[list[str] | None, Query(description="status, repeated or comma-separated")] = None,
        since: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        source: str | None = None,
        study: str | None = None,
    ) -> JSONResponse:
        query = select(Job).options(selectinload(Job.deliveries)).order_by(Job.id.desc()).limit(limit)
        if status:
            wanted = {s.strip().upper() for item in status for s in item.split(",") if s.strip()}
            unknown = sorted(wanted - {s.value for s in JobStatus})
            if unknown:
                raise _bad_request(f"unknown status {', '.join(unknown)}; valid: {', '.join(s.value for s in JobStatus)}")
            query = query.where(Job.status.in_(sorted(wanted)))
        if since:
            try:
                query = query.where(Job.received_at >= parse_since(since))
            except ValueError as exc:
                raise _bad_request(str(exc)) from None
        if source:
            query = query.where(Job.source == source)
        if study:
            query = query.where(Job.study_instance_uid == study)
        with factory() as session:
            jobs = [job.summary() for job in session.scalars(query)]
        return JSONResponse({"count": len(jobs), "jobs": jobs})

    @protected.get("/jobs/{job_id}")
    def show_job(job_id: int) -> JSONResponse:
        with factory() as session:
            job = session.get(Job, job_id, options=[selectinload(Job.deliveries)])
            if job is None:
                raise HTTPException(status_code=404, detail=f"no job {job_id}")
            return JSONResponse(job.summary())

    @protected.get("/associations")
    def list_associations(
        protocol: str | None = None,
        accepted: bool | None = None,
        since: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> JSONResponse:
        query = select(Association).order_by(Association.id.desc()).limit(limit)
        if protocol:
            query = query.where(Association.protocol == protocol)
        if accepted is not None:
            query = query.where(Association.accepted.is_(accepted))
        if since:
            try:
                query = query.where(Association.started_at >= parse_since(since))
            except ValueError as exc:
                raise _bad_request(str(exc)) from None
        with factory() as session:
            rows = [a.summary() for a in session.scalars(query)]
        return JSONResponse({"count": len(rows), "associations": rows})

    @protected.get("/metrics")
    def metrics() -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE)

    app.include_router(protected)

    if config.http.stow_intake:

        @app.post("/dicom-web/studies")
        async def stow(request: Request, caller: str | None = Depends(require_token)) -> Response:  # noqa: B008
            return await _stow(request, caller, None)

        @app.post("/dicom-web/studies/{study}")
        async def stow_study(study: str, request: Request, caller: str | None = Depends(require_token)) -> Response:  # noqa: B008
            return await _stow(request, caller, study)

    async def _stow(request: Request, caller: str | None, study: str | None) -> Response:
        client = request.client
        peer_address, peer_port = (client.host, client.port) if client else (None, None)
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().lstrip().startswith("multipart/related"):
            await run_in_threadpool(
                log_rejected_request, config, peer_address=peer_address, peer_port=peer_port, caller=caller,
                reason=f"HTTP 415: Content-Type {content_type or 'missing'}",
            )
            return JSONResponse({"error": "STOW-RS wants Content-Type multipart/related; type=\"application/dicom\""},
                                status_code=415)
        upload_dir = config.spool_dir / "upload"
        upload_dir.mkdir(parents=True, exist_ok=True)
        # Spool the body to disk (same filesystem as the spool) instead of holding it in memory.
        fd, name = tempfile.mkstemp(dir=upload_dir, prefix=".stow-", suffix=".part")
        body_path = Path(name)
        try:
            size = 0
            with open(fd, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_UPLOAD_BYTES:
                        return JSONResponse({"error": f"request body over {MAX_UPLOAD_BYTES} bytes"}, status_code=413)
                    await run_in_threadpool(fh.write, chunk)
            try:
                result = await run_in_threadpool(
                    store_upload, config, body_path, content_type, study_instance_uid=study,
                    peer_address=peer_address, peer_port=peer_port, caller=caller,
                )
            except StowRequestError as exc:
                await run_in_threadpool(
                    log_rejected_request, config, peer_address=peer_address, peer_port=peer_port, caller=caller,
                    reason=f"HTTP {exc.status}: {exc}",
                )
                return JSONResponse({"error": str(exc)}, status_code=exc.status)
        finally:
            body_path.unlink(missing_ok=True)
        return JSONResponse(result.dicom_json(), status_code=result.http_status, media_type=DICOM_JSON)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path == "/" and exc.status_code == 401:
            return PlainTextResponse(f"401 {exc.detail}\n", status_code=401, headers=exc.headers)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    return app
