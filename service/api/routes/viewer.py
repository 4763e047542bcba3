"""/viewer: the browser viewer, a static page over the public HTTP API.

Every file the page loads (its script, style and the vendored NiiVue bundle) is served
from ``service/api/viewer/static``; nothing comes from a CDN, so the page works offline.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "viewer" / "static"
PATH = "/viewer"


def install(app: FastAPI) -> None:
    """Serve the page at /viewer/ (and redirect /viewer there, keeping the URL's fragment)."""

    @app.api_route(PATH, methods=["GET", "HEAD"], include_in_schema=False)
    def viewer_root() -> RedirectResponse:
        return RedirectResponse(f"{PATH}/", status_code=307)

    app.mount(f"{PATH}/", StaticFiles(directory=STATIC_DIR, html=True), name="viewer")
