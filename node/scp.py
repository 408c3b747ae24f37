"""The node's DICOM listener: C-ECHO and C-STORE (pynetdicom).

Every storage SOP class is accepted, so a routing rule that sends too much causes
no PACS retries: what the node does not process becomes a SKIPPED job with the
reason. C-STORE answers Success only once the file is fsynced and the job row is
committed; the hand-off to the broker happens after that, off the DICOM thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from node.config import NodeConfig, is_loopback_address
from node.db import Association, get_sessionmaker, utcnow
from node.disk import SpoolFullError
from node.intake import IntakeOutcome, accept_instance
from node.metrics import count_event
from node.received import read_received
from node.refusals import record_refusal
from node.status import StoreStatus
from node.tls import complete_server_handshake, peer_certificate_subject, server_context

__all__ = ["Enqueuer", "ScpConfigError", "StoreSCP", "TRANSFER_SYNTAXES", "check_caller_exposure"]

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


class Enqueuer:
    """Hands received job ids to the broker on its own thread.

    While an association is streaming images in, publishing waits for a pause of
    ``quiet_gap_s`` between C-STOREs (at most ``max_defer_s``) and then goes in one
    batch: during a burst the sender is waiting on our C-STORE answers while the workers
    are busy anyway. A study is published as soon as its association ends, or after the
    gap on an association the PACS keeps open. A dead broker never delays C-STORE.
    """

    def __init__(self, config: NodeConfig, *, quiet_gap_s: float = 0.1, max_defer_s: float = 5.0,
                 batch_size: int = 200) -> None:
        self._config = config
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="enqueuer", daemon=True)
        self._active = 0
        self._idle = threading.Condition()
        self._quiet_gap_s = quiet_gap_s
        self._max_defer_s = max_defer_s
        self._last_put = 0.0
        self._batch_size = batch_size

    def start(self) -> None:
        self._thread.start()

    def put(self, job_id: int) -> None:
        self._last_put = time.monotonic()
        self._queue.put(job_id)

    def association_started(self) -> None:
        with self._idle:
            self._active += 1

    def association_ended(self) -> None:
        with self._idle:
            self._active = max(0, self._active - 1)
            self._idle.notify_all()

    def stop(self) -> None:
        self._queue.put(None)
        with self._idle:
            self._idle.notify_all()
        self._thread.join(timeout=10)

    def _wait_for_quiet(self) -> None:
        deadline = time.monotonic() + self._max_defer_s
        with self._idle:
            while self._active and (now := time.monotonic()) < deadline:
                quiet_at = self._last_put + self._quiet_gap_s
                if now >= quiet_at:
                    return
                self._idle.wait(timeout=min(quiet_at, deadline) - now)

    def _run(self) -> None:
        from node.broker import enqueue_jobs

        while (job_id := self._queue.get()) is not None:
            self._wait_for_quiet()
            batch = [job_id]
            stop = False
            while len(batch) < self._batch_size:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            enqueue_jobs(self._config, batch)
            if stop:
                return


def _called_ae_title(event: Any) -> str:
    """The AE title the peer asked for (its A-ASSOCIATE-RQ), not the one this node answers as."""
    primitive = getattr(event.assoc.requestor, "primitive", None)
    called = getattr(primitive, "called_ae_title", None)
    return str(called if called is not None else event.assoc.acceptor.ae_title or "").strip()


class ScpConfigError(ValueError):
    """The listener's configuration would let anyone on the network send to it."""


def check_caller_exposure(config: NodeConfig) -> None:
    """Refuse a listener reachable from other machines that would take any caller."""
    scp = config.scp
    if scp.allowed_callers or scp.accept_any_caller or is_loopback_address(scp.bind_address):
        return
    raise ScpConfigError(
        f"scp.bind_address is {scp.bind_address}, reachable from other machines, but scp.allowed_callers is "
        "empty: list the PACS that may send (allowed_callers = [{ ae_title = \"PACS\", host = \"10.0.0.5\" }]), "
        "or set scp.accept_any_caller = true to take images from anyone who can reach the port"
    )


def _abort_on_undecodable_message(assoc: Any) -> None:
    """Abort an association whose DIMSE message cannot be decoded, as pynetdicom does for
    one it cannot convert: its chunked receive reads the command's Affected SOP Instance
    UID unchecked, and a C-STORE without one killed the association's thread (socket left
    open, no answer, the partial file left behind)."""
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def guarded(primitive: Any) -> None:
        try:
            receive(primitive)
        except Exception as exc:
            message, dimse.message = dimse.message, None
            partial = getattr(message, "_data_set_file", None)
            if partial is not None:
                partial.close()
                with contextlib.suppress(OSError):
                    os.unlink(partial.name)
            log.warning("association from %s aborted: a DIMSE message could not be decoded (%s)",
                        assoc.requestor.address, type(exc).__name__)
            dimse.dul.event_queue.put("Evt19")  # unrecognised PDU: A-ABORT

    dimse.receive_primitive = guarded


@dataclass
class _AssocStats:
    row_id: int | None = None
    accepted: int = 0
    rejected: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class StoreSCP:
    """The C-STORE/C-ECHO server, started non-blocking."""

    def __init__(self, config: NodeConfig, enqueuer: Enqueuer | None) -> None:
        self.config = config
        self.enqueuer = enqueuer
        self._server: Any = None
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self.ae = self._build_ae()
        # Built now, so a missing certificate stops `serve` before anything listens.
        self._ssl_context = server_context(config.scp.tls) if config.scp.tls.enabled else None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.config.scp.ae_title)
        ae.maximum_associations = self.config.scp.max_associations
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        allowed = self.config.scp.allowed_callers
        if allowed:
            ae.require_calling_aet = sorted({c.ae_title for c in allowed})
        ae.require_called_aet = self.config.scp.check_called_ae_title
        return ae

    def start(self) -> None:
        check_caller_exposure(self.config)
        # Receive each data set straight into a file on the spool's filesystem (one rename
        # into the spool, no copy in memory); both settings are per process in pynetdicom.
        _config.STORE_RECV_CHUNKED_DATASET = True
        receiving = self.config.spool_dir / "receiving"
        receiving.mkdir(parents=True, exist_ok=True)
        self._previous_tempdir = tempfile.tempdir
        tempfile.tempdir = str(receiving)
        handlers = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_RELEASED, self._handle_ended),
            (evt.EVT_ABORTED, self._handle_ended),
        ]
        handlers.append((evt.EVT_CONN_OPEN, self._handle_connection))
        self._server = self.ae.start_server(
            (self.config.scp.bind_address, self.config.scp.port), block=False, evt_handlers=handlers,
            ssl_context=self._ssl_context,
        )
        log.info("SCP %s listening on %s:%d%s", self.config.scp.ae_title, self.config.scp.bind_address, self.port,
                 " (DICOM TLS)" if self._ssl_context is not None else "")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            tempfile.tempdir = self._previous_tempdir

    # --- association log -------------------------------------------------------------

    def _record_association(self, event: Any) -> int | None:
        """An accepted association's row (refusals are counted by node.refusals)."""
        requestor = event.assoc.requestor
        factory = get_sessionmaker(self.config.database_url)
        try:
            with factory() as session:
                row = Association(
                    protocol="dimse",
                    calling_ae=str(requestor.ae_title or "")[:16],
                    called_ae=_called_ae_title(event)[:16],
                    peer_address=str(requestor.address)[:64],
                    peer_port=int(requestor.port or 0),
                    accepted=True,
                )
                session.add(row)
                session.flush()
                count_event(session.connection(), "ptx_associations_total",
                            {"protocol": "dimse", "accepted": "true"})
                session.commit()
                return row.id
        except SQLAlchemyError:
            log.exception("could not record association")
            return None

    def _handle_connection(self, event: Any) -> None:
        _abort_on_undecodable_message(event.assoc)
        if self._ssl_context is not None:
            self._handle_tls_connection(event)

    def _handle_tls_connection(self, event: Any) -> None:
        """The TLS handshake, on this association's thread; a caller that fails it is logged and cut off."""
        sock = event.assoc.dul.socket.socket
        refusal = complete_server_handshake(sock, timeout_s=self.ae.acse_timeout or 30)
        if refusal is None:
            return
        host, port = (event.address + (0,))[:2] if isinstance(event.address, tuple) else (str(event.address), 0)
        log.warning("association from %s refused: %s", host, refusal)
        record_refusal(self.config.database_url, protocol="dimse", peer_address=str(host), peer_port=int(port or 0),
                       calling_ae=None, called_ae=self.config.scp.ae_title, reason=refusal)
        sock.close()

    def _caller_allowed(self, calling_ae: str, address: str) -> str | None:
        allowed = self.config.scp.allowed_callers
        if not allowed:
            return None
        hosts = []
        for caller in allowed:
            if caller.ae_title == calling_ae:
                if caller.host is None or caller.host == address:
                    return None
                hosts.append(caller.host)
        if hosts:
            return f"{calling_ae} is allowed only from {' or '.join(sorted(hosts))}, not from {address}"
        return f"calling AE {calling_ae!r} from {address} is not on the allow-list"

    def _handle_accepted(self, event: Any) -> None:
        calling = str(event.assoc.requestor.ae_title or "").strip()
        address = str(event.assoc.requestor.address)
        refusal = self._caller_allowed(calling, address)
        if refusal:
            log.warning("association aborted: %s", refusal)
            self._record_refusal(event, refusal)
            event.assoc.abort()
            return
        if self._ssl_context is not None:
            subject = peer_certificate_subject(event.assoc.dul.socket.socket)
            log.info("association from %r at %s over TLS, client certificate %s", calling, address, subject or "none")
        row_id = self._record_association(event)
        with self._lock:
            self._stats[id(event.assoc)] = _AssocStats(row_id=row_id)
        if self.enqueuer is not None:
            self.enqueuer.association_started()

    def _handle_rejected(self, event: Any) -> None:
        calling = str(event.assoc.requestor.ae_title or "").strip()
        called = _called_ae_title(event)
        reason = f"association from {calling!r} at {event.assoc.requestor.address} to {called!r} rejected"
        if self.config.scp.check_called_ae_title and called != self.config.scp.ae_title:
            reason += f" (called AE title is not {self.config.scp.ae_title}; scp.check_called_ae_title is on)"
        elif self.config.scp.allowed_callers:
            reason += " (calling AE title not on the allow-list)"
        log.warning(reason)
        self._record_refusal(event, reason)

    def _record_refusal(self, event: Any, reason: str) -> None:
        requestor = event.assoc.requestor
        record_refusal(
            self.config.database_url, protocol="dimse", peer_address=str(requestor.address),
            peer_port=int(requestor.port or 0), calling_ae=str(requestor.ae_title or "").strip(),
            called_ae=_called_ae_title(event), reason=reason,
        )

    def _handle_ended(self, event: Any) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is not None and self.enqueuer is not None:
            self.enqueuer.association_ended()
        if stats is None or stats.row_id is None:
            return
        factory = get_sessionmaker(self.config.database_url)
        try:
            with factory() as session:
                session.execute(
                    update(Association)
                    .where(Association.id == stats.row_id)
                    .values(ended_at=utcnow(), instances_accepted=stats.accepted, instances_rejected=stats.rejected)
                )
                session.commit()
        except SQLAlchemyError:
            log.exception("could not close association record")

    # --- services -------------------------------------------------------------------------

    def _handle_echo(self, event: Any) -> int:
        return StoreStatus.SUCCESS

    def _count(self, event: Any, ok: bool) -> None:
        with self._lock:
            stats = self._stats.get(id(event.assoc))
            if stats is not None:
                if ok:
                    stats.accepted += 1
                else:
                    stats.rejected += 1

    def _handle_store(self, event: Any) -> int:
        received = None
        encoded = None
        try:
            if _config.STORE_RECV_CHUNKED_DATASET:
                received = read_received(event.dataset_path)
                ds = received.dataset
                file_meta = ds.file_meta
            else:
                ds = event.dataset
                file_meta = event.file_meta
                encoded = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            log.warning("C-STORE: cannot decode the dataset: %s", exc)
            self._count(event, False)
            return StoreStatus.CANNOT_DECODE
        requestor = event.assoc.requestor
        try:
            result = accept_instance(
                ds,
                file_meta=file_meta,
                config=self.config,
                source="dimse",
                calling_ae=str(requestor.ae_title or "").strip()[:16],
                calling_host=str(requestor.address)[:64],
                encoded=encoded,
                received_file=received.path if received else None,
                pixel_sha256=received.pixel_sha256 if received else None,
            )
        except SpoolFullError as exc:
            log.warning("C-STORE: refused, disk low: %s", exc)
            self._count(event, False)
            return StoreStatus.OUT_OF_RESOURCES
        except ValueError as exc:
            log.warning("C-STORE: refused: %s", exc)
            self._count(event, False)
            return StoreStatus.CANNOT_UNDERSTAND
        except (OSError, SQLAlchemyError) as exc:
            # Not stored durably: the sender must keep the image and retry.
            log.error("C-STORE: could not store durably: %s", exc)
            self._count(event, False)
            return StoreStatus.OUT_OF_RESOURCES
        except Exception as exc:  # a header value pydicom cannot decode (e.g. a US value of 3 bytes)
            log.warning("C-STORE: refused, a header value cannot be decoded: %s", type(exc).__name__)
            self._count(event, False)
            return StoreStatus.CANNOT_UNDERSTAND
        self._count(event, True)
        if result.outcome == IntakeOutcome.QUEUED and self.enqueuer is not None:
            self.enqueuer.put(result.job_id)
        return StoreStatus.SUCCESS
