"""Real service processes over HTTP: the embedded default, and API + workers over Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.bench import processes
from service.bench.processes import free_port
from tests.conftest import random_weights

API_KEYS = ("key-alpha", "key-beta")


@dataclass
class Service:
    """A running API: its base URL and the headers a caller sends."""

    url: str
    logs: list[Path]
    headers: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def log_text(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.logs)

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        """A client with this service's headers, or with ``headers`` instead (``{}``: none)."""
        return httpx.Client(base_url=self.url, headers=self.headers if headers is None else headers, timeout=120)


def service_env(weights: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICR_") and k != "REDIS_URL"}
    env.update(
        {
            "ICR_WEIGHTS": str(weights),
            "ICR_DEVICE": "cpu",
            "ICR_TORCH_THREADS": "1",
            "ICR_MAX_UPLOAD_MB": "2",
            "ICR_MAX_IMAGE_MB": "16",
            "ICR_JOB_TIMEOUT_S": "60",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    stream = log.open("ab")
    return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=env, stdout=stream,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as an orchestrator sends it; the exit code (killed after 30 s if it hangs)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until /readyz answers 200; fails with the log's tail if the process exits first."""
    processes.wait_ready(url, processes.Process("service", process, log))


@pytest.fixture(scope="session")
def slow_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The paper's architecture on a 48^3 grid: a job takes seconds, long enough to die in."""
    from service.engine.networks import PAPER_ARCHITECTURE

    return random_weights(tmp_path_factory.mktemp("slow-weights"), PAPER_ARCHITECTURE, (48, 48, 48), seed=1)


@pytest.fixture(scope="session")
def embedded_service(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`icr serve` with no Redis and API keys on."""
    port = free_port()
    env = service_env(tiny_weights, ICR_API_KEYS=",".join(API_KEYS))
    log = tmp_path_factory.mktemp("embedded") / "serve.log"
    process = start(["serve", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        yield Service(url, [log], {"Authorization": f"Bearer {API_KEYS[0]}"}, env)
    finally:
        stop(process)


@pytest.fixture(scope="session")
def redis_service(
    tiny_weights: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """`icr serve` as a pure API over Redis with one `icr worker`; auth off."""
    port = free_port()
    env = service_env(tiny_weights, REDIS_URL=redis_url, ICR_REDIS_PREFIX="e2e")
    logs = tmp_path_factory.mktemp("redis-mode")
    api = start(["serve", "--port", str(port)], env, logs / "serve.log")
    worker = start(["worker", "--name", "e2e-worker"], env, logs / "worker.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, api, logs / "serve.log")
        yield Service(url, [logs / "serve.log", logs / "worker.log"], {}, env)
    finally:
        stop(worker)
        stop(api)


@pytest.fixture(scope="session")
def inprocess_service(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The embedded mode in this process (``create_app`` + ``TestClient``), API keys on: the fast loop's API."""
    from tests.api.inprocess import in_process_service

    with in_process_service(tiny_weights, tmp_path_factory.mktemp("inprocess") / "api.log") as service:
        yield service


@pytest.fixture(params=[pytest.param("embedded", marks=pytest.mark.slow), pytest.param("redis", marks=pytest.mark.slow),
                        "inprocess"])
def service(request: pytest.FixtureRequest) -> Service:
    return request.getfixturevalue(f"{request.param}_service")


@pytest.fixture(params=[pytest.param("embedded", marks=pytest.mark.slow), "inprocess"])
def keyed_service(request: pytest.FixtureRequest) -> Service:
    """A service with API keys on (its headers carry the first key)."""
    return request.getfixturevalue(f"{request.param}_service")
