"""``icr loadtest``: N concurrent sessions x M clicks against a running deployment.

Each session uploads a phantom CT+PET pair (generated here, seeded), then sends M
simulated corrective clicks one request at a time, each with its own Idempotency-Key
and retried with that key (a bounded number of times) after a 503 or a connection
error. At the end each session's click list, as the service reports it, is compared
with what was sent:

- *lost*: answered 200 but missing from the session;
- *duplicated*: in the session more often than it was sent;
- *landed after error*: in the session although its request ended in an error.

The report gives errors by status and problem type, p50/p95/p99 of session creation
and click latency as the client saw them, and, from the deployment's /metrics (the
API's and any ``--metrics`` URL, e.g. each worker's endpoint), the server's click
latency and per-phase percentiles over the run. Targets are loopback addresses unless
``--allow-remote`` is given.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from service.argtypes import non_negative_int, positive_int
from service.bench import scrape
from service.bench.simulated_user import ClickKey, SimulatedUser
from service.bench.stats import BenchError, summary_ms
from service.imaging.nifti import write_nifti
from service.imaging.volume import Volume
from service.metrics import PHASES
from service.science.phantoms import case_seed, make_case

log = logging.getLogger(__name__)

MAX_SESSIONS = 500
MAX_CLICKS = 100
MAX_RETRIES = 5
MAX_RETRY_WAIT_S = 5.0
RETRIED_STATUSES = frozenset({409, 503})  # 409 only for "request-in-flight": the key's first try still runs



@dataclass(frozen=True)
class Upload:
    """One phantom as a client sends it, with the truth its simulated user clicks against."""

    ct: bytes
    pet: bytes
    centre: str
    truth: Volume


def phantom_upload(seed: int) -> Upload:
    case = make_case(seed)
    where = np.argwhere(case.gtvt > 0)
    centre_voxel = where.mean(axis=0) if where.size else (np.asarray(case.ct.shape) - 1) / 2
    centre = case.ct_affine[:3, :3] @ centre_voxel + case.ct_affine[:3, 3]
    return Upload(
        ct=write_nifti(case.ct, case.ct_affine),
        pet=write_nifti(case.pet, case.pet_affine),
        centre=",".join(f"{v:.3f}" for v in centre),
        truth=Volume(array=(case.gtvt > 0).astype(np.float32), affine=case.ct_affine),
    )


@dataclass
class SessionRun:
    """What one simulated user did and saw."""

    index: int
    create_s: float | None = None
    click_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    acknowledged: list[ClickKey] = field(default_factory=list)
    failed: list[ClickKey] = field(default_factory=list)
    final: list[ClickKey] | None = None

    def check(self) -> dict[str, int]:
        final = Counter(self.final or [])
        sent = Counter(self.acknowledged) + Counter(self.failed)
        return {
            "lost": sum((Counter(self.acknowledged) - final).values()) if self.final is not None else 0,
            "duplicated": sum((final - sent).values()),
            "landed_after_error": sum((final & Counter(self.failed)).values()),
            "exact": int(self.final == self.acknowledged),
        }


def _error_name(response: httpx.Response) -> str:
    kind = ""
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        try:
            kind = str(response.json().get("type", "")).removeprefix("urn:icr:problem:")
        except ValueError:
            kind = "unreadable-problem"
    return f"{response.status_code} {kind or 'not-problem+json'}"


def _retry_wait(response: httpx.Response | None, attempt: int) -> float:
    header = response.headers.get("retry-after", "") if response is not None else ""
    wait = float(header) if header.replace(".", "", 1).isdigit() else 0.5 * 2**attempt
    return min(wait, MAX_RETRY_WAIT_S)


class LoadTest:
    def __init__(self, client: httpx.Client, uploads: Sequence[Upload], clicks: int, retries: int, seed: int) -> None:
        self.client = client
        self.uploads = uploads
        self.clicks = clicks
        self.retries = retries
        self.seed = seed

    def _send(self, run: SessionRun, method: str, path: str, **request: Any) -> httpx.Response | None:
        """The final answer to a request, retried with the same key on 503/in-flight/connection errors;
        None when every try failed to connect. Each try's error is counted."""
        response: httpx.Response | None = None
        for attempt in range(self.retries + 1):
            try:
                response = self.client.request(method, path, **request)
            except httpx.HTTPError as error:
                run.errors[f"connection {type(error).__name__}"] += 1
                response = None
            else:
                if response.status_code < 400:
                    return response
                run.errors[_error_name(response)] += 1
                retriable = response.status_code in RETRIED_STATUSES and (
                    response.status_code == 503 or "request-in-flight" in response.text
                )
                if not retriable:
                    return response
            if attempt < self.retries:
                run.retries += 1
                time.sleep(_retry_wait(response, attempt))
        return response

    def session(self, index: int) -> SessionRun:
        run = SessionRun(index)
        upload = self.uploads[index % len(self.uploads)]
        started = time.perf_counter()
        files = {"ct": ("ct.nii.gz", upload.ct), "pet": ("pet.nii.gz", upload.pet)}
        created = self._send(run, "POST", "/v1/sessions", files=files, data={"centre": upload.centre})
        if created is None or created.status_code != 201:
            return run
        run.create_s = time.perf_counter() - started
        body = created.json()
        sid = body["id"]
        user = SimulatedUser(upload.truth)
        rng = np.random.default_rng([self.seed, index])
        for _ in range(self.clicks):
            click = user.next_click(body, rng, always=True)
            assert click is not None
            headers = {"Idempotency-Key": uuid.uuid4().hex}
            payload = {"clicks": [{"label": click[0], "voxel": list(click[1])}]}
            started = time.perf_counter()
            answer = self._send(run, "POST", f"/v1/sessions/{sid}/clicks", json=payload, headers=headers)
            if answer is not None and answer.status_code == 200:
                run.click_s.append(time.perf_counter() - started)
                run.acknowledged.append(click)
                body = answer.json()
            else:
                run.failed.append(click)
        state = self._send(run, "GET", f"/v1/sessions/{sid}")
        if state is not None and state.status_code == 200:
            run.final = [(c["label"], (c["voxel"][0], c["voxel"][1], c["voxel"][2])) for c in state.json()["clicks"]]
        self._send(run, "DELETE", f"/v1/sessions/{sid}")
        return run


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


HEALTH_PROBE_S = 0.05  # how often the load test asks /healthz while the load runs


def probe_health(url: str, stop: threading.Event) -> list[float]:
    """Latencies (s) of /healthz, asked every HEALTH_PROBE_S on its own connection until ``stop``:
    what an orchestrator's liveness probe sees while the service is loaded."""
    samples: list[float] = []
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.wait(HEALTH_PROBE_S):
            started = time.perf_counter()
            try:
                client.get("/healthz")
            except httpx.HTTPError:
                continue  # an unanswered probe shows as a missing sample; errors are the sessions' to count
            samples.append(time.perf_counter() - started)
    return samples


def report(runs: list[SessionRun], sessions: int, clicks: int, wall_s: float, server: dict[str, Any],
           health_s: list[float] | None = None) -> dict[str, Any]:
    checks = [run.check() for run in runs]
    click_s = [s for run in runs for s in run.click_s]

    def latency(samples: list[float]) -> dict[str, Any]:
        summary = summary_ms(samples)
        summary["p99_ms"] = round(float(np.percentile(np.asarray(samples) * 1000, 99)), 3) if samples else None
        return summary

    return {
        "client_machine": {"cpu_count": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "sessions": sessions,
        "clicks_per_session": clicks,
        "wall_s": round(wall_s, 2),
        "sessions_created": sum(run.create_s is not None for run in runs),
        "clicks_acknowledged": len(click_s),
        "clicks_sent": sum(len(run.acknowledged) + len(run.failed) for run in runs),
        "clicks_per_s": round(len(click_s) / wall_s, 2) if wall_s > 0 else None,
        "errors": dict(sorted(sum((run.errors for run in runs), Counter()).items())),
        "retries": sum(run.retries for run in runs),
        "lost_clicks": sum(c["lost"] for c in checks),
        "duplicated_clicks": sum(c["duplicated"] for c in checks),
        "landed_after_error": sum(c["landed_after_error"] for c in checks),
        "sessions_exact": sum(c["exact"] for c in checks),
        "sessions_unchecked": sum(run.final is None for run in runs if run.create_s is not None),
        "client_create": latency([run.create_s for run in runs if run.create_s is not None]),
        "client_click": latency(click_s),
        "health_during_load": latency(health_s or []),
        "server": server,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url.rstrip("/")
    metrics_urls = [f"{url}/metrics", *args.metrics]
    for target in (url, *args.metrics):
        if not args.allow_remote and not _loopback(target):
            raise BenchError(f"{target} is not a loopback address; pass --allow-remote to load a remote deployment")
    log.info("generating %d phantom case(s)", args.cases)
    uploads = [phantom_upload(case_seed(args.seed, n)) for n in range(args.cases)]
    limits = httpx.Limits(max_connections=args.sessions + 4, max_keepalive_connections=args.sessions + 4)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=args.timeout_s, limits=limits) as client:
        if client.get("/healthz").status_code != 200:
            raise BenchError(f"{url}/healthz does not answer 200")
        before, _ = scrape.scrape(metrics_urls, client)
        test = LoadTest(client, uploads, args.clicks, args.retries, args.seed)
        stop_probe = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="icr-health") as prober:
            health = prober.submit(probe_health, url, stop_probe)
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.sessions, thread_name_prefix="icr-load") as pool:
                runs = list(pool.map(test.session, range(args.sessions)))
            wall_s = time.perf_counter() - started
            stop_probe.set()
            health_s = health.result()
        after, missing = scrape.scrape(metrics_urls, client)
    server = {
        "metrics_unreachable": missing,
        "click": scrape.added_quantiles(before, after, "icr_click_duration_seconds").get("all"),
        "refine_phases": {
            phase: stats for phase, stats in
            scrape.added_quantiles(before, after, "icr_job_phase_duration_seconds", "phase", {"kind": "refine"}).items()
        },
        "phase_order": list(PHASES),
    }
    return report(runs, args.sessions, args.clicks, wall_s, server, health_s)


def format_summary(result: dict[str, Any]) -> str:
    lines = [
        (f"{result['sessions']} sessions x {result['clicks_per_session']} clicks in {result['wall_s']} s: "
         f"{result['clicks_acknowledged']}/{result['clicks_sent']} clicks acknowledged, "
         f"{result['clicks_per_s']} clicks/s"),
        (f"lost {result['lost_clicks']}, duplicated {result['duplicated_clicks']}, landed after an error "
         f"{result['landed_after_error']}; sessions whose clicks are exactly those acknowledged: "
         f"{result['sessions_exact']}/{result['sessions_created']}"),
        f"errors: {result['errors'] or 'none'} (retries {result['retries']})",
    ]
    rows = [("client create", result["client_create"]), ("client click", result["client_click"]),
            ("healthz (load)", result["health_during_load"])]
    if result["server"]["click"]:
        rows.append(("server click", result["server"]["click"]))
    rows += [(f"  {phase}", result["server"]["refine_phases"][phase])
             for phase in result["server"]["phase_order"] if phase in result["server"]["refine_phases"]]
    lines.append(f"{'latency (ms)':<16}{'n':>6}{'p50':>10}{'p95':>10}{'p99':>10}")
    for name, stats in rows:
        lines.append(f"{name:<16}{stats['n']:>6}" + "".join(
            f"{'-' if stats.get(k) is None else stats[k]:>10}" for k in ("p50_ms", "p95_ms", "p99_ms")))
    return "\n".join(lines)


def _bounded(limit: int, *, zero: bool = False) -> Any:
    def parse(text: str) -> int:
        value = non_negative_int(text) if zero else positive_int(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"at most {limit}")
        return value
    return parse


def _command(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    try:
        result = run(args)
    except BenchError as error:
        print(f"icr loadtest: {error}", file=sys.stderr)
        return 2
    print(format_summary(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"report written to {args.out}")
    failed = result["lost_clicks"] or result["duplicated_clicks"] or result["landed_after_error"]
    return 1 if failed else 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``loadtest`` to the ``icr`` command."""
    loadtest = commands.add_parser(
        "loadtest", help="N concurrent sessions x M clicks against a running deployment; errors, latency, "
        "lost or duplicated clicks", description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    loadtest.add_argument("url", help="the deployment's base URL, e.g. http://127.0.0.1:8000")
    loadtest.add_argument("--sessions", type=_bounded(MAX_SESSIONS), default=20, help="concurrent sessions (20)")
    loadtest.add_argument("--clicks", type=_bounded(MAX_CLICKS), default=10, help="clicks per session (10)")
    loadtest.add_argument("--cases", type=_bounded(50), default=4, help="distinct phantom cases, shared round-robin (4)")
    loadtest.add_argument("--retries", type=_bounded(MAX_RETRIES, zero=True), default=2,
                          help=f"retries of a request after a 503 or connection error, same key (2, at most {MAX_RETRIES})")
    loadtest.add_argument("--timeout-s", type=float, default=330.0, help="per-request timeout (330)")
    loadtest.add_argument("--metrics", action="append", default=[], metavar="URL",
                          help="another /metrics to read phases from (each worker's endpoint); repeatable")
    loadtest.add_argument("--api-key", default=None, help="bearer key when the service has ICR_API_KEYS")
    loadtest.add_argument("--seed", type=int, default=0, help="phantom and click seed (0)")
    loadtest.add_argument("--out", default=None, help="write the JSON report here")
    loadtest.add_argument("--allow-remote", action="store_true", help="allow a target that is not a loopback address")
    loadtest.set_defaults(run=_command)
    return loadtest
