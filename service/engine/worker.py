"""The engine worker: takes jobs from the queue, runs the ensembles, commits results.

A job names the version it was computed from; the commit lands only if that is
still the session's current version (else the outcome is ``stale``), and a job
delivered twice (its first worker died after committing) lands once. While a job
runs, the worker keeps its claim alive so no other worker takes it; a worker that
dies stops doing so and its job is reclaimed by another.
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

from service.engine.ensemble import Engine, Pass
from service.engine.guarantee import honour_radius_voxels
from service.engine.uncertainty import encode_uncertainty, summarise, votes_after_clicks
from service.store.codec import decode_array, encode_probability
from service.store.contract import (
    CommitResult,
    Job,
    JobOutcome,
    JobQueue,
    OutcomeStatus,
    SessionGone,
    SessionNotFound,
    SessionStore,
    VersionRecord,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
IMAGE_CACHE_SESSIONS = 4

_OUTCOMES = {
    CommitResult.COMMITTED: OutcomeStatus.DONE,
    CommitResult.DUPLICATE: OutcomeStatus.DONE,
    CommitResult.STALE: OutcomeStatus.STALE,
    CommitResult.GONE: OutcomeStatus.GONE,
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
    ) -> None:
        self.engine = engine
        self.store = store
        self.queue = queue
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._keep_alive_s = max(claim_idle_s / 3, 0.05)
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()

    # -- loop -------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": str(self.engine.device),
            "weights": self.engine.checkpoint.digest,
            "precision": self.engine.precision,
            "grid_shape": list(self.engine.grid_shape),
            "spacing_mm": self.engine.checkpoint.spacing_mm,
        }

    def run(self, stop: threading.Event, *, poll_s: float = 1.0) -> None:
        """Serve jobs until ``stop`` is set; the job in hand is finished first."""
        beat = threading.Thread(target=self._heartbeat, args=(stop,), name="icr-heartbeat", daemon=True)
        beat.start()
        log.info("worker %s serving on %s", self.name, self.engine.device)
        while not stop.is_set():
            job = self.queue.next_job(self.name, block_s=poll_s)
            if job is not None:
                self.handle(job)
        log.info("worker %s stopped", self.name)

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.queue.heartbeat(self.name, self.info())
            except Exception:  # a store outage must not kill the worker; the loop retries
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
        """Process, publish the outcome, then acknowledge (so a crash before the ack retries)."""
        started = time.perf_counter()
        with self._claim_held(job):
            outcome = self._process_safely(job)
        self.queue.publish_outcome(outcome)
        self.queue.ack(job)
        log.info(
            "job %s %s on session %s: %s in %.2f s",
            job.id, job.kind, job.session_id, outcome.status.value, time.perf_counter() - started,
        )
        return outcome

    def _process_safely(self, job: Job) -> JobOutcome:
        try:
            return self.process(job)
        except (SessionGone, SessionNotFound):
            return JobOutcome(job.id, OutcomeStatus.GONE, message="session was deleted or expired")
        except Exception as error:
            log.exception("job %s failed", job.id)
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
        if job.kind == "initial":
            result_pass = self.engine.initial_pass(images)
            parent = None
        else:
            base = self.store.get_version(job.session_id, job.base_version)
            previous = decode_array(self.store.load_probability(job.session_id, job.base_version))
            new_clicks = len(job.clicks) - len(base.clicks)  # a refinement window goes around these
            result_pass = self.engine.refine_pass(images, previous, job.clicks, new_clicks=new_clicks)
            parent = job.base_version
        probability = result_pass.probability
        record = VersionRecord(
            version=version, parent=parent, clicks=job.clicks, job_id=job.id, probability_of=version
        )
        result = self.store.commit_version(
            job.session_id, job.base_version, record, encode_probability(probability), self._uncertainty(job, result_pass)
        )
        status = _OUTCOMES[result]
        return JobOutcome(job.id, status, version=version if status is OutcomeStatus.DONE else None)

    def _uncertainty(self, job: Job, result_pass: Pass) -> bytes:
        """The members' disagreement kept with the version (:mod:`service.engine.uncertainty`)."""
        spacing = self.engine.checkpoint.spacing_mm
        votes = votes_after_clicks(result_pass.votes, result_pass.members, job.clicks, honour_radius_voxels(spacing))
        return encode_uncertainty(votes, summarise(votes, result_pass.members, result_pass.probability, spacing))
