"""Liveness and readiness probes.

Both run on the event loop and never wait on a request thread: ``/healthz`` touches
nothing, ``/readyz`` asks the store on a thread of its own with a deadline, so both
answer in milliseconds while every request thread waits on a slow engine or store.
"""

from __future__ import annotations

import asyncio
from typing import Any

from anyio import CapacityLimiter, to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.store.contract import StoreUnavailable

router = APIRouter(tags=["health"])

READINESS_DEADLINE_S = 3.0
_probe_threads = CapacityLimiter(2)  # probes never queue behind request threads


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check(sessions: Any) -> dict[str, Any]:
    if not sessions.store.ping():
        return {"store": "unreachable", "workers": 0, "weights": [], "precision": []}
    workers = sessions.queue.live_workers()
    return {
        "store": "ok",
        "workers": len(workers),
        "weights": sorted({w.get("weights", "") for w in workers}),
        "precision": sorted({w.get("precision", "") for w in workers}),
    }


@router.get("/readyz", summary="Store reachable, an engine worker alive with weights loaded")
async def readyz(request: Request) -> JSONResponse:
    sessions = request.app.state.sessions
    try:
        checks = await asyncio.wait_for(
            to_thread.run_sync(_check, sessions, limiter=_probe_threads), READINESS_DEADLINE_S
        )
    except (asyncio.TimeoutError, StoreUnavailable) as error:  # the store hangs or fails: not ready, say why
        checks = {"store": f"unreachable ({type(error).__name__})", "workers": 0, "weights": [], "precision": []}
    reasons = [] if checks["store"] == "ok" else ["the session store is unreachable"]
    if checks["store"] == "ok" and not checks["workers"]:
        reasons.append("no engine worker is alive")
    body = {"status": "not-ready" if reasons else "ready", **checks}
    if reasons:
        body["reasons"] = reasons
    return JSONResponse(body, status_code=503 if reasons else 200, headers={"Retry-After": "5"} if reasons else None)
