"""The worker's HTTP endpoint (``ICR_WORKER_METRICS_PORT``): /metrics, /healthz and /readyz.

A worker serves no API; this small threaded server is what Prometheus scrapes and what
an orchestrator probes. /readyz is the heartbeat seen from inside: 200 while the store
has accepted this worker's heartbeat within the time after which the API counts a
worker as dead (:data:`service.store.contract.WORKER_TTL_S`), else 503.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from service import metrics
from service.store.contract import WORKER_TTL_S

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes and scrapes every few seconds are not worth a log line each."""


def heartbeat_fresh() -> bool:
    return time.time() - metrics.last_heartbeat() < WORKER_TTL_S


def _plain(start_response: StartResponse, status: str, text: str) -> Iterable[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [text.encode()]


def worker_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/healthz":
        return _plain(start_response, "200 OK", "ok\n")
    if path == "/readyz":
        if heartbeat_fresh():
            return _plain(start_response, "200 OK", "ready\n")
        return _plain(start_response, "503 Service Unavailable", "no heartbeat accepted by the store recently\n")
    return _metrics_app(environ, start_response)


_metrics_app = make_wsgi_app()


def serve(host: str, port: int) -> WSGIServer:
    """Start the endpoint in a daemon thread; returns the server (``shutdown()`` stops it)."""
    server = make_server(host, port, worker_app, server_class=_Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="icr-worker-endpoint", daemon=True).start()
    log.info("worker endpoint on %s:%d (/metrics, /healthz, /readyz)", host, server.server_port)
    return server
