"""RFC 9457 problem details: every error the API returns is application/problem+json."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics

PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """An error with an HTTP status, a short machine-readable kind and a human detail."""

    def __init__(self, status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.headers = headers or {}


def problem_response(request: Request, status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    metrics.count_problem(kind, status)
    body = {
        "type": f"urn:icr:problem:{kind}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _field(location: tuple) -> str:
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
    async def on_problem(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, Problem)
        return problem_response(request, error.status, error.kind, error.detail, error.headers)

    async def on_validation(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return problem_response(request, 422, "invalid-request", _validation_detail(error))

    async def on_http(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        kind = HTTPStatus(error.status_code).phrase.lower().replace(" ", "-")
        return problem_response(request, error.status_code, kind, str(error.detail), dict(error.headers or {}))

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
