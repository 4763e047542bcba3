"""Structured JSON logs for ``icr serve`` and ``icr worker``: one JSON object per line.

Every line carries the ids of the work it belongs to, from context variables that the
request middleware (API) and the job scope (worker) set: ``request_id``,
``session_id`` and ``job_id``. A job carries its request's id to the worker, so one
``X-Request-ID`` finds the API's and the worker's lines of the same click.

What never goes into a line: voxel data, file names, header text or exception
messages (which may quote a header); an exception is logged as its type and the
code locations of its traceback.
"""

from __future__ import annotations

import json
import logging
import re
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

request_id: ContextVar[str] = ContextVar("request_id", default="")
session_id: ContextVar[str] = ContextVar("session_id", default="")
job_id: ContextVar[str] = ContextVar("job_id", default="")
_IDS = {"request_id": request_id, "session_id": session_id, "job_id": job_id}

# What a client may send as X-Request-ID: short, and nothing a log or header could misread.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

# LogRecord attributes that are not an ``extra=`` field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName", "color_message"}


def accepted_request_id(offered: str | None) -> str:
    """The client's id when it is short and safe, else a new one."""
    if offered is not None and REQUEST_ID_PATTERN.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


@contextmanager
def bound(**ids: str) -> Iterator[None]:
    """Tag every line logged inside the block (in this thread or task) with ``ids``."""
    tokens = [(_IDS[name], _IDS[name].set(value)) for name, value in ids.items()]
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


def _exception(info: Any) -> dict[str, Any]:
    kind, _, trace = info
    frames = [f"{frame.filename}:{frame.lineno} in {frame.name}" for frame in traceback.extract_tb(trace)]
    return {"type": getattr(kind, "__name__", str(kind)), "frames": frames}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, variable in _IDS.items():
            value = variable.get()
            if value:
                line[name] = value
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            line["exception"] = _exception(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str) -> None:
    """JSON lines on stderr for the root logger (and uvicorn's loggers, which then propagate to it)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
