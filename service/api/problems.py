"""RFC 9457 problem details: every error the API returns is application/problem+json.

``PROBLEMS`` is the one table from an error type to its status and kind; the handlers
below are the only place statuses are chosen. An exception the table does not know
becomes a 500 ``internal`` problem carrying the request id, in the outermost middleware
(:mod:`service.api.observability`), which also logs it.
"""

from __future__ import annotations

import math
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.api import errors
from service.dicom import dicomweb
from service.imaging.upload import UploadTooLarge
from service.imaging.volume import ImageError
from service.store.contract import SessionGone, SessionNotFound, StoreUnavailable

PROBLEM_MEDIA_TYPE = "application/problem+json"
STORE_RETRY_AFTER_S = 5

# error type -> (status, kind, fixed detail or None to use str(error))
PROBLEMS: dict[type[Exception], tuple[int, str, str | None]] = {
    errors.InvalidCentre: (422, "invalid-centre", None),
    errors.InvalidImage: (422, "invalid-image", None),
    ImageError: (422, "invalid-image", None),
    UploadTooLarge: (413, "upload-too-large", None),
    errors.InvalidUpload: (422, "invalid-request", None),
    errors.InvalidCentreFrame: (422, "invalid-centre", None),
    errors.NoDicomSource: (409, "no-dicom-source", None),
    errors.NoFrameOfReference: (409, "no-frame-of-reference", None),
    errors.MultiframeSource: (409, "multiframe-source", None),
    errors.PacsNotConfigured: (503, "pacs-not-configured", None),
    dicomweb.StudyNotFound: (404, "study-not-found", None),
    dicomweb.AmbiguousSeries: (409, "ambiguous-series", None),
    dicomweb.SeriesRefused: (422, "invalid-series", None),
    dicomweb.PacsError: (502, "pacs-unavailable", None),
    errors.ClickOutsideVolume: (422, "click-outside-volume", None),
    errors.IdempotencyKeyReused: (422, "idempotency-key-reused", None),
    errors.Unauthorised: (401, "unauthorised", None),
    SessionNotFound: (404, "session-not-found", "no such session"),
    errors.VersionNotFound: (404, "version-not-found", None),
    SessionGone: (410, "session-gone", "session was deleted or has expired"),
    errors.SessionNotReady: (409, "session-not-ready", None),
    errors.VersionConflict: (409, "version-conflict", None),
    errors.NothingToUndo: (409, "nothing-to-undo", None),
    errors.NoRefinementStage: (409, "no-refinement-stage", None),
    errors.UncertaintyNotAvailable: (409, "uncertainty-not-available", None),
    errors.RequestInFlight: (409, "request-in-flight", None),
    errors.VersionMismatch: (412, "version-mismatch", None),
    errors.QuotaExceeded: (429, "quota-exceeded", None),
    errors.EngineFailed: (500, "engine-failed", None),
    errors.NoEngine: (503, "no-engine", None),
    errors.EngineTimeout: (503, "engine-timeout", None),
    errors.OutcomeUnknown: (503, "outcome-unknown", None),
    StoreUnavailable: (503, "store-unavailable", "the session store is unreachable; retry shortly"),
}


def problem_for(error: Exception) -> tuple[int, str, str, dict[str, str]] | None:
    """(status, kind, detail, headers) of a known error type (its nearest listed base)."""
    for kind in type(error).__mro__:
        if kind in PROBLEMS:
            status, name, detail = PROBLEMS[kind]
            headers: dict[str, str] = {}
            retry = getattr(error, "retry_after_s", None)
            if isinstance(error, StoreUnavailable):
                retry = STORE_RETRY_AFTER_S
            if retry is not None:
                headers["Retry-After"] = str(max(1, math.ceil(retry)))
            if isinstance(error, errors.Unauthorised):
                headers["WWW-Authenticate"] = "Bearer"
            return status, name, detail or str(error), headers
    return None


def problem_response(
    request: Request, status: int, kind: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    metrics.count_problem(kind, status)
    body = {
        "type": f"urn:icr:problem:{kind}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    request_id = getattr(request.state, "request_id", None)
    if request_id:
        body["request_id"] = request_id
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _field(location: tuple[object, ...]) -> str:
    return ".".join(str(part) for part in location if part not in ("body",)) or "body"


def _validation_detail(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:10]:
        if item.get("type") == "json_invalid":
            parts.append("request body is not valid JSON")
        else:
            parts.append(f"{_field(tuple(item.get('loc', ())))}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


def install(app: FastAPI) -> None:
    async def on_known(request: Request, error: Exception) -> JSONResponse:
        known = problem_for(error)
        assert known is not None  # registered for the table's types only
        status, kind, detail, headers = known
        return problem_response(request, status, kind, detail, headers)

    async def on_validation(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return problem_response(request, 422, "invalid-request", _validation_detail(error))

    async def on_http(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        kind = HTTPStatus(error.status_code).phrase.lower().replace(" ", "-")
        return problem_response(request, error.status_code, kind, str(error.detail), dict(error.headers or {}))

    for kind in PROBLEMS:
        app.add_exception_handler(kind, on_known)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
