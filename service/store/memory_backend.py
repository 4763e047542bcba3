"""In-process backend: the embedded default, one process, no Redis.

Same contract and semantics as the Redis backend (expiry, atomic commits, job states,
idempotency bindings, tombstones); one lock guards all state, and one condition wakes
requests waiting for a job.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from service.store.contract import (
    WORKER_TTL_S,
    Binding,
    CommitResult,
    IdempotencyClaim,
    Job,
    JobOutcome,
    JobQueue,
    NoLiveWorker,
    OutcomeStatus,
    ScanMissing,
    SessionGone,
    SessionNotFound,
    SessionRecord,
    SessionStore,
    StoreStats,
    Submission,
    VersionBlob,
    VersionRecord,
)


@dataclass
class _Session:
    record: SessionRecord
    images: bytes
    scan: bytes | None = None
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    blobs: dict[tuple[str, int], bytes] = field(default_factory=dict)
    jobs: dict[str, JobOutcome] = field(default_factory=dict)
    bindings: dict[str, Binding] = field(default_factory=dict)


class MemoryStore(SessionStore, JobQueue):
    def __init__(self, session_ttl_s: float, tombstone_ttl_s: float = 86400.0) -> None:
        self._ttl = session_ttl_s
        self._tombstone_ttl = tombstone_ttl_s
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._sessions: dict[str, _Session] = {}
        self._tombstones: dict[str, float] = {}
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._workers: dict[str, tuple[float, dict[str, Any]]] = {}
        self._owned: dict[str, set[str]] = {}
        self._requests: dict[tuple[str, int], int] = {}

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
        with self._changed:
            self._live(session_id, touch=False)
            del self._sessions[session_id]
            self._tombstones[session_id] = time.time() + self._tombstone_ttl
            self._changed.notify_all()

    def load_images(self, session_id: str) -> bytes:
        with self._lock:
            return self._live(session_id, touch=False).images

    def store_scan(self, session_id: str, scan: bytes) -> None:
        with self._lock:
            self._live(session_id, touch=False).scan = scan

    def load_scan(self, session_id: str) -> bytes:
        with self._lock:
            scan = self._live(session_id, touch=False).scan
        if scan is None:
            raise ScanMissing(session_id)
        return scan

    def _version(self, session: _Session, version: int) -> VersionRecord:
        if version not in session.versions:
            raise SessionNotFound(f"{session.record.id} has no version {version}")
        return session.versions[version]

    def get_version(self, session_id: str, version: int) -> VersionRecord:
        with self._lock:
            return self._version(self._live(session_id, touch=False), version)

    def load_blob(self, session_id: str, version: int, name: str) -> VersionBlob:
        with self._lock:
            session = self._live(session_id, touch=False)
            record = self._version(session, version)
            blob = session.blobs.get((name, record.probability_of))
            if blob is None:
                raise SessionNotFound(f"{session_id} version {version} has no {name}")
            return VersionBlob(record, blob)

    def commit_version(
        self,
        session_id: str,
        base_version: int,
        record: VersionRecord,
        blobs: dict[str, bytes],
        *,
        idempotency: IdempotencyClaim | None = None,
    ) -> CommitResult:
        with self._changed:
            try:
                session = self._live(session_id, touch=False)
            except (SessionGone, SessionNotFound):
                return CommitResult.GONE
            state = session.jobs.get(record.job_id)
            if state is not None and state.status is OutcomeStatus.CANCELLED:
                return CommitResult.CANCELLED
            landed = session.versions.get(record.version)
            if landed is not None and landed.job_id == record.job_id:
                return CommitResult.DUPLICATE
            if idempotency is not None and idempotency.key in session.bindings:
                return CommitResult.BOUND
            if session.record.version != base_version:
                return CommitResult.STALE
            for name, blob in blobs.items():
                session.blobs[(name, record.version)] = blob
            session.versions[record.version] = record
            session.record = dataclasses.replace(
                session.record, version=record.version, click_count=len(record.clicks)
            )
            session.jobs[record.job_id] = JobOutcome(record.job_id, OutcomeStatus.DONE, version=record.version)
            if idempotency is not None:
                session.bindings[idempotency.key] = Binding(record.job_id, idempotency.fingerprint)
            self._changed.notify_all()
            return CommitResult.COMMITTED

    def binding(self, session_id: str, key: str) -> Binding | None:
        with self._lock:
            return self._live(session_id, touch=False).bindings.get(key)

    # -- per-key limits -----------------------------------------------------------
    def count_request(self, owner: str, window_s: int) -> int:
        window = int(time.time() // window_s)
        with self._lock:
            for stale in [k for k in self._requests if k[1] < window]:
                del self._requests[stale]
            self._requests[(owner, window)] = self._requests.get((owner, window), 0) + 1
            return self._requests[(owner, window)]

    def admit_session(self, owner: str, session_id: str, limit: int) -> bool:
        now = time.time()
        with self._lock:
            self._sweep(now)
            owned = {s for s in self._owned.get(owner, set()) if s in self._sessions}
            if len(owned) >= limit:
                self._owned[owner] = owned
                return False
            self._owned[owner] = owned | {session_id}
            return True

    # -- jobs -------------------------------------------------------------------
    def submit(self, job: Job, idempotency: IdempotencyClaim | None = None) -> Submission:
        with self._lock:
            session = self._live(job.session_id, touch=False)
            if session.jobs.get(job.id) is not None:  # a resent submit
                return Submission(job.id, idempotency.fingerprint if idempotency else "", new=True)
            if not any(seen > time.time() - WORKER_TTL_S for seen, _ in self._workers.values()):
                raise NoLiveWorker("no engine worker is alive")
            fingerprint = idempotency.fingerprint if idempotency else ""
            if idempotency is not None:
                bound = session.bindings.get(idempotency.key)
                state = session.jobs.get(bound.job_id) if bound else None
                if bound is not None and state is not None and state.status.landed:
                    return Submission(bound.job_id, bound.fingerprint, new=False)
                session.bindings[idempotency.key] = Binding(job.id, fingerprint)
            session.jobs[job.id] = JobOutcome(job.id, OutcomeStatus.QUEUED)
            self._jobs.put(job)
            return Submission(job.id, fingerprint, new=True)

    def _state(self, session_id: str, job_id: str) -> JobOutcome | None:
        session = self._sessions.get(session_id)
        return None if session is None else session.jobs.get(job_id)

    def job_outcome(self, session_id: str, job_id: str) -> JobOutcome | None:
        with self._lock:
            return self._state(session_id, job_id)

    def wait_outcome(self, session_id: str, job_id: str, timeout_s: float) -> JobOutcome:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                state = self._state(session_id, job_id)
                if state is None:
                    return JobOutcome(job_id, OutcomeStatus.GONE, message="session was deleted or has expired")
                remaining = deadline - time.monotonic()
                if state.status.finished or remaining <= 0:
                    return state
                self._changed.wait(remaining)

    def _finish_queued(self, session_id: str, outcome: JobOutcome) -> JobOutcome:
        with self._changed:
            session = self._sessions.get(session_id)
            state = None if session is None else session.jobs.get(outcome.job_id)
            if state is not None and state.status.finished:
                return state
            if session is not None:
                session.jobs[outcome.job_id] = outcome
            self._changed.notify_all()
            return outcome

    def cancel(self, session_id: str, job_id: str) -> JobOutcome:
        return self._finish_queued(session_id, JobOutcome(job_id, OutcomeStatus.CANCELLED))

    def finish(self, session_id: str, outcome: JobOutcome) -> None:
        self._finish_queued(session_id, outcome)

    def next_job(self, consumer: str, block_s: float) -> Job | None:
        try:
            return self._jobs.get(timeout=block_s)
        except queue.Empty:
            return None

    def keep_alive(self, job: Job, consumer: str) -> None:
        """Nothing to do: an in-process job cannot outlive its worker."""

    def ack(self, job: Job) -> None:
        self._jobs.task_done()

    def heartbeat(self, worker: str, info: dict[str, Any]) -> None:
        with self._lock:
            self._workers[worker] = (time.time(), info)

    def retire(self, worker: str) -> None:
        with self._lock:
            self._workers.pop(worker, None)

    def live_workers(self) -> list[dict[str, Any]]:
        cutoff = time.time() - WORKER_TTL_S
        with self._lock:
            return [info for seen, info in self._workers.values() if seen > cutoff]

    def stats(self) -> StoreStats:
        now = time.time()
        with self._jobs.mutex:
            queued = len(self._jobs.queue)
            pending = self._jobs.unfinished_tasks - queued
            age_s = now - self._jobs.queue[0].created_at if queued else 0.0
        with self._lock:
            self._sweep(now)
            sessions = list(self._sessions.values())
            stored = sum(len(s.images) + len(s.scan or b"") + sum(len(b) for b in s.blobs.values()) for s in sessions)
        return StoreStats(queued=queued, pending=pending, oldest_queued_age_s=max(age_s, 0.0),
                          sessions=len(sessions), bytes_stored=stored)
