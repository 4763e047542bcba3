"""A click's X-Request-ID, from the client through `icr serve` to the `icr worker` that ran it
(real processes over the test run's Redis), and what the logs must never hold."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.bench.processes import Process, free_port, start_process, wait_ready

pytestmark = pytest.mark.slow  # starts icr serve and icr worker processes

PATIENT_FILE_NAME = "DOE^JOHN-1960-ct.nii.gz"


@dataclass
class Deployment:
    url: str
    worker_metrics: str
    api: Process
    worker: Process

    def log_lines(self, process: Process) -> list[dict]:
        assert process.log is not None
        lines = []
        for text in process.log.read_text(errors="replace").splitlines():
            if text.startswith("{"):
                lines.append(json.loads(text))
        return lines


@pytest.fixture(scope="module")
def deployment(tiny_weights: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICR_") and k != "REDIS_URL"}
    metrics_port = free_port()
    env.update({
        "REDIS_URL": redis_url, "ICR_REDIS_PREFIX": f"ops-{uuid.uuid4().hex[:8]}", "ICR_WEIGHTS": str(tiny_weights),
        "ICR_DEVICE": "cpu", "ICR_TORCH_THREADS": "1", "ICR_JOB_TIMEOUT_S": "60",
        "ICR_WORKER_METRICS_PORT": str(metrics_port), "PYTHONUNBUFFERED": "1",
    })
    logs = tmp_path_factory.mktemp("tracing")
    port = free_port()
    icr = [sys.executable, "-m", "service.cli"]
    api = start_process("serve", [*icr, "serve", "--port", str(port)], env, logs)
    worker = start_process("worker", [*icr, "worker", "--name", "tracing-worker"], env, logs)
    try:
        wait_ready(f"http://127.0.0.1:{port}", api)
        yield Deployment(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}", api, worker)
    finally:
        worker.stop()
        api.stop()


def wait_for_line(deployment: Deployment, process: Process, **fields: object) -> dict:
    """The first JSON log line of ``process`` with ``fields``; the worker logs a job after answering it."""
    for _ in range(200):
        for line in deployment.log_lines(process):
            if all(line.get(k) == v for k, v in fields.items()):
                return line
        if process.popen.poll() is not None:
            break
        time.sleep(0.05)
    pytest.fail(f"no log line of {process.name} with {fields}:\n{process.log_tail()}")


def test_request_id_reaches_the_worker_log(deployment: Deployment, ct_pet_files: dict[str, Path]) -> None:
    files = {"ct": (PATIENT_FILE_NAME, ct_pet_files["ct"].read_bytes()),
             "pet": ("DOE^JOHN-1960-pet.nii.gz", ct_pet_files["pet"].read_bytes())}
    with httpx.Client(base_url=deployment.url, timeout=60) as client:
        created = client.post("/v1/sessions", files=files, headers={"X-Request-ID": "create-1"})
        assert created.status_code == 201 and created.headers["x-request-id"] == "create-1"
        sid = created.json()["id"]
        click_id = f"click-{uuid.uuid4().hex[:8]}"
        click = client.post(f"/v1/sessions/{sid}/clicks", headers={"X-Request-ID": click_id},
                            json={"clicks": [{"label": "foreground", "voxel": [16, 16, 16]}]})
        assert click.status_code == 200 and click.headers["x-request-id"] == click_id
        made = client.get(f"/v1/sessions/{sid}")
        assert len(made.headers["x-request-id"]) == 32

    worker_line = wait_for_line(deployment, deployment.worker, request_id=click_id, session_id=sid)
    assert worker_line["job_id"] and worker_line["level"] == "INFO"
    api_line = wait_for_line(deployment, deployment.api, request_id=click_id, route="/v1/sessions/{session_id}/clicks")
    assert (api_line["status"], api_line["session_id"], api_line["method"]) == (200, sid, "POST")
    assert wait_for_line(deployment, deployment.api, request_id="create-1", status=201)["session_id"] == sid
    wait_for_line(deployment, deployment.worker, request_id="create-1", session_id=sid)

    for process in (deployment.api, deployment.worker):
        assert process.log is not None
        text = process.log.read_text(errors="replace")
        assert "DOE^JOHN" not in text and ".nii" not in text
        assert all(line.startswith("{") for line in text.splitlines() if line.strip()), process.name

    # the worker's own endpoint counted both jobs; the API's /metrics reads the queue's state
    assert httpx.get(f"{deployment.worker_metrics}/readyz", timeout=10).status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{deployment.worker_metrics}/metrics").text)}
    done = {s.labels["kind"]: s.value for s in families["icr_jobs"].samples
            if s.name == "icr_jobs_total" and s.labels["outcome"] == "done"}
    assert done.get("initial", 0) >= 1 and done.get("refine", 0) >= 1
    api = {f.name for f in text_string_to_metric_families(httpx.get(f"{deployment.url}/metrics").text)}
    assert {"icr_queue_jobs", "icr_workers_live", "icr_sessions_live", "icr_store_bytes"} <= api
