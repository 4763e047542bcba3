"""The API in this process: ``create_app`` with the real in-process store and a tiny real engine.

What the process-level fixtures (``icr serve``, ``icr worker``) serve, without starting a
process: the lifespan runs (the embedded engine thread, the in-process store), and requests
go through the whole ASGI app (middleware, validation, problem+json) via Starlette's
``TestClient``, an ``httpx.Client``. The fast test loop's way to test the HTTP contract.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.engine.loading import load_engine
from service.settings import Settings
from tests.api.conftest import API_KEYS, Service


@dataclass
class InProcessService(Service):
    """A :class:`Service` whose clients talk to ``app`` directly; ``logs`` collects this process's log."""

    app: FastAPI | None = None

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        assert self.app is not None
        return TestClient(self.app, base_url=self.url, headers=self.headers if headers is None else headers)


def inprocess_settings(weights: Path, api_keys: str | None = None) -> Settings:
    """The limits the process-level fixtures set through ICR_* variables (tests/api/conftest.service_env);
    torch's thread count is left as this process has it."""
    return Settings(weights=weights, device="cpu", torch_threads=None, max_upload_mb=2.0, max_image_mb=16.0,
                    job_timeout_s=60.0, redis_url=None, api_keys=api_keys)


@contextmanager
def log_to(path: Path) -> Iterator[None]:
    """The service's INFO log (its ``service.*`` loggers) written to ``path`` while the block runs, as
    ``icr serve`` writes it."""
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    package = logging.getLogger("service")
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        handler.close()


@contextmanager
def in_process_service(weights: Path, log: Path) -> Iterator[InProcessService]:
    """The embedded mode with API keys on, like ``embedded_service``; the lifespan runs for the block."""
    settings = inprocess_settings(weights, api_keys=",".join(API_KEYS))
    with log_to(log):
        app = create_app(settings, load_engine(settings))
        with TestClient(app):  # runs the lifespan: the in-process store and the engine thread
            yield InProcessService("http://testserver", [log], {"Authorization": f"Bearer {API_KEYS[0]}"}, app=app)
