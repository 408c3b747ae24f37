"""Running the HTTP app inside ``ptx-node serve``: uvicorn in a background thread.

The socket is bound before the thread starts, so a busy port fails at once with
a clear error and ``port = 0`` resolves to the port actually taken.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from node.config import NodeConfig
from node.http.app import check_exposure, create_app

__all__ = ["HttpServerHandle", "start_http_server"]

log = logging.getLogger(__name__)


class HttpServerHandle:
    """A running HTTP server: ``port``, ``url``, ``stop()``."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket, host: str) -> None:
        self._server = server
        self._thread = thread
        self._socket = sock
        self.host = host
        self.port: int = int(sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, finish requests in flight (up to ``timeout``), close the socket."""
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5)
        self._socket.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if host == "localhost":
        host = "127.0.0.1"
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"HTTP server cannot bind {host}:{port}: {exc.strerror}") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def start_http_server(config: NodeConfig, *, ready_timeout: float = 15.0) -> HttpServerHandle:
    """Serve ``create_app(config)`` on ``config.http.bind_address:port`` from a daemon thread.

    Raises ``HttpConfigError`` when no token is set and the address is not loopback.
    """
    check_exposure(config)
    app = create_app(config)
    sock = _bind(config.http.bind_address, config.http.port)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_config=None,  # keep the node's logging setup
            # No access log: refused requests are counted in the association log instead, one row a minute.
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="ptx-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"HTTP server did not start on {config.http.bind_address}:{config.http.port}")
        time.sleep(0.02)
    handle = HttpServerHandle(server, thread, sock, config.http.bind_address)
    log.info("HTTP server on %s (STOW-RS intake %s)", handle.url, "on" if config.http.stow_intake else "off")
    return handle
