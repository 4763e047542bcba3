"""In-process backend: the embedded default, one process, no Redis.

Same contract and semantics as the Redis backend (expiry, atomic commits,
idempotency, tombstones); one lock guards all state.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from service.store.contract import (
    OUTCOME_TTL_S,
    WORKER_TTL_S,
    CommitResult,
    Job,
    JobOutcome,
    JobQueue,
    SessionGone,
    SessionNotFound,
    SessionRecord,
    SessionStore,
    VersionRecord,
)


@dataclass
class _Session:
    record: SessionRecord
    images: bytes
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    blobs: dict[int, bytes] = field(default_factory=dict)
    uncertainty: dict[int, bytes] = field(default_factory=dict)
    idempotency: dict[str, str] = field(default_factory=dict)


class MemoryStore(SessionStore, JobQueue):
    def __init__(self, session_ttl_s: float, tombstone_ttl_s: float = 86400.0) -> None:
        self._ttl = session_ttl_s
        self._tombstone_ttl = tombstone_ttl_s
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._tombstones: dict[str, float] = {}
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._outcomes: dict[str, tuple[float, JobOutcome]] = {}
        self._outcome_ready = threading.Condition(self._lock)
        self._workers: dict[str, tuple[float, dict[str, Any]]] = {}

    # -- sessions ---------------------------------------------------------------
    def ping(self) -> bool:
        return True

    def _live(self, session_id: str, touch: bool) -> _Session:
        now = time.time()
        session = self._sessions.get(session_id)
        if session is not None and session.record.expires_at <= now:
            del self._sessions[session_id]
            self._tombstones[session_id] = now + self._tombstone_ttl
            session = None
        if session is None:
            if self._tombstones.get(session_id, 0.0) > now:
                raise SessionGone(session_id)
            raise SessionNotFound(session_id)
        if touch:
            session.record = dataclasses.replace(session.record, expires_at=now + self._ttl)
        return session

    def _sweep(self, now: float) -> None:
        """Drop expired sessions, so memory does not grow with sessions never read again."""
        for session_id in [s for s, v in self._sessions.items() if v.record.expires_at <= now]:
            del self._sessions[session_id]
            self._tombstones[session_id] = now + self._tombstone_ttl
        for session_id in [s for s, until in self._tombstones.items() if until <= now]:
            del self._tombstones[session_id]

    def create_session(self, record: SessionRecord, images: bytes) -> SessionRecord:
        now = time.time()
        record = dataclasses.replace(record, version=-1, expires_at=now + self._ttl)
        with self._lock:
            self._sweep(now)
            self._sessions[record.id] = _Session(record=record, images=images)
        return record

    def get_session(self, session_id: str, *, touch: bool = True) -> SessionRecord:
        with self._lock:
            return self._live(session_id, touch).record

    def delete_session(self, session_id: str) -> None:
        with self._lock:
            self._live(session_id, touch=False)
            del self._sessions[session_id]
            self._tombstones[session_id] = time.time() + self._tombstone_ttl

    def load_images(self, session_id: str) -> bytes:
        with self._lock:
            return self._live(session_id, touch=False).images

    def get_version(self, session_id: str, version: int) -> VersionRecord:
        with self._lock:
            session = self._live(session_id, touch=False)
            if version not in session.versions:
                raise SessionNotFound(f"{session_id} has no version {version}")
            return session.versions[version]

    def load_probability(self, session_id: str, version: int) -> bytes:
        with self._lock:
            session = self._live(session_id, touch=False)
            if version not in session.versions:
                raise SessionNotFound(f"{session_id} has no version {version}")
            return session.blobs[session.versions[version].probability_of]

    def load_uncertainty(self, session_id: str, version: int) -> bytes | None:
        with self._lock:
            session = self._live(session_id, touch=False)
            if version not in session.versions:
                raise SessionNotFound(f"{session_id} has no version {version}")
            return session.uncertainty.get(session.versions[version].probability_of)

    def commit_version(
        self,
        session_id: str,
        base_version: int,
        record: VersionRecord,
        probability: bytes | None,
        uncertainty: bytes | None = None,
    ) -> CommitResult:
        with self._lock:
            try:
                session = self._live(session_id, touch=False)
            except (SessionGone, SessionNotFound):
                return CommitResult.GONE
            landed = session.versions.get(record.version)
            if landed is not None and landed.job_id == record.job_id:
                return CommitResult.DUPLICATE
            if session.record.version != base_version:
                return CommitResult.STALE
            if probability is not None:
                session.blobs[record.version] = probability
            if uncertainty is not None:
                session.uncertainty[record.version] = uncertainty
            session.versions[record.version] = record
            session.record = dataclasses.replace(session.record, version=record.version)
            return CommitResult.COMMITTED

    def claim_idempotency(self, session_id: str, key: str) -> str | None:
        with self._lock:
            session = self._live(session_id, touch=False)
            if key in session.idempotency:
                return session.idempotency[key]
            session.idempotency[key] = "pending"
            return None

    def finish_idempotency(self, session_id: str, key: str, value: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.idempotency[key] = value

    def release_idempotency(self, session_id: str, key: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.idempotency.pop(key, None)

    # -- jobs -------------------------------------------------------------------
    def enqueue(self, job: Job) -> None:
        self._jobs.put(job)

    def next_job(self, consumer: str, block_s: float) -> Job | None:
        try:
            return self._jobs.get(timeout=block_s)
        except queue.Empty:
            return None

    def keep_alive(self, job: Job, consumer: str) -> None:
        """Nothing to do: an in-process job cannot outlive its worker."""

    def ack(self, job: Job) -> None:
        self._jobs.task_done()

    def publish_outcome(self, outcome: JobOutcome) -> None:
        with self._outcome_ready:
            now = time.monotonic()
            for job_id in [j for j, (at, _) in self._outcomes.items() if at < now - OUTCOME_TTL_S]:
                del self._outcomes[job_id]  # nobody waited for these
            self._outcomes[outcome.job_id] = (now, outcome)
            self._outcome_ready.notify_all()

    def wait_outcome(self, job_id: str, timeout_s: float) -> JobOutcome | None:
        deadline = time.monotonic() + timeout_s
        with self._outcome_ready:
            while job_id not in self._outcomes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._outcome_ready.wait(remaining)
            return self._outcomes.pop(job_id)[1]

    def heartbeat(self, worker: str, info: dict[str, Any]) -> None:
        with self._lock:
            self._workers[worker] = (time.time(), info)

    def live_workers(self) -> list[dict[str, Any]]:
        cutoff = time.time() - WORKER_TTL_S
        with self._lock:
            return [info for seen, info in self._workers.values() if seen > cutoff]
