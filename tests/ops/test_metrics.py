"""/metrics on the API (in-process app, embedded engine) and on a worker's endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from service.engine.loading import load_engine
from service.settings import Settings

FAMILIES = {
    "icr_http_request_duration_seconds": "histogram",
    "icr_click_duration_seconds": "histogram",
    "icr_job_phase_duration_seconds": "histogram",
    "icr_jobs": "counter",
    "icr_jobs_reclaimed": "counter",
    "icr_engine_failures": "counter",
    "icr_problems": "counter",
    "icr_worker_heartbeat_timestamp_seconds": "gauge",
    "icr_store_up": "gauge",
    "icr_queue_jobs": "gauge",
    "icr_queue_lag_seconds": "gauge",
    "icr_workers_live": "gauge",
    "icr_sessions_live": "gauge",
    "icr_store_bytes": "gauge",
}


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def client(tiny_weights: Path) -> Iterator[TestClient]:
    settings = Settings(weights=tiny_weights, device="cpu", torch_threads=1)
    with TestClient(create_app(settings, load_engine(settings))) as test_client:
        yield test_client


def test_metrics_expose_every_family(client: TestClient) -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(client.get("/metrics").text)}
    for name, kind in FAMILIES.items():
        assert families.get(name) == kind, name


def test_counts_move_with_a_click(client: TestClient, ct_pet_files: dict[str, Path]) -> None:
    files = {role: (path.name, path.read_bytes()) for role, path in ct_pet_files.items()}
    created = client.post("/v1/sessions", files=files)
    assert created.status_code == 201
    sid = created.json()["id"]
    before = scrape(client)
    click = client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [{"label": "foreground", "voxel": [16, 16, 16]}]})
    assert click.status_code == 200
    outside = client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [{"label": "foreground", "voxel": [99, 0, 0]}]})
    assert outside.status_code == 422
    after = scrape(client)

    route = "/v1/sessions/{session_id}/clicks"
    moved = {
        "request 200": ("icr_http_request_duration_seconds_count", {"route": route, "method": "POST", "status": "200"}),
        "request 422": ("icr_http_request_duration_seconds_count", {"route": route, "method": "POST", "status": "422"}),
        "click": ("icr_click_duration_seconds_count", {}),
        "job": ("icr_jobs_total", {"kind": "refine", "outcome": "done"}),
        "problem": ("icr_problems_total", {"type": "click-outside-volume", "status": "422"}),
        **{phase: ("icr_job_phase_duration_seconds_count", {"kind": "refine", "phase": phase})
           for phase in ("validation", "queue_wait", "engine", "encode", "commit")},
    }
    for what, (name, labels) in moved.items():
        assert value(after, name, **labels) == value(before, name, **labels) + 1, what
    assert value(after, "icr_store_up") == 1
    assert value(after, "icr_sessions_live") >= 1
    assert value(after, "icr_store_bytes") > 0
    [worker] = [f for f in text_string_to_metric_families(client.get("/metrics").text) if f.name == "icr_workers_live"]
    assert [(s.labels["device"], s.value) for s in worker.samples] == [("cpu", 1.0)]
    assert value(after, "icr_queue_jobs", state="queued") == 0
    # the route label is the template and odd methods are "other": clients cannot grow the label set
    assert not any(sid in str(labels) for _, labels in after)
    client.request("BREW", f"/v1/sessions/{sid}")
    assert value(scrape(client), "icr_http_request_duration_seconds_count",
                 route="/v1/sessions/{session_id}", method="other", status="405") == 1


def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    echoed = client.get("/healthz", headers={"X-Request-ID": "trace-42.a_b:c"})
    assert echoed.headers["x-request-id"] == "trace-42.a_b:c"
    made = client.get("/healthz")
    assert len(made.headers["x-request-id"]) == 32
    for hostile in ("x" * 65, "a b", "<script>", "id\twith\ttabs"):
        answer = client.get("/healthz", headers={"X-Request-ID": hostile})
        assert answer.headers["x-request-id"] != hostile
        assert len(answer.headers["x-request-id"]) == 32
    problem = client.get("/v1/sessions/nope", headers={"X-Request-ID": "lookup-1"})
    assert problem.status_code == 404 and problem.headers["x-request-id"] == "lookup-1"


def test_worker_endpoint_serves_metrics_and_readiness() -> None:
    from service import metrics
    from service.engine import endpoint

    server = endpoint.serve("127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        stale = []
        for _ in range(5):  # an embedded worker of another test in this process may beat in between: try again
            metrics.WORKER_HEARTBEAT.set(0)
            stale.append(httpx.get(f"{url}/readyz").status_code)
            if stale[-1] == 503:
                break
        assert stale[-1] == 503, stale
        metrics.mark_heartbeat()
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200
        names = {f.name for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
        assert {"icr_job_phase_duration_seconds", "icr_jobs", "icr_worker_heartbeat_timestamp_seconds"} <= names
    finally:
        server.shutdown()
        server.server_close()


def test_redis_state_and_reclaims(redis_url: str, redis_prefix: str) -> None:
    import time

    from service import metrics
    from service.store.contract import Job, SessionRecord
    from service.store.redis_backend import connect

    store = connect(redis_url, session_ttl_s=60, claim_idle_s=0.05, prefix=redis_prefix)
    empty = store.stats()
    assert (empty.queued, empty.pending, empty.oldest_queued_age_s, empty.sessions) == (0, 0, 0.0, 0)
    store.create_session(SessionRecord("s1", None, {}, (1, 1, 1), ((1.0,),), time.time()), b"images")
    store.heartbeat("worker-a", {"name": "worker-a"})
    store.heartbeat("worker-b", {"name": "worker-b"})
    for n in range(3):
        store.submit(Job(id=f"job-{n}", session_id="s1", kind="refine", base_version=0))
    taken = store.next_job("worker-a", block_s=0.1)
    assert taken is not None and taken.id == "job-0"
    stats = store.stats()
    assert (stats.queued, stats.pending, stats.sessions) == (2, 1, 1)
    assert stats.oldest_queued_age_s >= 0 and stats.bytes_stored and stats.bytes_stored > 0
    reclaimed = metrics.REGISTRY.get_sample_value("icr_jobs_reclaimed_total") or 0.0
    time.sleep(0.1)  # worker-a stops refreshing its claim
    again = store.next_job("worker-b", block_s=0.1)
    assert again is not None and again.id == "job-0"
    assert metrics.REGISTRY.get_sample_value("icr_jobs_reclaimed_total") == reclaimed + 1
    store.ack(again)
    assert (store.stats().queued, store.stats().pending) == (2, 0)


def test_an_unexpected_error_is_a_problem_with_the_request_id(client: TestClient) -> None:
    import io
    import logging

    from service.logs import JsonFormatter

    def fails() -> None:
        raise RuntimeError("header text of case DOE^JANE")

    client.app.router.add_api_route("/test-only/fails", fails)  # type: ignore[attr-defined]
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("icr.access")
    access.addHandler(handler)
    try:
        answer = client.get("/test-only/fails", headers={"X-Request-ID": "failing-1"})
    finally:
        access.removeHandler(handler)
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["type"] == "urn:icr:problem:internal" and answer.json()["request_id"] == "failing-1"
    assert answer.headers["x-request-id"] == "failing-1"
    lines = [json.loads(text) for text in written.getvalue().splitlines()]
    [line] = [line for line in lines if "exception" in line]
    assert line["request_id"] == "failing-1" and line["exception"]["type"] == "RuntimeError"
    assert any(frame.endswith("in fails") for frame in line["exception"]["frames"])
    assert "DOE^JANE" not in written.getvalue()
    assert client.get("/healthz").status_code == 200


def test_multi_process_mode_merges_the_processes_files(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR (an API under several processes) /metrics adds up every process."""
    program = (
        "from service import metrics\n"
        "metrics.count_problem('session-not-found', 404)\n"
        "import sys; sys.stdout.buffer.write(metrics.exposition())\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    outputs = [subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, check=True).stdout
               for _ in range(2)]
    samples = {(s.name, s.labels.get("type")): s.value
               for f in text_string_to_metric_families(outputs[-1].decode()) for s in f.samples}
    assert samples[("icr_problems_total", "session-not-found")] == 2


def test_gpu_memory_is_exported_on_cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    from service import metrics

    metrics.watch_device(torch.device("cuda", 0))
    names = {f.name for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert "icr_gpu_memory_bytes" in names


def test_request_id_is_on_the_request_state(client: TestClient) -> None:
    """Handlers and problem bodies read the id as request.state.request_id."""

    def echo(request: Request) -> dict[str, str]:
        return {"request_id": request.state.request_id}

    client.app.router.add_api_route("/test-only/echo", echo)  # type: ignore[attr-defined]
    assert client.get("/test-only/echo", headers={"X-Request-ID": "state-1"}).json() == {"request_id": "state-1"}
