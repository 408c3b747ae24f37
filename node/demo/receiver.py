"""A small store SCP that writes what it receives to a folder.

The demo's stand-in PACS when Orthanc is not installed, and the benchmark's bare
pynetdicom baseline (no fsync, no database: the least a store SCP can do).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from node.scp import TRANSFER_SYNTAXES
from node.status import StoreStatus

__all__ = ["FolderReceiver"]

log = logging.getLogger(__name__)


class FolderReceiver:
    def __init__(self, folder: Path, *, ae_title: str = "RECEIVER", port: int = 0, host: str = "127.0.0.1",
                 sop_classes: list[str] | None = None) -> None:
        self.folder = Path(folder)
        # Storage SOP classes offered (default: all), e.g. a PACS that takes no SEG.
        self._sop_classes = sop_classes
        self.ae_title = ae_title
        self._address = (host, port)
        self._server: Any = None
        self._lock = threading.Lock()
        self.received: list[Path] = []

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> FolderReceiver:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        offered = self._sop_classes or [str(c.abstract_syntax) for c in AllStoragePresentationContexts]
        for sop_class in offered:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self._server = ae.start_server(self._address, block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def _store(self, event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception:
            return StoreStatus.CANNOT_DECODE
        path = self.folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with self._lock:
            self.received.append(path)
        return StoreStatus.SUCCESS

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
