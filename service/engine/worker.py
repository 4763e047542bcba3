"""The engine worker: takes jobs from the queue, runs the ensembles, commits results.

A job names the version it was computed from; the commit lands only if that is
still the session's current version (else the outcome is ``stale``), a job delivered
twice (its first worker died after committing) lands once, and a job its request
cancelled is skipped or, if already running, never commits. While a job runs, the
worker keeps its claim alive and heartbeats; a worker that dies stops both and its
job is taken over by another. A store outage never kills the worker: it waits with
backoff and carries on, re-registering its heartbeat when the store is back.

The click guarantee (:mod:`service.engine.guarantee`) is applied to every pass before
its probability is stored, unless ``honour_clicks`` is off (research and evaluation).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from service import logs, metrics
from service.engine.ensemble import Engine
from service.engine.guarantee import honour_clicks, honour_radius_voxels
from service.engine.outputs import version_blobs
from service.engine.uncertainty import encode_uncertainty, summarise, votes_after_clicks
from service.store.codec import decode_array
from service.store.contract import (
    BLOB_PROBABILITY,
    BLOB_UNCERTAINTY,
    Click,
    CommitResult,
    Job,
    JobOutcome,
    JobQueue,
    OutcomeStatus,
    SessionGone,
    SessionNotFound,
    SessionStore,
    StoreUnavailable,
    VersionRecord,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
IMAGE_CACHE_SESSIONS = 4
OUTAGE_BACKOFF_S = (0.2, 5.0)  # first and longest wait while the store is unreachable

_OUTCOMES = {
    CommitResult.COMMITTED: OutcomeStatus.DONE,
    CommitResult.DUPLICATE: OutcomeStatus.DONE,
    CommitResult.STALE: OutcomeStatus.STALE,
    CommitResult.GONE: OutcomeStatus.GONE,
    CommitResult.CANCELLED: OutcomeStatus.CANCELLED,
}


class Worker:
    def __init__(
        self,
        engine: Engine,
        store: SessionStore,
        queue: JobQueue,
        *,
        name: str | None = None,
        claim_idle_s: float = 30.0,
        honour_clicks: bool = True,
    ) -> None:
        self.engine = engine
        self.store = store
        self.queue = queue
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._keep_alive_s = max(claim_idle_s / 3, 0.05)
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()
        self.honour_clicks = honour_clicks
        metrics.watch_device(engine.device)

    # -- loop -------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": str(self.engine.device),
            "weights": self.engine.checkpoint.digest,
            "precision": self.engine.precision,
            "grid_shape": list(self.engine.grid_shape),
            "spacing_mm": self.engine.checkpoint.spacing_mm,
            "stages": list(self.engine.stages),  # without "refinement", clicks are refused (409)
        }

    def run(self, stop: threading.Event, *, poll_s: float = 1.0) -> None:
        """Serve jobs until ``stop`` is set; the job in hand is finished first."""
        beat = threading.Thread(target=self._heartbeat, args=(stop,), name="icr-heartbeat", daemon=True)
        beat.start()
        log.info("worker %s serving on %s", self.name, self.engine.device)
        wait_s = OUTAGE_BACKOFF_S[0]
        while not stop.is_set():
            try:
                job = self.queue.next_job(self.name, block_s=poll_s)
                if job is not None:
                    with logs.bound(request_id=job.request_id, session_id=job.session_id, job_id=job.id):
                        self.handle(job)
                wait_s = OUTAGE_BACKOFF_S[0]
            except StoreUnavailable as error:
                log.warning("store unavailable (%s); retrying in %.1f s", error, wait_s)
                stop.wait(wait_s)
                wait_s = min(wait_s * 2, OUTAGE_BACKOFF_S[1])
        try:
            self.queue.retire(self.name)
        except StoreUnavailable:
            log.warning("could not retire from the live set; it expires by itself")
        log.info("worker %s stopped", self.name)

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.queue.heartbeat(self.name, self.info())
                metrics.mark_heartbeat()
            except Exception:  # a store outage must not stop the heartbeat; it re-registers when back
                log.warning("heartbeat failed", exc_info=True)
            stop.wait(HEARTBEAT_S)

    @contextmanager
    def _claim_held(self, job: Job) -> Iterator[None]:
        done = threading.Event()

        def refresh() -> None:
            while not done.wait(self._keep_alive_s):
                try:
                    self.queue.keep_alive(job, self.name)
                except Exception:
                    log.warning("could not refresh the claim on job %s", job.id, exc_info=True)

        thread = threading.Thread(target=refresh, name="icr-claim", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def handle(self, job: Job) -> JobOutcome:
        """Process and record the outcome, then acknowledge (so a crash before the ack retries)."""
        started = time.perf_counter()
        earlier = self.queue.job_outcome(job.session_id, job.id)
        if earlier is not None and earlier.status.finished:  # cancelled, or done before a crash
            self.queue.ack(job)
            log.info("job %s skipped: already %s", job.id, earlier.status.value)
            return earlier
        metrics.observe_phase(job.kind, "queue_wait", time.time() - job.created_at)
        with self._claim_held(job):
            outcome = self._process_safely(job)
        if outcome.status not in (OutcomeStatus.DONE, OutcomeStatus.CANCELLED):
            self.queue.finish(job.session_id, outcome)  # a commit records done itself
        self.queue.ack(job)
        metrics.JOBS.labels(job.kind, outcome.status.value).inc()
        log.info(
            "job %s %s on session %s: %s in %.2f s",
            job.id, job.kind, job.session_id, outcome.status.value, time.perf_counter() - started,
        )
        return outcome

    def _process_safely(self, job: Job) -> JobOutcome:
        try:
            return self.process(job)
        except StoreUnavailable:
            raise  # not the job's fault: it stays pending and is retried
        except (SessionGone, SessionNotFound):
            return JobOutcome(job.id, OutcomeStatus.GONE, message="session was deleted or expired")
        except Exception as error:
            log.exception("job %s failed", job.id)
            metrics.ENGINE_FAILURES.labels(job.kind, type(error).__name__).inc()
            return JobOutcome(job.id, OutcomeStatus.FAILED, message=f"engine error: {type(error).__name__}")

    # -- one job ----------------------------------------------------------------
    def _session_images(self, session_id: str) -> np.ndarray:
        if session_id in self._images:
            self._images.move_to_end(session_id)
            return self._images[session_id]
        images = decode_array(self.store.load_images(session_id)).astype(np.float32)
        self._images[session_id] = images
        while len(self._images) > IMAGE_CACHE_SESSIONS:
            self._images.popitem(last=False)
        return images

    def process(self, job: Job) -> JobOutcome:
        images = self._session_images(job.session_id)
        version = job.base_version + 1
        clicks: tuple[Click, ...] = ()
        started = time.perf_counter()
        if job.kind == "initial":
            result_pass = self.engine.initial_pass(images)
            parent = None
        else:
            base = self.store.load_blob(job.session_id, job.base_version, BLOB_PROBABILITY)
            previous = decode_array(base.blob)
            clicks = base.record.clicks + job.new_clicks
            result_pass = self.engine.refine_pass(images, previous, clicks, new_clicks=len(job.new_clicks))
            parent = job.base_version
        spacing = self.engine.checkpoint.spacing_mm
        probability, votes = result_pass.probability, result_pass.votes
        if self.honour_clicks:
            radius = honour_radius_voxels(spacing)
            probability = honour_clicks(probability, clicks, radius)
            votes = votes_after_clicks(votes, result_pass.members, clicks, radius)
        encoding = time.perf_counter()
        blobs, summary = version_blobs(probability, spacing)
        disagreement = summarise(votes, result_pass.members, probability, spacing)
        blobs[BLOB_UNCERTAINTY] = encode_uncertainty(votes, disagreement)
        summary["uncertainty"] = disagreement.to_dict()
        record = VersionRecord(
            version=version, parent=parent, clicks=clicks, job_id=job.id, probability_of=version, summary=summary
        )
        committing = time.perf_counter()
        result = self.store.commit_version(job.session_id, job.base_version, record, blobs)
        metrics.observe_phase(job.kind, "engine", encoding - started)
        metrics.observe_phase(job.kind, "encode", committing - encoding)
        metrics.observe_phase(job.kind, "commit", time.perf_counter() - committing)
        status = _OUTCOMES[result]
        return JobOutcome(job.id, status, version=version if status is OutcomeStatus.DONE else None)
