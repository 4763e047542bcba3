"""Per-key limits (429 naming the limit), key-list validation and keyed owner hashes, in process."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.app import create_app
from service.engine.ensemble import Engine
from service.engine.loading import load_engine
from service.settings import Settings


@pytest.fixture(scope="module")
def tiny_engine(tiny_weights: Path) -> Engine:
    return load_engine(Settings(weights=tiny_weights, device="cpu", torch_threads=1, autocast="off"))


@contextmanager
def _client(engine: Engine, **settings: object) -> Iterator[TestClient]:
    app = create_app(Settings(device="cpu", api_keys="key-alpha-1,key-beta-22", **settings), engine)  # type: ignore[arg-type]
    with TestClient(app) as client:
        client.headers["Authorization"] = "Bearer key-alpha-1"
        yield client


@pytest.fixture
def files(ct_pet_files: dict[str, Path]) -> dict[str, tuple[str, bytes]]:
    return {role: (f"{role}.nii.gz", path.read_bytes()) for role, path in ct_pet_files.items()}


def _quota(response: httpx.Response, words: str) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["type"] == "urn:icr:problem:quota-exceeded"
    assert words in response.json()["detail"]
    assert int(response.headers["Retry-After"]) >= 1


def test_live_sessions_per_key(tiny_engine: Engine, files: dict[str, tuple[str, bytes]]) -> None:
    with _client(tiny_engine, max_sessions_per_key=2) as client:
        first = client.post("/v1/sessions", files=files).json()["id"]
        assert client.post("/v1/sessions", files=files).status_code == 201
        _quota(client.post("/v1/sessions", files=files), "ICR_MAX_SESSIONS_PER_KEY")
        other = client.post("/v1/sessions", files=files, headers={"Authorization": "Bearer key-beta-22"})
        assert other.status_code == 201  # the limit is per key
        assert client.delete(f"/v1/sessions/{first}").status_code == 204
        assert client.post("/v1/sessions", files=files).status_code == 201  # a deleted session frees its place


def test_clicks_per_request_and_per_session(tiny_engine: Engine, files: dict[str, tuple[str, bytes]]) -> None:
    with _client(tiny_engine, max_clicks_per_request=2, max_clicks_per_session=3) as client:
        sid = client.post("/v1/sessions", files=files).json()["id"]
        click = {"label": "foreground", "voxel": [5, 5, 5]}
        _quota(client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [click] * 3}), "ICR_MAX_CLICKS_PER_REQUEST")
        assert client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [click] * 2}).json()["version"] == 1
        _quota(client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [click] * 2}), "ICR_MAX_CLICKS_PER_SESSION")
        assert client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [click]}).json()["version"] == 2
        assert client.get(f"/v1/sessions/{sid}").json()["version"] == 2  # refusals changed nothing


def test_requests_per_minute(tiny_engine: Engine) -> None:
    with _client(tiny_engine, max_requests_per_minute=3) as client:
        answers = [client.get("/v1/sessions/unknown").status_code for _ in range(4)]
        assert answers[:3] == [404, 404, 404]
        _quota(client.get("/v1/sessions/unknown"), "ICR_MAX_REQUESTS_PER_MINUTE")
        assert client.get("/healthz").status_code == 200  # probes are not counted


@pytest.mark.parametrize("keys", [" , ", "key-alpha-1,", "short", "has space inside"])
def test_malformed_api_keys_are_refused_at_start(keys: str) -> None:
    with pytest.raises(ValidationError, match="ICR_API_KEYS"):
        Settings(api_keys=keys)  # type: ignore[arg-type]


def test_owners_are_keyed_hashes_not_bare_digests(tiny_engine: Engine, files: dict[str, tuple[str, bytes]]) -> None:
    with _client(tiny_engine, owner_secret="server-secret") as client:
        sid = client.post("/v1/sessions", files=files).json()["id"]
        owner = client.app.state.sessions.store.get_session(sid).owner  # type: ignore[attr-defined]
        assert owner and owner != hashlib.sha256(b"key-alpha-1").hexdigest()
        assert "key-alpha-1" not in owner


def test_redis_mode_with_keys_needs_a_shared_owner_secret() -> None:
    with pytest.raises(ValueError, match="ICR_OWNER_SECRET"):
        create_app(Settings(redis_url="redis://127.0.0.1:1/0", api_keys="key-alpha-1"))  # type: ignore[arg-type]
