"""Request dependencies: the session service and the caller's identity."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.problems import Problem
from service.api.sessions import Sessions

_bearer = HTTPBearer(auto_error=False, description="An API key, when the service has ICR_API_KEYS set.")


def get_sessions(request: Request) -> Sessions:
    return request.app.state.sessions


def get_owner(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    """The owner id of the caller's sessions: a digest of its key, or None when auth is off."""
    keys: frozenset[str] = request.app.state.api_keys
    if not keys:
        return None
    unauthorised = Problem(401, "unauthorised", "a valid API key is required as 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
    if credentials is None:
        raise unauthorised
    offered = credentials.credentials.encode()
    if not any(hmac.compare_digest(offered, key.encode()) for key in keys):
        raise unauthorised
    return hashlib.sha256(offered).hexdigest()


SessionsDep = Annotated[Sessions, Depends(get_sessions)]
OwnerDep = Annotated[str | None, Depends(get_owner)]
