"""The request middleware: request ids, one access log line and the request metrics per request.

It is the outermost layer of the app (inside Starlette's last-resort error handler), so
it sees every answer, the body limit's 413s included:

- ``X-Request-ID``: the client's when short and safe (:data:`service.logs.REQUEST_ID_PATTERN`),
  else a new one; echoed on every response and bound to every log line of the request.
- ``icr_http_request_duration_seconds`` by route *template* (``/v1/sessions/{session_id}``,
  never the id itself, so the label set stays small) and ``icr_click_duration_seconds``.
- An exception no handler took becomes a problem+json 500 that names the request id; the
  log line has the exception's type and code locations, not its message.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs, metrics

log = logging.getLogger("icr.access")

CLICK_ROUTE = "/v1/sessions/{session_id}/clicks"
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes log at DEBUG
REQUEST_ID_HEADER = b"x-request-id"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others: "other", so a
# client cannot grow the label set

request_started: ContextVar[float] = ContextVar("request_started", default=0.0)


def seconds_since_request() -> float | None:
    """Time since the current request arrived (None outside a request)."""
    started = request_started.get()
    return time.perf_counter() - started if started else None


def observe_validation(kind: str) -> None:
    """The validation phase of a job: from the request's arrival until now (its enqueue)."""
    elapsed = seconds_since_request()
    if elapsed is not None:
        metrics.observe_phase(kind, "validation", elapsed)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))


class RequestObserver:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        offered = dict(scope.get("headers", [])).get(REQUEST_ID_HEADER)
        rid = logs.accepted_request_id(offered.decode("latin-1") if offered is not None else None)
        answer: dict[str, Any] = {"status": 500, "started": False, "location": ""}
        scope.setdefault("state", {})["request_id"] = rid  # request.state.request_id, for problem bodies

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.update(status=message["status"], started=True)
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                answer["location"] = next((v.decode("latin-1") for k, v in headers if k.lower() == b"location"), "")
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, rid.encode())]}
            await send(message)

        with logs.bound(request_id=rid):
            token = request_started.set(started)
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                log.exception("unhandled error")
                if not answer["started"]:
                    await _internal_error(scope, send_with_id, rid)
            finally:
                request_started.reset(token)
                self._observe(scope, answer, time.perf_counter() - started)

    @staticmethod
    def _observe(scope: Scope, answer: dict[str, Any], seconds: float) -> None:
        route, status = _route(scope), int(answer["status"])
        method = scope.get("method", "") if scope.get("method", "") in METHODS else "other"
        metrics.REQUEST_SECONDS.labels(route, method, str(status)).observe(seconds)
        if route == CLICK_ROUTE and method == "POST" and status == 200:
            metrics.CLICK_SECONDS.observe(seconds)
        session = str(scope.get("path_params", {}).get("session_id", ""))
        if not session and answer["location"].startswith("/v1/sessions/"):
            session = answer["location"].rsplit("/", 1)[-1]  # a session just created
        with logs.bound(session_id=session):
            log.log(
                logging.DEBUG if route in QUIET_ROUTES else logging.INFO,
                "%s %s %d", method, route, status,
                extra={"method": method, "route": route, "status": status, "duration_ms": round(seconds * 1000, 2)},
            )


async def _internal_error(scope: Scope, send: Send, rid: str) -> None:
    metrics.count_problem("internal", 500)
    body = json.dumps({
        "type": "urn:icr:problem:internal",
        "title": "Internal Server Error",
        "status": 500,
        "detail": f"unexpected error; quote request id {rid} when reporting it",
        "instance": scope.get("path", ""),
        "request_id": rid,
    }).encode()
    await send({
        "type": "http.response.start",
        "status": 500,
        "headers": [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


def install(app: FastAPI) -> None:
    """Add the middleware; call last, so that it wraps every other middleware."""
    app.add_middleware(RequestObserver)
