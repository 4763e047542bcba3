"""Request dependencies: the session service and the caller's identity."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.errors import QuotaExceeded, Unauthorised
from service.api.sessions import ANONYMOUS, Sessions

_bearer = HTTPBearer(auto_error=False, description="An API key, when the service has ICR_API_KEYS set.")


def get_sessions(request: Request) -> Sessions:
    return request.app.state.sessions


RATE_WINDOW_S = 60


def get_owner(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    owner = _authenticated_owner(request, credentials)
    sessions: Sessions = request.app.state.sessions
    limit = sessions.settings.max_requests_per_minute
    if sessions.store.count_request(owner or ANONYMOUS, RATE_WINDOW_S) > limit:
        raise QuotaExceeded(
            f"this key made more than {limit} requests this minute (ICR_MAX_REQUESTS_PER_MINUTE)",
            retry_after_s=RATE_WINDOW_S - time.time() % RATE_WINDOW_S,
        )
    return owner


def _authenticated_owner(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The owner id of the caller's sessions: an HMAC of its key under the server's secret
    (a leaked store does not reveal keys, nor lets anyone test guesses offline), or None
    when auth is off."""
    keys: frozenset[str] = request.app.state.api_keys
    if not keys:
        return None
    unauthorised = Unauthorised("a valid API key is required as 'Authorization: Bearer <key>'")
    if credentials is None:
        raise unauthorised
    offered = credentials.credentials.encode()
    if not any(hmac.compare_digest(offered, key.encode()) for key in keys):
        raise unauthorised
    secret: bytes = request.app.state.owner_secret
    return hmac.new(secret, offered, hashlib.sha256).hexdigest()


SessionsDep = Annotated[Sessions, Depends(get_sessions)]
OwnerDep = Annotated[str | None, Depends(get_owner)]
