"""Click round trips over real HTTP, in the embedded and the Redis + worker modes."""

from __future__ import annotations

import argparse
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.bench.processes import (
    SERVICE_JOB_TIMEOUT_S,
    free_port,
    icr_command,
    service_env,
    start_process,
    start_redis,
    wait_ready,
)
from service.bench.simulated_user import SimulatedUser
from service.bench.stats import BenchError, summary_ms
from service.imaging.nifti import load_nifti_file
from service.imaging.volume import Volume
from service.science.dataset import Case, PreparedCase

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class HttpCase:
    """The files a client uploads (by role), where to centre the grid, and the truth to click against."""

    uploads: dict[str, Path]
    centre_mm: tuple[float, float, float]
    gtvt: Volume


def http_case(case: Case, prepared: PreparedCase) -> HttpCase:
    label = load_nifti_file(case.gtvt, role="gtvt")
    grid = prepared.grid
    centre = np.asarray(grid.origin_mm) + grid.spacing_mm * (np.asarray(grid.shape) - 1) / 2
    return HttpCase({"ct": case.ct, "pet": case.pet}, (float(centre[0]), float(centre[1]), float(centre[2])),
                    Volume(array=(label.array > 0).astype(np.float32), affine=label.affine))


@dataclass
class HttpSamples:
    create: list[float] = field(default_factory=list)
    click: list[float] = field(default_factory=list)
    click_response_bytes: list[int] = field(default_factory=list)


def checked(response: httpx.Response, expected: int) -> dict[str, Any]:
    if response.status_code != expected:
        raise BenchError(f"{response.request.method} {response.request.url.path}: "
                         f"HTTP {response.status_code}: {response.text[:500]}")
    return dict(response.json())


def click_sessions(url: str, data: HttpCase, sessions: int, clicks: int, seed: int) -> HttpSamples:
    """Create ``sessions`` sessions and correct each with up to ``clicks`` simulated clicks, one POST per click."""
    samples = HttpSamples()
    files = {role: (f"{role}.nii.gz", path.read_bytes()) for role, path in data.uploads.items()}
    centre = ",".join(f"{v:.6f}" for v in data.centre_mm)
    with httpx.Client(base_url=url, timeout=SERVICE_JOB_TIMEOUT_S) as client:
        for session in range(sessions):
            started = time.perf_counter()
            body = checked(client.post("/v1/sessions", files=files, data={"centre": centre}), 201)
            samples.create.append(time.perf_counter() - started)
            user = SimulatedUser(data.gtvt)
            rng = np.random.default_rng([seed, session])
            for _ in range(clicks):
                simulated = user.next_click(body, rng)
                if simulated is None:
                    break
                request = {"clicks": [{"label": simulated[0], "voxel": list(simulated[1])}]}
                started = time.perf_counter()
                response = client.post(f"/v1/sessions/{body['id']}/clicks", json=request)
                samples.click.append(time.perf_counter() - started)
                samples.click_response_bytes.append(len(response.content))
                body = checked(response, 200)
            client.delete(f"/v1/sessions/{body['id']}")
    return samples


def http_report(samples: HttpSamples, peaks: dict[str, float | None]) -> dict[str, Any]:
    return {
        "create_session": summary_ms(samples.create),
        "click": summary_ms(samples.click),
        "click_response_bytes_mean": (round(float(np.mean(samples.click_response_bytes)), 1)
                                      if samples.click_response_bytes else None),
        "peak_rss_mib": peaks,
    }


def bench_embedded(weights: Path, data: HttpCase, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`icr serve` with its in-process store and engine."""
    port = free_port()
    api = start_process("serve-embedded", icr_command("serve", "--port", str(port)),
                        service_env(weights, args, None), work)
    try:
        wait_ready(f"http://127.0.0.1:{port}", api)
        samples = click_sessions(f"http://127.0.0.1:{port}", data, args.repeats, args.clicks, args.seed)
    finally:
        peak = api.stop()
    return http_report(samples, {"serve": peak})


def bench_redis(weights: Path, data: HttpCase, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`icr serve` as a pure API over a real redis-server, with one `icr worker`."""
    with ExitStack() as stack:
        server, redis_url = start_redis(work)
        stack.callback(server.stop)
        env = service_env(weights, args, redis_url)
        port = free_port()
        api = start_process("serve-redis", icr_command("serve", "--port", str(port)), env, work)
        worker = start_process("worker", icr_command("worker", "--name", "bench-worker"), env, work)
        peaks: dict[str, float | None] = {}
        try:
            wait_ready(f"http://127.0.0.1:{port}", api)
            samples = click_sessions(f"http://127.0.0.1:{port}", data, args.repeats, args.clicks, args.seed)
        finally:
            peaks["worker"] = worker.stop()
            peaks["serve"] = api.stop()
    return http_report(samples, peaks)


