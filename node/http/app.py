"""The node's HTTP API as an ASGI app: health check, job and association log as
JSON, the admin status page, Prometheus metrics and STOW-RS intake.

Tokens (``[http]``): ``token`` opens every route, ``stow_token`` only STOW-RS intake.
A token is sent as ``Authorization: Bearer TOKEN``, as the password of HTTP Basic (what
archives configure for a DICOMweb peer), or, for the status page, as the cookie its
login form sets; never in the URL, where it would end up in logs and browser history.
``/healthz`` needs none. A route whose token is not configured is open only on a
loopback bind, and then only to requests whose ``Host`` names this machine (a web
page cannot reach it through DNS rebinding).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import html
import logging
import re
import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from sqlalchemy import select, text
from sqlalchemy.orm import selectinload

from node.config import NodeConfig, is_loopback_address
from node.db import Association, Job, JobStatus, get_sessionmaker
from node.dicomweb import (
    DICOM_JSON,
    MultipartError,
    MultipartLimitError,
    MultipartRelatedReader,
    parse_content_type,
)
from node.disk import SpoolFullError, check_spool_space
from node.http.dashboard import render_status_page, take_snapshot
from node.http.stow import StowRequestError, log_rejected_request, store_parts
from node.metrics import CONTENT_TYPE, node_registry, render

__all__ = ["HttpConfigError", "check_exposure", "create_app", "parse_since"]

log = logging.getLogger(__name__)

TOKEN_COOKIE = "ptx_token"
_LOGIN_FORM_MAX_BYTES = 4096
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SPOOL_FULL_RETRY_S = 300  # Retry-After while the disk is below the watermark
BUSY_RETRY_S = 10  # Retry-After while max_concurrent_uploads are being received
_SINCE = re.compile(r"^(\d+)([smhd])$")


class HttpConfigError(ValueError):
    """The HTTP server's configuration would expose it unsafely."""


def check_exposure(config: NodeConfig) -> None:
    """Refuse to serve without the admin token on anything but a loopback address."""
    if config.http.token is None and not is_loopback_address(config.http.bind_address):
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
    """(token presented, caller name from HTTP Basic) from the Authorization header or the cookie."""
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
    return request.cookies.get(TOKEN_COOKIE), None


def _host_names_this_machine(request: Request, bind_address: str) -> bool:
    """True when the Host header is a loopback name or the bound address (port ignored)."""
    host = request.headers.get("host", "").strip().lower()
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name in _LOOPBACK_NAMES or name == bind_address.lower()


def _token_matches(presented: str | None, token: str | None) -> bool:
    return presented is not None and token is not None and secrets.compare_digest(presented.encode(), token.encode())


def _login_page(message: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>ptx-node: sign in</title>"
        "<meta name=viewport content='width=device-width'></head><body style='font-family:sans-serif;margin:3em'>"
        f"<h1>ptx-node</h1><p id=login-message>{html.escape(message)}</p>"
        "<form id=login method=post action=login><label>Token <input id=token name=token type=password "
        "autocomplete=current-password required></label> <button type=submit>Sign in</button></form>"
        "</body></html>"
    )


async def _body_chunks(request: Request, *, idle_s: float, total_s: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; StowRequestError 408 on a stalled or too slow body."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total_s
    while True:
        wait = min(idle_s, deadline - loop.time())
        if wait <= 0:
            raise StowRequestError(408, f"request body took longer than {total_s:g} s (http.body_timeout_s)")
        try:
            message = await asyncio.wait_for(request.receive(), wait)
        except TimeoutError:
            if loop.time() >= deadline:
                raise StowRequestError(408, f"request body took longer than {total_s:g} s (http.body_timeout_s)") from None
            raise StowRequestError(408, f"request body stalled: nothing received for {idle_s:g} s "
                                        "(http.body_idle_timeout_s)") from None
        if message["type"] == "http.disconnect":
            raise StowRequestError(400, "client closed the connection before the request body ended")
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body", False):
            return


def create_app(config: NodeConfig) -> FastAPI:
    """The ASGI app for ``config`` (the database must already be migrated)."""
    check_exposure(config)
    options = config.http
    admin_token = options.token
    factory = get_sessionmaker(config.database_url)
    registry = node_registry(config.database_url, config=config)
    app = FastAPI(title="ptx-node", docs_url=None, redoc_url=None, openapi_url=None)
    uploads = {"active": 0}  # STOW-RS requests being received (one event loop: no lock needed)

    def authorize(request: Request, tokens: list[str], *, stow: bool) -> str | None:
        """Checks the token for this route; returns the caller name given with HTTP Basic, if any."""
        presented, caller = _presented_credentials(request)
        if not tokens:
            if _host_names_this_machine(request, options.bind_address):
                return caller
            status, reason = 403, "Host header does not name this node (only localhost or the bound address)"
        elif any(_token_matches(presented, t) for t in tokens):
            return caller
        elif not stow and _token_matches(presented, options.stow_token):
            status, reason = 403, "the STOW-RS token opens STOW-RS intake only"
        else:
            status, reason = 401, "missing token" if presented is None else "wrong token"
        client = request.client
        if stow:
            # A refused STOW-RS request belongs in the association log, like a refused DICOM caller.
            log_rejected_request(
                config, peer_address=client.host if client else None, peer_port=client.port if client else None,
                caller=caller, reason=f"HTTP {status}: {reason}",
            )
        log.warning("HTTP %s %s from %s refused: %s", request.method, request.url.path,
                    client.host if client else "?", reason)
        if status == 401:
            raise HTTPException(
                status_code=401,
                detail=f"{reason}: send Authorization: Bearer <token> (tokens in the URL are not accepted)",
                headers={"WWW-Authenticate": 'Bearer realm="ptx-node", Basic realm="ptx-node"'},
            )
        raise HTTPException(status_code=status, detail=reason)

    def require_token(request: Request) -> str | None:
        return authorize(request, [admin_token] if admin_token else [], stow=False)

    def require_stow_token(request: Request) -> str | None:
        return authorize(request, [t for t in (options.stow_token, admin_token) if t], stow=True)

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
        with factory() as session:
            snapshot = take_snapshot(session, config)
            page = render_status_page(snapshot, config)
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.post("/login")
    async def login(request: Request) -> Response:
        """The status page's sign-in form: a right token becomes an HttpOnly cookie."""
        if int(request.headers.get("content-length") or 0) > _LOGIN_FORM_MAX_BYTES:
            return HTMLResponse(_login_page("Form too large."), status_code=413)
        form = await request.form(max_files=0, max_fields=4, max_part_size=_LOGIN_FORM_MAX_BYTES)
        presented = form.get("token")
        if admin_token is None or (isinstance(presented, str) and _token_matches(presented, admin_token)):
            response: Response = RedirectResponse(url="./", status_code=303)
            if admin_token is not None:
                response.set_cookie(TOKEN_COOKIE, admin_token, httponly=True, samesite="strict")
            return response
        client = request.client
        log.warning("HTTP sign-in from %s refused: wrong token", client.host if client else "?")
        return HTMLResponse(_login_page("Wrong token."), status_code=401, headers={"Cache-Control": "no-store"})

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

    if options.stow_intake:

        @app.post("/dicom-web/studies")
        async def stow(request: Request, caller: str | None = Depends(require_stow_token)) -> Response:  # noqa: B008
            return await _stow(request, caller, None)

        @app.post("/dicom-web/studies/{study}")
        async def stow_study(study: str, request: Request,
                             caller: str | None = Depends(require_stow_token)) -> Response:  # noqa: B008
            return await _stow(request, caller, study)

    async def _stow(request: Request, caller: str | None, study: str | None) -> Response:
        client = request.client
        peer_address, peer_port = (client.host, client.port) if client else (None, None)
        try:
            if uploads["active"] >= options.max_concurrent_uploads:
                raise StowRequestError(503, f"{options.max_concurrent_uploads} STOW-RS uploads are in progress "
                                            "(http.max_concurrent_uploads); retry later", retry_after_s=BUSY_RETRY_S)
            uploads["active"] += 1
            try:
                result = await _receive_and_store(request, caller, study, peer_address, peer_port)
            finally:
                uploads["active"] -= 1
        except StowRequestError as exc:
            await run_in_threadpool(
                log_rejected_request, config, peer_address=peer_address, peer_port=peer_port, caller=caller,
                reason=f"HTTP {exc.status}: {exc}",
            )
            headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
            return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)
        return JSONResponse(result.dicom_json(), status_code=result.http_status, media_type=DICOM_JSON)

    async def _receive_and_store(request: Request, caller: str | None, study: str | None,
                                 peer_address: str | None, peer_port: int | None) -> Any:
        """Checks the request head, streams each part to a file, then takes the parts; the
        bounds apply before the body is read (Content-Length) and while it arrives."""
        content_type = request.headers.get("content-type", "")
        if parse_content_type(content_type)[0] != "multipart/related":
            raise StowRequestError(415, 'STOW-RS wants Content-Type multipart/related; type="application/dicom"')
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise StowRequestError(400, "Content-Length is not a number")
            if int(declared) > options.max_request_bytes:
                raise StowRequestError(413, f"request body of {int(declared)} bytes is over the limit of "
                                            f"{options.max_request_bytes} bytes (http.max_request_bytes)")
        try:
            check_spool_space(config)  # before reading the body: the sender keeps the upload
        except SpoolFullError as exc:
            raise StowRequestError(503, str(exc), retry_after_s=SPOOL_FULL_RETRY_S) from None
        upload_dir = config.spool_dir / "upload"
        upload_dir.mkdir(parents=True, exist_ok=True)
        try:
            reader = MultipartRelatedReader(
                content_type, upload_dir, max_parts=options.max_parts, max_part_bytes=options.max_part_bytes,
                max_header_bytes=options.max_part_header_bytes,
            )
        except MultipartError as exc:
            raise StowRequestError(400, str(exc)) from None
        if reader.root_type and reader.root_type != "application/dicom":
            # The metadata + bulk data form (application/dicom+json / +xml) is not supported.
            raise StowRequestError(415, "only multipart/related; type=\"application/dicom\" is supported")
        try:
            received = 0
            async for chunk in _body_chunks(request, idle_s=options.body_idle_timeout_s,
                                            total_s=options.body_timeout_s):
                received += len(chunk)
                if received > options.max_request_bytes:
                    raise StowRequestError(413, f"request body is over the limit of {options.max_request_bytes} "
                                                "bytes (http.max_request_bytes)")
                await run_in_threadpool(reader.write, chunk)
            parts = await run_in_threadpool(reader.finish)
            if not parts:
                raise StowRequestError(400, "multipart/related body has no parts")
            return await run_in_threadpool(
                store_parts, config, parts, study_instance_uid=study, peer_address=peer_address,
                peer_port=peer_port, caller=caller,
            )
        except MultipartLimitError as exc:
            raise StowRequestError(413, str(exc)) from None
        except MultipartError as exc:
            raise StowRequestError(400, str(exc)) from None
        finally:
            await run_in_threadpool(reader.close)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path == "/" and exc.status_code == 401:
            message = "Wrong token." if request.cookies.get(TOKEN_COOKIE) else "Sign in with the node's admin token."
            # Bearer only: a Basic challenge would make the browser pop up its own dialog over the form.
            return HTMLResponse(_login_page(message), status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="ptx-node"', "Cache-Control": "no-store"})
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    return app
