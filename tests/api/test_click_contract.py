"""The click contract under faults: two API replicas over one Redis and a slow worker.

A retried click or undo (after a 503 timeout, after its API process was SIGKILLed) is
applied exactly once; an Idempotency-Key reused with another body is refused; an error
answer never lands later.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from service.bench.processes import free_port
from service.store.redis_backend import GROUP
from tests.api.conftest import service_env, start, stop, wait_ready

pytestmark = pytest.mark.slow  # starts API replicas and a worker as processes


@dataclass
class Deployment:
    impatient: httpx.Client  # an API that gives up at once: its jobs are always cancelled
    patient: httpx.Client
    redis: redis.Redis
    stream: str
    files: dict[str, tuple[str, bytes]]
    env: dict[str, str]
    logs: Path

    def create(self) -> str:
        created = self.patient.post("/v1/sessions", files=self.files)
        assert created.status_code == 201, created.text
        return str(created.json()["id"])

    def state(self, sid: str) -> dict:
        return self.patient.get(f"/v1/sessions/{sid}").json()

    def wait_job_taken(self) -> None:
        deadline = time.monotonic() + 60
        while not int(self.redis.xpending(self.stream, GROUP)["pending"]):
            assert time.monotonic() < deadline, "the worker never took the job"
            time.sleep(0.01)

    def wait_idle(self) -> None:
        deadline = time.monotonic() + 120
        while int(self.redis.xpending(self.stream, GROUP)["pending"]) or self.redis.xlen(self.stream):
            assert time.monotonic() < deadline, "the worker never finished"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def deployment(
    slow_weights: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory, ct_pet_files: dict[str, Path]
) -> Iterator[Deployment]:
    logs = tmp_path_factory.mktemp("contract")
    prefix = f"contract-{free_port()}"
    env = service_env(slow_weights, REDIS_URL=redis_url, ICR_REDIS_PREFIX=prefix, ICR_JOB_TIMEOUT_S="120")
    ports = {"impatient": free_port(), "patient": free_port()}
    apis = {
        "impatient": start(["serve", "--port", str(ports["impatient"])], {**env, "ICR_JOB_TIMEOUT_S": "0.01"},
                           logs / "impatient.log"),
        "patient": start(["serve", "--port", str(ports["patient"])], env, logs / "patient.log"),
    }
    worker = start(["worker", "--name", "slow"], env, logs / "worker.log")
    try:
        for name, port in ports.items():
            wait_ready(f"http://127.0.0.1:{port}", apis[name], logs / f"{name}.log")
        files = {role: (f"{role}.nii.gz", path.read_bytes()) for role, path in ct_pet_files.items()}
        yield Deployment(
            impatient=httpx.Client(base_url=f"http://127.0.0.1:{ports['impatient']}", timeout=120),
            patient=httpx.Client(base_url=f"http://127.0.0.1:{ports['patient']}", timeout=120),
            redis=redis.Redis.from_url(redis_url),
            stream=f"{prefix}:jobs",
            files=files,
            env=env,
            logs=logs,
        )
    finally:
        for process in (worker, *apis.values()):
            stop(process)


CLICK = {"clicks": [{"label": "foreground", "voxel": [24, 24, 24]}]}


def test_a_click_answered_503_after_a_timeout_never_lands_and_its_retry_lands_once(deployment: Deployment) -> None:
    sid = deployment.create()
    first = deployment.impatient.post(f"/v1/sessions/{sid}/clicks", json=CLICK, headers={"Idempotency-Key": "t-1"})
    assert first.status_code == 503, first.text
    assert first.json()["type"] == "urn:icr:problem:engine-timeout"
    assert "not applied" in first.json()["detail"]
    deployment.wait_idle()
    assert deployment.state(sid)["version"] == 0  # the answered error never landed
    retry = deployment.patient.post(f"/v1/sessions/{sid}/clicks", json=CLICK, headers={"Idempotency-Key": "t-1"})
    assert retry.status_code == 200, retry.text
    again = deployment.patient.post(f"/v1/sessions/{sid}/clicks", json=CLICK, headers={"Idempotency-Key": "t-1"})
    assert again.status_code == 200 and again.json()["version"] == retry.json()["version"] == 1
    assert again.json()["mask"] == retry.json()["mask"]
    state = deployment.state(sid)
    assert state["version"] == 1 and len(state["clicks"]) == 1


def test_a_click_whose_api_was_killed_is_recovered_by_a_retry_on_another_replica(
    deployment: Deployment, tmp_path: Path
) -> None:
    sid = deployment.create()
    port = free_port()
    doomed: subprocess.Popen[bytes] = start(["serve", "--port", str(port)], deployment.env, tmp_path / "doomed.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}", doomed, tmp_path / "doomed.log")
        with ThreadPoolExecutor(1) as pool:
            lost = pool.submit(httpx.post, f"http://127.0.0.1:{port}/v1/sessions/{sid}/clicks", json=CLICK,
                               headers={"Idempotency-Key": "k-1"}, timeout=120)
            deployment.wait_job_taken()
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
            with pytest.raises(httpx.HTTPError):
                lost.result(timeout=60)  # the caller never got an answer
        retry = deployment.patient.post(f"/v1/sessions/{sid}/clicks", json=CLICK, headers={"Idempotency-Key": "k-1"})
        assert retry.status_code == 200, retry.text
        assert retry.json()["version"] == 1
        deployment.wait_idle()
        state = deployment.state(sid)
        assert state["version"] == 1 and len(state["clicks"]) == 1
    finally:
        stop(doomed)


def test_a_key_reused_with_another_body_is_refused(deployment: Deployment) -> None:
    sid = deployment.create()
    assert deployment.patient.post(f"/v1/sessions/{sid}/clicks", json=CLICK,
                                   headers={"Idempotency-Key": "r-1"}).status_code == 200
    other = {"clicks": [{"label": "background", "voxel": [22, 22, 22]}]}
    refused = deployment.patient.post(f"/v1/sessions/{sid}/clicks", json=other, headers={"Idempotency-Key": "r-1"})
    assert refused.status_code == 422, refused.text
    assert refused.json()["type"] == "urn:icr:problem:idempotency-key-reused"
    assert deployment.state(sid)["version"] == 1


def test_a_retried_undo_undoes_once(deployment: Deployment) -> None:
    sid = deployment.create()
    for n, key in enumerate(("c-1", "c-2"), start=1):
        clicked = deployment.patient.post(f"/v1/sessions/{sid}/clicks", json=CLICK, headers={"Idempotency-Key": key})
        assert clicked.json()["version"] == n
    undo = deployment.patient.post(f"/v1/sessions/{sid}/undo", headers={"Idempotency-Key": "u-1", "If-Match": '"2"'})
    assert undo.status_code == 200 and undo.json()["version"] == 3
    assert len(undo.json()["clicks"]) == 1
    # the retry (If-Match now stale) is answered with the first undo's outcome, not applied again
    retry = deployment.impatient.post(f"/v1/sessions/{sid}/undo", headers={"Idempotency-Key": "u-1", "If-Match": '"2"'})
    assert retry.status_code == 200 and retry.json()["version"] == 3
    state = deployment.state(sid)
    assert state["version"] == 3 and len(state["clicks"]) == 1
    reused = deployment.patient.post(f"/v1/sessions/{sid}/clicks", json=CLICK, headers={"Idempotency-Key": "u-1"})
    assert reused.status_code == 422
