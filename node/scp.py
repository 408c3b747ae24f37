"""The node's DICOM listener: C-ECHO and C-STORE (pynetdicom).

Every storage SOP class is accepted, so a routing rule that sends too much causes
no PACS retries: what the node does not process becomes a SKIPPED job with the
reason. C-STORE answers Success only once the file is fsynced and the job row is
committed; the hand-off to the broker happens after that, off the DICOM thread.
"""

from __future__ import annotations

import logging
import queue
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
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from node.config import NodeConfig
from node.db import Association, get_sessionmaker, utcnow
from node.intake import IntakeOutcome, accept_instance
from node.status import StoreStatus

__all__ = ["Enqueuer", "StoreSCP", "TRANSFER_SYNTAXES"]

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
        from node.tasks import enqueue_jobs

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
        return ae

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_RELEASED, self._handle_ended),
            (evt.EVT_ABORTED, self._handle_ended),
        ]
        self._server = self.ae.start_server(
            (self.config.scp.bind_address, self.config.scp.port), block=False, evt_handlers=handlers
        )
        log.info("SCP %s listening on %s:%d", self.config.scp.ae_title, self.config.scp.bind_address, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # --- association log -------------------------------------------------------------

    def _record_association(self, event: Any, *, accepted: bool, reason: str | None) -> int | None:
        requestor = event.assoc.requestor
        factory = get_sessionmaker(self.config.database_url)
        try:
            with factory() as session:
                row = Association(
                    protocol="dimse",
                    calling_ae=str(requestor.ae_title or "")[:16],
                    called_ae=str(event.assoc.acceptor.ae_title or "")[:16],
                    peer_address=str(requestor.address)[:64],
                    peer_port=int(requestor.port or 0),
                    accepted=accepted,
                    reject_reason=reason,
                    ended_at=None if accepted else utcnow(),
                )
                session.add(row)
                session.commit()
                return row.id
        except SQLAlchemyError:
            log.exception("could not record association")
            return None

    def _caller_allowed(self, calling_ae: str, address: str) -> str | None:
        allowed = self.config.scp.allowed_callers
        if not allowed:
            return None
        for caller in allowed:
            if caller.ae_title == calling_ae and (caller.host is None or caller.host == address):
                return None
        return f"calling AE {calling_ae!r} from {address} is not on the allow-list"

    def _handle_accepted(self, event: Any) -> None:
        calling = str(event.assoc.requestor.ae_title or "").strip()
        address = str(event.assoc.requestor.address)
        refusal = self._caller_allowed(calling, address)
        if refusal:
            log.warning("association aborted: %s", refusal)
            self._record_association(event, accepted=False, reason=refusal)
            event.assoc.abort()
            return
        row_id = self._record_association(event, accepted=True, reason=None)
        with self._lock:
            self._stats[id(event.assoc)] = _AssocStats(row_id=row_id)
        if self.enqueuer is not None:
            self.enqueuer.association_started()

    def _handle_rejected(self, event: Any) -> None:
        calling = str(event.assoc.requestor.ae_title or "").strip()
        reason = f"association from {calling!r} at {event.assoc.requestor.address} rejected"
        if self.config.scp.allowed_callers:
            reason += " (calling AE title not on the allow-list)"
        log.warning(reason)
        self._record_association(event, accepted=False, reason=reason)

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
        try:
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
            )
        except ValueError as exc:
            log.warning("C-STORE: refused: %s", exc)
            self._count(event, False)
            return StoreStatus.CANNOT_UNDERSTAND
        except (OSError, SQLAlchemyError) as exc:
            # Not stored durably: the sender must keep the image and retry.
            log.error("C-STORE: could not store durably: %s", exc)
            self._count(event, False)
            return StoreStatus.OUT_OF_RESOURCES
        self._count(event, True)
        if result.outcome == IntakeOutcome.QUEUED and self.enqueuer is not None:
            self.enqueuer.put(result.job_id)
        return StoreStatus.SUCCESS
