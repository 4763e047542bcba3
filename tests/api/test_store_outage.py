"""Redis frozen and Redis restarted under a running API and worker (real processes).

While the store is away every session route answers a 503 problem+json in bounded time,
health answers at once and readiness says why; when it is back, the worker (never
restarted) serves again, and no acknowledged version is lost across the restart (the
store runs with its append-only file, as the shipped deployments do).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis

from service.bench.processes import free_port, redis_server_binary
from tests.api.conftest import service_env, start, stop, wait_ready

pytestmark = pytest.mark.slow  # starts redis-server, the API and a worker as processes

CLICK = {"clicks": [{"label": "foreground", "voxel": [16, 16, 16]}]}


def _redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    command = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "yes", "--appendfsync", "always", "--dir", str(directory)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis(port=port).ping()
            return process
        except redis.RedisError:
            assert time.monotonic() < deadline and process.poll() is None, "redis-server did not start"
            time.sleep(0.05)


def _answers_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["Retry-After"]


def _wait_ready(client: httpx.Client) -> None:
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the service never became ready again"
        time.sleep(0.2)


def test_frozen_and_restarted_redis(tiny_weights: Path, ct_pet_files: dict[str, Path], tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "redis-data"
    data.mkdir()
    server = _redis(port, data)
    env = service_env(tiny_weights, REDIS_URL=f"redis://127.0.0.1:{port}/0", ICR_REDIS_PREFIX="outage")
    api_port = free_port()
    api = start(["serve", "--port", str(api_port)], env, tmp_path / "serve.log")
    worker = start(["worker", "--name", "steady"], env, tmp_path / "worker.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)  # a hang fails the test
    try:
        wait_ready(f"http://127.0.0.1:{api_port}", api, tmp_path / "serve.log")
        files = {role: (f"{role}.nii.gz", path.read_bytes()) for role, path in ct_pet_files.items()}
        sid = httpx.post(f"http://127.0.0.1:{api_port}/v1/sessions", files=files, timeout=120).json()["id"]
        assert client.post(f"/v1/sessions/{sid}/clicks", json=CLICK).json()["version"] == 1

        os.kill(server.pid, signal.SIGSTOP)  # frozen: connections open, nothing answers
        try:
            assert client.get("/healthz").status_code == 200
            _answers_503(client.get(f"/v1/sessions/{sid}"))
            _answers_503(client.post(f"/v1/sessions/{sid}/clicks", json=CLICK, headers={"Idempotency-Key": "f-1"}))
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "unreachable" in ready.json()["store"]
        finally:
            os.kill(server.pid, signal.SIGCONT)
        _wait_ready(client)
        assert client.get(f"/v1/sessions/{sid}").json()["version"] == 1  # the refused click did not land

        server.send_signal(signal.SIGTERM)  # a restart: down, then back from its append-only file
        server.wait(timeout=30)
        _answers_503(client.get(f"/v1/sessions/{sid}"))
        _answers_503(client.get(f"/v1/sessions/{sid}/mask"))
        assert client.get("/readyz").status_code == 503
        server = _redis(port, data)
        _wait_ready(client)  # the worker re-registered by itself
        assert worker.poll() is None, "the worker died with the store"
        state = client.get(f"/v1/sessions/{sid}").json()
        assert state["version"] == 1 and len(state["clicks"]) == 1  # the acknowledged version survived
        again = client.post(f"/v1/sessions/{sid}/clicks", json=CLICK, timeout=60)
        assert again.status_code == 200 and again.json()["version"] == 2
        assert "Traceback" not in (tmp_path / "serve.log").read_text()
    finally:
        for process in (worker, api):
            stop(process)
        server.terminate()
        server.wait(timeout=30)
