"""The FastAPI application factory.

With ``redis_url`` set the app is a pure API over Redis (engine work goes to
``icr worker`` processes). Without it, the embedded default: an in-process store and
one engine worker thread in this process, behind the same interfaces.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from service import __version__
from service.api import observability, problems
from service.api.limits import BodyLimit
from service.api.routes import health, viewer
from service.api.routes import metrics as metrics_routes
from service.api.routes import sessions as session_routes
from service.api.routes import uncertainty as uncertainty_routes
from service.api.sessions import Sessions
from service.settings import Settings
from service.store.contract import JobQueue, SessionStore
from service.store.memory_backend import MemoryStore
from service.store.redis_backend import connect

if TYPE_CHECKING:  # the engine (torch, MONAI) is imported only by the embedded mode
    from service.engine.ensemble import Engine

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD_BYTES = 1 << 20


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """``engine`` is used in the embedded mode; loaded from settings.weights if not given."""

    if settings.redis_url and settings.api_keys and settings.owner_secret is None:
        raise ValueError("ICR_OWNER_SECRET is required with ICR_API_KEYS in Redis mode: every API replica must "
                         "key session owners with the same secret")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        worker_thread: threading.Thread | None = None
        store: SessionStore
        queue: JobQueue
        if settings.redis_url:
            store = connect(
                settings.redis_url,
                session_ttl_s=settings.session_ttl_s,
                claim_idle_s=settings.claim_idle_s,
                prefix=settings.redis_prefix,
            )
            queue = store
        else:
            from service.engine.loading import load_engine
            from service.engine.worker import Worker

            memory = MemoryStore(session_ttl_s=settings.session_ttl_s)
            store, queue = memory, memory
            worker = Worker(engine or load_engine(settings), memory, memory, name="embedded",
                            honour_clicks=settings.honour_clicks, border_passes=settings.border_passes)
            memory.heartbeat(worker.name, worker.info())
            # the in-process queue wait is cheap, and shutdown waits for it: a short one stops the app promptly
            worker_thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"poll_s": 0.05},
                                             name="icr-engine", daemon=True)
            worker_thread.start()
        app.state.sessions = Sessions(store, queue, settings)
        app.state.api_keys = settings.api_key_set()
        app.state.owner_secret = (
            settings.owner_secret.get_secret_value().encode() if settings.owner_secret else secrets.token_bytes(32)
        )
        log.info("service ready (%s mode)", "redis" if settings.redis_url else "embedded")
        try:
            yield
        finally:
            stop.set()
            if worker_thread is not None:
                worker_thread.join(timeout=60)

    app = FastAPI(
        title="2S-ICR interactive GTVt segmentation",
        version=__version__,
        description="Upload a co-registered CT+PET pair, get an automatic primary-tumour mask, "
        "refine it with clicks. Errors are RFC 9457 problem+json.",
        lifespan=lifespan,
    )
    problems.install(app)
    app.include_router(health.router)
    app.include_router(metrics_routes.router)
    app.include_router(session_routes.router)
    app.include_router(uncertainty_routes.router)
    viewer.install(app)
    max_body = int(2 * settings.max_upload_mb * 2**20) + MULTIPART_OVERHEAD_BYTES
    app.add_middleware(BodyLimit, upload_bytes=max_body)
    observability.install(app)  # last: the outermost layer, so it sees every answer
    return app
