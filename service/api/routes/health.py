"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Store reachable, an engine worker alive with weights loaded")
def readyz(request: Request) -> JSONResponse:
    sessions = request.app.state.sessions
    store_ok = sessions.store.ping()
    workers = sessions.queue.live_workers() if store_ok else []
    checks = {
        "store": "ok" if store_ok else "unreachable",
        "workers": len(workers),
        "weights": sorted({w.get("weights", "") for w in workers}),
        "precision": sorted({w.get("precision", "") for w in workers}),
    }
    ready = store_ok and bool(workers)
    return JSONResponse({"status": "ready" if ready else "not-ready", **checks}, status_code=200 if ready else 503)
