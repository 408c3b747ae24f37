"""A local Orthanc PACS on free ports, for the demo and the tests.

Orthanc (Debian packages `orthanc`, `orthanc-dicomweb`) is started from a
generated config in a work folder; its REST API routes images to the node
(`/modalities/{name}/store`) and shows what came back.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from node.proc import die_with_parent

__all__ = ["LocalOrthanc", "free_port", "wait_until"]

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")




class LocalOrthanc:
    """A real Orthanc (with the DICOMweb plugin) on free ports."""

    ae_title = "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # Merged into the generated orthanc.json (e.g. LuaScripts, DicomModalities).
        self.extra_config: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @staticmethod
    def binary() -> str | None:
        found = shutil.which("Orthanc")
        if found:
            return found
        return "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None

    @classmethod
    def available(cls) -> bool:
        return cls.binary() is not None

    def start(self) -> LocalOrthanc:
        binary = self.binary()
        if binary is None:
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "ptx-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            "StableAge": 1,
            "DicomModalities": {},
            **self.extra_config,
            "DicomScuTimeout": 30,
        }
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(config, indent=2))
        self.log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([binary, str(cfg_path)], stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)
        wait_until(self._alive, 30, what="Orthanc to answer /system")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-2000:]}")
        try:
            self.get("/system")
            return True
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    # REST
    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post_json(self, path: str, payload: Any) -> Any:
        return self.request("POST", path, json.dumps(payload).encode())

    def upload(self, path: Path) -> str:
        """Store a file in Orthanc over REST; returns the Orthanc instance id."""
        return self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom")["ID"]

    def add_modality(self, name: str, ae_title: str, port: int, host: str = "127.0.0.1") -> None:
        self.request("PUT", f"/modalities/{name}", json.dumps({"AET": ae_title, "Host": host, "Port": port}).encode())

    def store_to_modality(self, name: str, instance_ids: list[str]) -> Any:
        """Route instances to a modality (Orthanc acts as the C-STORE SCU)."""
        return self.post_json(f"/modalities/{name}/store", {"Resources": instance_ids, "Synchronous": True})

    def study_instances(self, study_instance_uid: str) -> list[dict[str, Any]]:
        return self.post_json("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_instance_uid},
                                              "Expand": True})

    def study_series(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """The series of a study as Orthanc holds them (MainDicomTags: Modality, SeriesDescription...)."""
        return self.post_json("/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study_instance_uid},
                                              "Expand": True})

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        return self.get(f"/instances/{orthanc_id}/simplified-tags")

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.request("GET", f"/instances/{orthanc_id}/file")

    def find_sop(self, sop_instance_uid: str) -> list[str]:
        return self.post_json("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})


