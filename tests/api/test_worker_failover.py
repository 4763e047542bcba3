"""A worker killed with SIGKILL mid-job: its click still completes, exactly once, on another worker."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from service.bench.processes import free_port
from service.store.redis_backend import GROUP
from tests.api.conftest import service_env, start, stop, wait_ready

pytestmark = pytest.mark.slow  # starts icr serve and icr worker processes


def _pending_for(client: redis.Redis, stream: str, consumer: str) -> int:
    for entry in client.xpending(stream, GROUP).get("consumers", []):
        if entry["name"].decode() == consumer:
            return int(entry["pending"])
    return 0


def _holder(client: redis.Redis, stream: str, names: tuple[str, ...]) -> str | None:
    for name in names:
        if _pending_for(client, stream, name):
            return name
    return None


def _wait_workers(client: httpx.Client, count: int) -> None:
    deadline = time.monotonic() + 120
    while client.get("/readyz").json().get("workers") != count:
        assert time.monotonic() < deadline, f"never saw {count} live workers"
        time.sleep(0.2)


def test_killed_worker_job_completes_once_on_another(
    slow_weights: Path, redis_url: str, redis_prefix: str, ct_pet_files: dict[str, Path], tmp_path: Path
) -> None:
    # the claim's idle limit is far away: the takeover must come from the missing heartbeat
    env = service_env(slow_weights, REDIS_URL=redis_url, ICR_REDIS_PREFIX=redis_prefix, ICR_CLAIM_IDLE_S="600")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = start(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    workers = {name: start(["worker", "--name", name], env, tmp_path / f"{name}.log") for name in ("first", "second")}
    try:
        wait_ready(url, api, tmp_path / "serve.log")
        client = httpx.Client(base_url=url, timeout=120)
        _wait_workers(client, 2)
        files = {role: (f"{role}.nii.gz", path.read_bytes()) for role, path in ct_pet_files.items()}
        created = client.post("/v1/sessions", files=files)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]

        store = redis.Redis.from_url(redis_url)
        stream = f"{redis_prefix}:jobs"
        body = {"clicks": [{"label": "foreground", "voxel": [24, 24, 24]}]}
        with ThreadPoolExecutor(1) as pool:
            click = pool.submit(client.post, f"/v1/sessions/{sid}/clicks", json=body,
                                headers={"Idempotency-Key": "only-once"})
            deadline = time.monotonic() + 30
            while (doomed := _holder(store, stream, tuple(workers))) is None:
                assert time.monotonic() < deadline, "no worker took the job"
                time.sleep(0.01)
            workers[doomed].send_signal(signal.SIGKILL)
            workers[doomed].wait()
            assert client.get(f"/v1/sessions/{sid}").json()["version"] == 0  # it died before committing
            answer = click.result(timeout=120)

        survivor = next(name for name in workers if name != doomed)
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == 1
        state = client.get(f"/v1/sessions/{sid}").json()
        assert state["version"] == 1
        assert state["clicks"] == answer.json()["clicks"] and len(state["clicks"]) == 1
        # the worker records the outcome (which answers the request) before it acknowledges the job, so that a
        # crash in between retries it: the ack may land just after the answer
        deadline = time.monotonic() + 30
        while store.xpending(stream, GROUP)["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.xpending(stream, GROUP)["pending"] == 0
        assert "refine on session" in (tmp_path / f"{survivor}.log").read_text()
        retry = client.post(f"/v1/sessions/{sid}/clicks", json=body, headers={"Idempotency-Key": "only-once"})
        assert retry.json()["version"] == 1
        assert client.get(f"/v1/sessions/{sid}").json()["version"] == 1
        assert stop(workers[survivor]) == 0  # SIGTERM: a clean exit
        assert f"worker {survivor} stopped" in (tmp_path / f"{survivor}.log").read_text()
        assert client.get("/readyz").status_code == 503  # a clean exit leaves the live set at once
    finally:
        for process in (*workers.values(), api):
            stop(process)


def test_a_click_whose_only_worker_died_fails_fast_and_never_lands(
    slow_weights: Path, redis_url: str, redis_prefix: str, ct_pet_files: dict[str, Path], tmp_path: Path
) -> None:
    env = service_env(slow_weights, REDIS_URL=redis_url, ICR_REDIS_PREFIX=redis_prefix, ICR_CLAIM_IDLE_S="600",
                      ICR_JOB_TIMEOUT_S="300")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = start(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    doomed = start(["worker", "--name", "doomed"], env, tmp_path / "doomed.log")
    later = None
    try:
        wait_ready(url, api, tmp_path / "serve.log")
        client = httpx.Client(base_url=url, timeout=120)
        files = {role: (f"{role}.nii.gz", path.read_bytes()) for role, path in ct_pet_files.items()}
        sid = client.post("/v1/sessions", files=files).json()["id"]
        store = redis.Redis.from_url(redis_url)
        body = {"clicks": [{"label": "background", "voxel": [20, 20, 20]}]}  # inside the CT
        with ThreadPoolExecutor(1) as pool:
            click = pool.submit(client.post, f"/v1/sessions/{sid}/clicks", json=body,
                                headers={"Idempotency-Key": "k-1"})
            deadline = time.monotonic() + 60
            while not _pending_for(store, f"{redis_prefix}:jobs", "doomed"):
                assert not click.done(), click.result().text  # answered before the worker took it: say why
                assert time.monotonic() < deadline, "the worker never took the click"
                time.sleep(0.01)
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
            answer = click.result(timeout=120)  # long before the 300 s job timeout
        assert answer.status_code == 503, answer.text
        assert answer.json()["type"] == "urn:icr:problem:no-engine"
        assert "not applied" in answer.json()["detail"]
        assert answer.headers["Retry-After"]
        later = start(["worker", "--name", "later"], env, tmp_path / "later.log")
        _wait_workers(client, 1)
        deadline = time.monotonic() + 60
        while "skipped: already cancelled" not in (tmp_path / "later.log").read_text():
            assert time.monotonic() < deadline, "the cancelled job was never seen"
            time.sleep(0.2)
        assert client.get(f"/v1/sessions/{sid}").json()["version"] == 0  # the refused click never landed
        retry = client.post(f"/v1/sessions/{sid}/clicks", json=body, headers={"Idempotency-Key": "k-1"})
        assert retry.status_code == 200 and retry.json()["version"] == 1  # the retry runs it, once
    finally:
        for process in (later, doomed, api):
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
