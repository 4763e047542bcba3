"""A worker killed with SIGKILL mid-job: its click still completes, exactly once, on another worker."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
import torch

from service.bench.processes import free_port
from service.engine.checkpoints import write_checkpoint
from service.engine.networks import (
    INITIAL_CHANNELS,
    PAPER_ARCHITECTURE,
    REFINEMENT_CHANNELS,
    build_unet,
)
from service.store.redis_backend import GROUP
from tests.api.conftest import service_env, start, stop, wait_ready

pytestmark = pytest.mark.slow  # starts icr serve and icr worker processes


@pytest.fixture(scope="module")
def slow_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The paper's architecture on a 48^3 grid: a job takes seconds, long enough to die in."""
    torch.manual_seed(1)
    stages = {
        "initial": [build_unet(INITIAL_CHANNELS) for _ in range(5)],
        "refinement": [build_unet(REFINEMENT_CHANNELS) for _ in range(5)],
    }
    directory = tmp_path_factory.mktemp("slow-weights")
    write_checkpoint(directory, stages, architecture=PAPER_ARCHITECTURE, grid_shape=(48, 48, 48))
    return directory


def _pending_for(client: redis.Redis, stream: str, consumer: str) -> int:
    for entry in client.xpending(stream, GROUP).get("consumers", []):
        if entry["name"].decode() == consumer:
            return int(entry["pending"])
    return 0


def test_killed_worker_job_completes_once_on_another(
    slow_weights: Path, redis_url: str, redis_prefix: str, ct_pet_files: dict[str, Path], tmp_path: Path
) -> None:
    env = service_env(slow_weights, REDIS_URL=redis_url, ICR_REDIS_PREFIX=redis_prefix, ICR_CLAIM_IDLE_S="2")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = start(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    doomed = start(["worker", "--name", "doomed"], env, tmp_path / "doomed.log")
    survivor = None
    try:
        wait_ready(url, api, tmp_path / "serve.log")
        client = httpx.Client(base_url=url, timeout=120)
        files = {role: (f"{role}.nii.gz", path.read_bytes()) for role, path in ct_pet_files.items()}
        created = client.post("/v1/sessions", files=files)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]

        store = redis.Redis.from_url(redis_url)
        stream = f"{redis_prefix}:jobs"
        with ThreadPoolExecutor(1) as pool:
            click = pool.submit(
                client.post, f"/v1/sessions/{sid}/clicks",
                json={"clicks": [{"label": "foreground", "voxel": [24, 24, 24]}]},
                headers={"Idempotency-Key": "only-once"},
            )
            deadline = time.monotonic() + 30
            while _pending_for(store, stream, "doomed") == 0:  # the doomed worker holds the job
                assert time.monotonic() < deadline, "the first worker never took the job"
                time.sleep(0.01)
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
            assert client.get(f"/v1/sessions/{sid}").json()["version"] == 0  # it died before committing

            survivor = start(["worker", "--name", "survivor"], env, tmp_path / "survivor.log")
            answer = click.result(timeout=120)

        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == 1
        state = client.get(f"/v1/sessions/{sid}").json()
        assert state["version"] == 1
        assert state["clicks"] == answer.json()["clicks"] and len(state["clicks"]) == 1
        assert store.xpending(stream, GROUP)["pending"] == 0
        assert "refine on session" in (tmp_path / "survivor.log").read_text()
        retry = client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [{"label": "foreground", "voxel": [24, 24, 24]}]},
                            headers={"Idempotency-Key": "only-once"})
        assert retry.json()["version"] == 1
        assert client.get(f"/v1/sessions/{sid}").json()["version"] == 1
        assert stop(survivor) == 0  # SIGTERM: a clean exit
        assert "worker survivor stopped" in (tmp_path / "survivor.log").read_text()
    finally:
        for process in (survivor, doomed, api):
            if process is not None:
                stop(process)


def test_no_live_worker_is_503(tiny_weights: Path, redis_url: str, redis_prefix: str, ct_pet_files: dict[str, Path],
                               tmp_path: Path) -> None:
    env = service_env(tiny_weights, REDIS_URL=redis_url, ICR_REDIS_PREFIX=redis_prefix)
    port = free_port()
    api = start(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and api.poll() is None
                time.sleep(0.2)
        assert ready.status_code == 503 and ready.json()["workers"] == 0
        files = {role: (f"{role}.nii.gz", path.read_bytes()) for role, path in ct_pet_files.items()}
        response = httpx.post(f"{url}/v1/sessions", files=files, timeout=60)
        assert response.status_code == 503
        assert "no engine worker is alive" in response.json()["detail"]
    finally:
        stop(api)
