"""The node's HTTP server: health check, job and association log, status page,
Prometheus metrics and STOW-RS intake.

FastAPI on uvicorn: uvicorn's HTTP parsing (chunked bodies, keep-alive, limits)
is production-grade where the standard library's server is not, and routes with
typed query parameters validate requests without hand-written parsing.
"""

from node.http.app import HttpConfigError, check_exposure, create_app
from node.http.server import HttpServerHandle, start_http_server

__all__ = ["HttpConfigError", "HttpServerHandle", "check_exposure", "create_app", "start_http_server"]
