"""Serve the OHIF viewer's built files with the demo's app-config.js, and proxy
``/dicom-web/`` to an Orthanc, from one origin (what deploy/ohif/nginx.conf does
in the compose demo)."""

from __future__ import annotations

import os
import shutil
import threading
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["OHIF_VERSION", "OhifServer", "ohif_dist"]

OHIF_VERSION = os.environ.get("OHIF_VERSION", "3.13.2")
REPO = Path(__file__).resolve().parents[2]
APP_CONFIG = REPO / "deploy" / "ohif" / "app-config.js"


def ohif_dist() -> Path | None:
    """The OHIF dist folder fetched by tests/browser/fetch_ohif.sh, if present."""
    dist = Path(__file__).parent / "ohif" / OHIF_VERSION / "dist"
    return dist if (dist / "index.html").is_file() else None


class OhifServer:
    def __init__(self, dist: Path, dicomweb_upstream: str, port: int = 0) -> None:
        self.dist = dist
        self.upstream = dicomweb_upstream.rstrip("/")  # e.g. http://127.0.0.1:8042/dicom-web
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(server.dist), **kwargs)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 (stdlib signature)
                pass

            def do_GET(self) -> None:  # noqa: N802 (stdlib name)
                path = self.path.split("?", 1)[0]
                if path.startswith("/dicom-web/"):
                    return self._proxy()
                if path == "/app-config.js":
                    return self._send_file(APP_CONFIG, "application/javascript")
                if path == "/sw.js":  # no service worker: keep every run fresh
                    self.send_error(404)
                    return None
                target = Path(self.translate_path(path))
                if path != "/" and not target.exists():
                    # Single-page app: every route is index.html.
                    return self._send_file(server.dist / "index.html", "text/html")
                return super().do_GET()

            def _send_file(self, file: Path, content_type: str) -> None:
                data = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def _proxy(self) -> None:
                url = server.upstream + self.path[len("/dicom-web"):]
                request = urllib.request.Request(url)
                for header in ("Accept", "Range"):
                    if self.headers.get(header):
                        request.add_header(header, self.headers[header])
                try:
                    with urllib.request.urlopen(request, timeout=60) as upstream:
                        status, headers, body = upstream.status, upstream.headers, upstream
                        self.send_response(status)
                        for name in ("Content-Type", "Content-Length"):
                            if headers.get(name):
                                self.send_header(name, headers[name])
                        self.end_headers()
                        shutil.copyfileobj(body, self.wfile)
                except urllib.error.HTTPError as exc:
                    data = exc.read()
                    self.send_response(exc.code)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="ohif", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OhifServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
