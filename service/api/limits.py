"""Request-body caps enforced while the body streams in, before anything is parsed.

Uploads (``POST /v1/sessions``) get the upload cap; every other route (clicks, undo:
kilobytes of JSON) gets a small one, so a huge JSON body is refused before the event
loop spends time or memory parsing it.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _BodyTooLarge(Exception):
    pass


DEFAULT_BODY_BYTES = 64 * 1024
UPLOAD_ROUTES = frozenset({("POST", "/v1/sessions")})


class BodyLimit:
    """Answer 413 as soon as a request body passes its route's cap (declared or streamed)."""

    def __init__(self, app: ASGIApp, upload_bytes: int, default_bytes: int = DEFAULT_BODY_BYTES) -> None:
        self.app = app
        self.upload_bytes = upload_bytes
        self.default_bytes = default_bytes

    def cap(self, scope: Scope) -> int:
        route = (scope.get("method", ""), scope.get("path", "").rstrip("/"))
        return self.upload_bytes if route in UPLOAD_ROUTES else self.default_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.cap(scope)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            await self._reject(scope, send, cap)
            return
        state: dict[str, Any] = {"received": 0, "exceeded": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > cap:
                    state["exceeded"] = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if not state["exceeded"]:  # whatever the app made of the cut body is dropped
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if state["exceeded"]:
            await self._reject(scope, send, cap)

    async def _reject(self, scope: Scope, send: Send, cap: int) -> None:
        body = json.dumps(
            {
                "type": "urn:icr:problem:payload-too-large",
                "title": "Content Too Large",
                "status": 413,
                "detail": f"request body is over this route's limit of {cap} bytes",
                "instance": scope.get("path", ""),
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
