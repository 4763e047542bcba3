"""Prometheus metrics of the API and the engine workers: every family is defined here, once.

Two kinds of family:

- *Events* (histograms and counters) are observed where they happen: requests by the
  request middleware, click phases by the API and the worker, job outcomes and engine
  failures by the worker, problems where a problem response is made.
- *State* (queue depth, stream lag, live workers, sessions, bytes stored, GPU memory)
  is read from the store or the device when Prometheus scrapes, by the collectors at
  the bottom, so it is never stale and costs nothing between scrapes.

With ``PROMETHEUS_MULTIPROC_DIR`` set (an API run under several processes), the event
families live in that directory's files and :func:`exposition` merges them with
``prometheus_client``'s own multi-process collector.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from service.store.contract import StoreStats

log = logging.getLogger(__name__)

# Interactive latencies: a click should take well under a second on a GPU, minutes on a CPU at worst.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                     7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)

# The click's phases, in the order a click goes through them; see docs/operations.md.
PHASES = ("validation", "queue_wait", "engine", "encode", "commit")

REQUEST_SECONDS = Histogram(
    "icr_http_request_duration_seconds",
    "HTTP requests by route template, method and status: time from the request's arrival to the "
    "end of its response.",
    ("route", "method", "status"),
    buckets=LATENCY_BUCKETS_S,
)
CLICK_SECONDS = Histogram(
    "icr_click_duration_seconds",
    "Successful click requests (POST .../clicks answered 200), end to end on the API.",
    buckets=LATENCY_BUCKETS_S,
)
PHASE_SECONDS = Histogram(
    "icr_job_phase_duration_seconds",
    "One phase of an engine job: validation (API, request arrival to enqueue), queue_wait (enqueue to a "
    "worker taking it), engine (the ensemble pass), encode (probability to blob), commit (store write).",
    ("kind", "phase"),
    buckets=LATENCY_BUCKETS_S,
)
JOBS = Counter("icr_jobs_total", "Engine jobs finished by this worker, by kind and outcome.", ("kind", "outcome"))
ENGINE_PASSES = Counter(
    "icr_engine_passes_total",
    "Ensemble passes run by this worker, by job kind and stage (initial, refinement): a click in the current "
    "window runs one refinement pass; one that moves the window into new territory, or the border rule, adds more. "
    "The checkpoint's zero-click passes, which follow each initial pass, count as refinement passes.",
    ("kind", "stage"),
)
JOBS_RECLAIMED = Counter(
    "icr_jobs_reclaimed_total", "Jobs this worker took over from a worker that stopped refreshing its claim."
)
ENGINE_FAILURES = Counter(
    "icr_engine_failures_total", "Engine jobs that raised, by kind and exception type.", ("kind", "error")
)
PROBLEMS = Counter(
    "icr_problems_total", "problem+json answers, by problem type (urn:icr:problem:<type>) and status.",
    ("type", "status"),
)
WORKER_HEARTBEAT = Gauge(
    "icr_worker_heartbeat_timestamp_seconds",
    "Unix time of this worker's last heartbeat the store accepted.",
    multiprocess_mode="max",
)


def observe_phase(kind: str, phase: str, seconds: float) -> None:
    PHASE_SECONDS.labels(kind, phase).observe(max(seconds, 0.0))


def count_problem(kind: str, status: int) -> None:
    PROBLEMS.labels(kind, str(status)).inc()


# -- state, read at scrape time -----------------------------------------------------
class StoreCollector(Collector):
    """Queue, sessions, storage and live workers, from the store at each scrape.

    ``stats`` may raise (the store is down): the scrape then reports ``icr_store_up 0``
    and leaves the other state families out rather than failing the scrape."""

    def __init__(self, stats: Callable[[], StoreStats], workers: Callable[[], list[dict[str, object]]]) -> None:
        self._stats = stats
        self._workers = workers

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("icr_store_up", "1 when the store answered this scrape, else 0.")
        try:
            stats = self._stats()
            workers = self._workers()
        except Exception as error:  # noqa: BLE001 - any backend's failure: the scrape must still answer
            log.warning("store state unavailable for metrics: %s", type(error).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("icr_queue_jobs", "Engine jobs in the queue: queued (not yet taken) or "
                                  "pending (taken, not yet acknowledged).", labels=["state"])
        depth.add_metric(["queued"], stats.queued)
        depth.add_metric(["pending"], stats.pending)
        yield depth
        yield GaugeMetricFamily("icr_queue_lag_seconds", "Age of the oldest job no worker has taken yet.",
                                value=stats.oldest_queued_age_s)
        live = GaugeMetricFamily("icr_workers_live", "Engine workers with a recent heartbeat, by device and "
                                 "precision.", labels=["device", "precision"])
        for (device, precision), count in sorted(Tally(
            (str(w.get("device", "")), str(w.get("precision", ""))) for w in workers
        ).items()):
            live.add_metric([device, precision], count)
        yield live
        if stats.sessions is not None:
            yield GaugeMetricFamily("icr_sessions_live", "Sessions stored and not expired.", value=stats.sessions)
        if stats.bytes_stored is not None:
            yield GaugeMetricFamily("icr_store_bytes", "Bytes the store holds (Redis: used_memory of the server).",
                                    value=stats.bytes_stored)


class GpuCollector(Collector):
    """CUDA memory of this process, per device, at each scrape."""

    def __init__(self, device_index: int) -> None:
        self._index = device_index

    def collect(self) -> Iterable[Metric]:
        import torch

        family = GaugeMetricFamily("icr_gpu_memory_bytes", "CUDA memory of this process: allocated by tensors, "
                                   "reserved by the caching allocator, and the peak allocated.",
                                   labels=["device", "kind"])
        device = f"cuda:{self._index}"
        family.add_metric([device, "allocated"], torch.cuda.memory_allocated(self._index))
        family.add_metric([device, "reserved"], torch.cuda.memory_reserved(self._index))
        family.add_metric([device, "peak_allocated"], torch.cuda.max_memory_allocated(self._index))
        yield family


_watched_devices: set[int] = set()


def watch_device(device: object) -> None:
    """Export GPU memory for a CUDA ``torch.device`` (once per device; nothing for a CPU)."""
    if getattr(device, "type", None) != "cuda":
        return
    import torch

    index = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()  # type: ignore[attr-defined]
    if index not in _watched_devices:
        _watched_devices.add(index)
        REGISTRY.register(GpuCollector(int(index)))


def mark_heartbeat() -> None:
    WORKER_HEARTBEAT.set(time.time())


def last_heartbeat() -> float:
    """Unix time of this process's last accepted heartbeat (0 before the first)."""
    return float(REGISTRY.get_sample_value("icr_worker_heartbeat_timestamp_seconds") or 0.0)


def exposition(*collectors: Collector) -> bytes:
    """The text exposition of this process's families (or all processes', in multi-process mode),
    followed by ``collectors`` read now."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        events = CollectorRegistry()
        multiprocess.MultiProcessCollector(events)
        text = generate_latest(events)
    else:
        text = generate_latest(REGISTRY)
    state = CollectorRegistry()
    for collector in collectors:
        state.register(collector)
    return text + generate_latest(state)
