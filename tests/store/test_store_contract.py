"""The store contract, run against both backends (Redis: a real server)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from service.engine.outputs import mask_blob, stored_probability
from service.store.codec import decode_array, decode_mask
from service.store.contract import (
    BLOB_MASK,
    BLOB_PROBABILITY,
    BLOB_UNCERTAINTY,
    Click,
    CommitResult,
    IdempotencyClaim,
    Job,
    JobOutcome,
    NoLiveWorker,
    OutcomeStatus,
    ScanMissing,
    SessionGone,
    SessionNotFound,
    SessionRecord,
    StoreUnavailable,
    VersionRecord,
)
from service.store.memory_backend import MemoryStore
from service.store.redis_backend import RedisStore


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[MemoryStore | RedisStore]:
    if request.param == "memory":
        yield MemoryStore(session_ttl_s=60)
        return
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    redis_store = RedisStore(url, session_ttl_s=60, claim_idle_s=0.3, prefix=prefix)
    yield redis_store
    redis_store.close()


@pytest.fixture
def engine_alive(store: MemoryStore | RedisStore) -> MemoryStore | RedisStore:
    """The store with one live worker, so jobs can be submitted."""
    store.heartbeat("fixture-worker", {"name": "fixture-worker"})
    return store


def _record(session_id: str | None = None) -> SessionRecord:
    return SessionRecord(
        id=session_id or uuid.uuid4().hex,
        owner="owner-a",
        grid={"shape": [4, 4, 4], "spacing_mm": 1.0, "origin_mm": [0.0, 0.0, 0.0]},
        original_shape=(5, 6, 7),
        original_affine=tuple(tuple(float(v) for v in row) for row in np.eye(4)),
        created_at=time.time(),
    )


def _version(version: int, parent: int | None, clicks: tuple[Click, ...] = (), job: str = "j") -> VersionRecord:
    return VersionRecord(version=version, parent=parent, clicks=clicks, job_id=job, probability_of=version)


def test_session_round_trip(store: MemoryStore | RedisStore) -> None:
    created = store.create_session(_record(), b"images")
    loaded = store.get_session(created.id)
    assert loaded.version == -1
    assert loaded.original_shape == (5, 6, 7)
    assert loaded.owner == "owner-a"
    assert loaded.expires_at > time.time() + 50
    assert store.load_images(created.id) == b"images"
    with pytest.raises(ScanMissing):  # not kept yet
        store.load_scan(created.id)
    store.store_scan(created.id, b"scan")
    assert store.load_scan(created.id) == b"scan"


def test_unknown_and_deleted_sessions(store: MemoryStore | RedisStore) -> None:
    with pytest.raises(SessionNotFound):
        store.get_session("no-such-session")
    created = store.create_session(_record(), b"images")
    store.delete_session(created.id)
    with pytest.raises(SessionGone):
        store.get_session(created.id)
    with pytest.raises(SessionGone):
        store.load_images(created.id)
    with pytest.raises(SessionGone):
        store.load_scan(created.id)
    with pytest.raises(SessionGone):
        store.store_scan(created.id, b"scan")
    assert store.commit_version(created.id, -1, _version(0, None), {}) is CommitResult.GONE


def test_sessions_expire(redis_url: str, redis_prefix: str) -> None:
    for store in (MemoryStore(session_ttl_s=0.2), RedisStore(redis_url, session_ttl_s=0.2, prefix=redis_prefix)):
        created = store.create_session(_record(), b"images")
        store.get_session(created.id)
        time.sleep(0.4)
        with pytest.raises(SessionGone):
            store.get_session(created.id)


def test_use_refreshes_expiry(redis_url: str, redis_prefix: str) -> None:
    for store in (MemoryStore(session_ttl_s=0.5), RedisStore(redis_url, session_ttl_s=0.5, prefix=redis_prefix)):
        created = store.create_session(_record(), b"images")
        for _ in range(3):  # 0.75 s in all, past the 0.5 s TTL
            time.sleep(0.25)
            store.get_session(created.id)  # each use pushes expiry out again
        assert store.load_images(created.id) == b"images"


def _blobs(probability: np.ndarray) -> dict[str, bytes]:
    blob, stored = stored_probability(probability)
    return {BLOB_PROBABILITY: blob, BLOB_MASK: mask_blob(stored > 0.5)}


def _job(session: str, job_id: str, base: int = 0, kind: str = "refine") -> Job:
    return Job(id=job_id, session_id=session, kind=kind, base_version=base)  # type: ignore[arg-type]


def test_commit_only_on_current_version(store: MemoryStore | RedisStore) -> None:
    session = store.create_session(_record(), b"images").id
    probability = np.linspace(0, 1, 64, dtype=np.float32).reshape(4, 4, 4)
    assert store.commit_version(session, -1, _version(0, None, job="a"), _blobs(probability)) is CommitResult.COMMITTED
    click = Click("foreground", (1, 2, 3))
    assert store.commit_version(session, 0, _version(1, 0, (click,), job="b"), _blobs(1 - probability)) is CommitResult.COMMITTED
    # a late result computed from version 0 must not overwrite version 1
    assert store.commit_version(session, 0, _version(1, 0, job="c"), _blobs(probability)) is CommitResult.STALE
    # the same job delivered twice lands once
    assert store.commit_version(session, 0, _version(1, 0, (click,), job="b"), {}) is CommitResult.DUPLICATE
    assert store.get_session(session).version == 1
    assert store.get_version(session, 1).clicks == (click,)
    stored = decode_array(store.load_blob(session, 1, BLOB_PROBABILITY).blob)
    np.testing.assert_allclose(stored, 1 - probability, atol=1 / 510)
    packed = store.load_blob(session, 1, BLOB_MASK)
    assert packed.record.clicks == (click,)
    np.testing.assert_array_equal(decode_mask(json.loads(packed.blob)), stored > 0.5)
    assert store.job_outcome(session, "b") == JobOutcome("b", OutcomeStatus.DONE, version=1)


def test_version_can_share_an_older_version_blobs(store: MemoryStore | RedisStore) -> None:
    session = store.create_session(_record(), b"images").id
    store.commit_version(session, -1, _version(0, None), {BLOB_PROBABILITY: b"blob-0", BLOB_MASK: b'{"m": 0}'})
    store.commit_version(session, 0, _version(1, 0, job="k"), {BLOB_PROBABILITY: b"blob-1", BLOB_MASK: b'{"m": 1}'})
    undo = VersionRecord(version=2, parent=None, clicks=(), job_id="undo", probability_of=0)
    assert store.commit_version(session, 1, undo, {}) is CommitResult.COMMITTED
    assert store.load_blob(session, 2, BLOB_PROBABILITY).blob == b"blob-0"
    assert store.load_blob(session, 2, BLOB_MASK) .blob == b'{"m": 0}'
    with pytest.raises(SessionNotFound):
        store.load_blob(session, 7, BLOB_MASK)


def test_concurrent_commits_land_once(store: MemoryStore | RedisStore) -> None:
    session = store.create_session(_record(), b"images").id
    store.commit_version(session, -1, _version(0, None), {BLOB_PROBABILITY: b"blob-0"})
    results: list[CommitResult] = []

    def commit(job: str) -> None:
        results.append(store.commit_version(session, 0, _version(1, 0, job=job), {BLOB_PROBABILITY: job.encode()}))

    threads = [threading.Thread(target=commit, args=(f"job-{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(CommitResult.COMMITTED) == 1
    assert results.count(CommitResult.STALE) == 7


def test_a_key_is_bound_to_its_job_while_it_may_land(engine_alive: MemoryStore | RedisStore) -> None:
    store = engine_alive
    session = store.create_session(_record(), b"images").id
    claim = IdempotencyClaim("key-1", "fp-1")
    first = store.submit(_job(session, "job-1"), claim)
    assert first.new and first.job_id == "job-1"
    assert store.job_outcome(session, "job-1") == JobOutcome("job-1", OutcomeStatus.QUEUED)
    # a retry while the job is queued finds it, with the fingerprint it was bound with
    again = store.submit(_job(session, "job-2"), IdempotencyClaim("key-1", "fp-other"))
    assert (again.new, again.job_id, again.fingerprint) == (False, "job-1", "fp-1")
    assert store.job_outcome(session, "job-2") is None  # nothing queued for the retry
    assert store.binding(session, "key-1").job_id == "job-1"
    # a job that failed never landed: the key may start a new one
    store.finish(session, JobOutcome("job-1", OutcomeStatus.FAILED, message="boom"))
    third = store.submit(_job(session, "job-3"), claim)
    assert third.new and store.binding(session, "key-1").job_id == "job-3"
    assert store.submit(_job(session, "job-4"), None).new


def test_a_cancelled_job_never_commits(engine_alive: MemoryStore | RedisStore) -> None:
    store = engine_alive
    session = store.create_session(_record(), b"images").id
    store.commit_version(session, -1, _version(0, None, job="init"), {BLOB_PROBABILITY: b"p"})
    store.submit(_job(session, "slow"), None)
    assert store.cancel(session, "slow").status is OutcomeStatus.CANCELLED
    assert store.commit_version(session, 0, _version(1, 0, job="slow"), {BLOB_PROBABILITY: b"q"}) is CommitResult.CANCELLED
    assert store.get_session(session).version == 0
    # cancelling a job that already committed changes nothing and says so
    store.submit(_job(session, "fast"), None)
    store.commit_version(session, 0, _version(1, 0, job="fast"), {BLOB_PROBABILITY: b"r"})
    assert store.cancel(session, "fast") == JobOutcome("fast", OutcomeStatus.DONE, version=1)
    # a stale outcome does not overwrite done either
    store.finish(session, JobOutcome("fast", OutcomeStatus.STALE))
    assert store.job_outcome(session, "fast").status is OutcomeStatus.DONE


def test_an_undo_binds_its_key_in_its_commit(store: MemoryStore | RedisStore) -> None:
    session = store.create_session(_record(), b"images").id
    store.commit_version(session, -1, _version(0, None), {BLOB_PROBABILITY: b"p0"})
    store.commit_version(session, 0, _version(1, 0, job="k"), {BLOB_PROBABILITY: b"p1"})
    claim = IdempotencyClaim("undo-key", "fp")
    undo = VersionRecord(version=2, parent=None, clicks=(), job_id="undo-1", probability_of=0)
    assert store.commit_version(session, 1, undo, {}, idempotency=claim) is CommitResult.COMMITTED
    assert store.binding(session, "undo-key").job_id == "undo-1"
    assert store.job_outcome(session, "undo-1") == JobOutcome("undo-1", OutcomeStatus.DONE, version=2)
    retry = VersionRecord(version=3, parent=None, clicks=(), job_id="undo-2", probability_of=0)
    assert store.commit_version(session, 2, retry, {}, idempotency=claim) is CommitResult.BOUND
    assert store.get_session(session).version == 2


def test_waiting_for_an_outcome(engine_alive: MemoryStore | RedisStore) -> None:
    store = engine_alive
    session = store.create_session(_record(), b"images").id
    store.commit_version(session, -1, _version(0, None), {BLOB_PROBABILITY: b"p0"})
    store.submit(_job(session, "w"), None)
    assert store.wait_outcome(session, "w", timeout_s=0.05).status is OutcomeStatus.QUEUED
    timer = threading.Timer(0.2, lambda: store.commit_version(session, 0, _version(1, 0, job="w"), {BLOB_PROBABILITY: b"p1"}))
    timer.start()
    assert store.wait_outcome(session, "w", timeout_s=5.0) == JobOutcome("w", OutcomeStatus.DONE, version=1)
    timer.join()
    # a second waiter (a retry) still learns the outcome once the first took the wake-up
    assert store.wait_outcome(session, "w", timeout_s=5.0).status is OutcomeStatus.DONE
    store.submit(_job(session, "x", base=1), None)
    store.delete_session(session)
    assert store.wait_outcome(session, "x", timeout_s=5.0).status is OutcomeStatus.GONE


def test_jobs_travel_whole(engine_alive: MemoryStore | RedisStore) -> None:
    store = engine_alive
    session = store.create_session(_record(), b"images").id
    job = Job(id=uuid.uuid4().hex, session_id=session, kind="refine", base_version=3,
              new_clicks=(Click("background", (0, 1, 2)),), request_id="req-1")
    store.submit(job)
    taken = store.next_job("worker-1", block_s=1.0)
    assert taken == job
    store.ack(taken)
    assert store.next_job("worker-1", block_s=0.1) is None


def test_unacknowledged_job_is_reclaimed(redis_url: str, redis_prefix: str) -> None:
    store = RedisStore(redis_url, session_ttl_s=60, claim_idle_s=0.3, prefix=redis_prefix)
    session = store.create_session(_record(), b"images").id
    job = _job(session, "job-x", base=-1, kind="initial")
    store.heartbeat("slow", {"name": "slow"})
    store.submit(job)
    assert store.next_job("slow", block_s=1.0) == job  # taken, never acknowledged, heartbeat kept
    survivor = RedisStore(redis_url, session_ttl_s=60, claim_idle_s=0.3, prefix=redis_prefix)
    store.heartbeat("slow", {"name": "slow"})
    assert survivor.next_job("survivor", block_s=0.05) is None  # not idle long enough yet
    time.sleep(0.4)
    assert survivor.next_job("survivor", block_s=0.05) == job
    survivor.ack(job)
    time.sleep(0.4)
    assert survivor.next_job("survivor", block_s=0.05) is None


def test_a_dead_workers_job_is_taken_over_without_waiting_for_the_claim(redis_url: str, redis_prefix: str) -> None:
    store = RedisStore(redis_url, session_ttl_s=60, claim_idle_s=600, prefix=redis_prefix)
    session = store.create_session(_record(), b"images").id
    job = _job(session, "job-d", base=-1, kind="initial")
    store.heartbeat("doomed", {"name": "doomed"})
    store.submit(job)
    assert store.next_job("doomed", block_s=1.0) == job
    store.retire("doomed")  # as if its heartbeat had lapsed
    survivor = RedisStore(redis_url, session_ttl_s=60, claim_idle_s=600, prefix=redis_prefix)
    survivor.heartbeat("survivor", {"name": "survivor"})
    time.sleep(0.6)  # the claim needs half a second of idleness, so two survivors cannot both take it
    assert survivor.next_job("survivor", block_s=0.05) == job


def test_keep_alive_holds_a_claim(redis_url: str, redis_prefix: str) -> None:
    store = RedisStore(redis_url, session_ttl_s=60, claim_idle_s=0.3, prefix=redis_prefix)
    other = RedisStore(redis_url, session_ttl_s=60, claim_idle_s=0.3, prefix=redis_prefix)
    session = store.create_session(_record(), b"images").id
    job = _job(session, "job-y", base=-1, kind="initial")
    store.heartbeat("slow", {"name": "slow"})
    store.submit(job)
    assert store.next_job("slow", block_s=1.0) == job
    for _ in range(4):
        time.sleep(0.15)
        store.keep_alive(job, "slow")
        store.heartbeat("slow", {"name": "slow"})
        assert other.next_job("other", block_s=0.01) is None


def test_no_job_is_queued_without_a_live_worker(store: MemoryStore | RedisStore) -> None:
    session = store.create_session(_record(), b"images").id
    with pytest.raises(NoLiveWorker):
        store.submit(_job(session, "orphan"), IdempotencyClaim("key", "fp"))
    assert store.job_outcome(session, "orphan") is None
    assert store.binding(session, "key") is None
    assert store.next_job("late", block_s=0.1) is None


def test_worker_heartbeats(store: MemoryStore | RedisStore) -> None:
    assert store.live_workers() == []
    store.heartbeat("w1", {"name": "w1", "device": "cpu"})
    assert store.live_workers() == [{"name": "w1", "device": "cpu"}]
    store.retire("w1")
    assert store.live_workers() == []


def test_an_unreachable_redis_is_a_store_error_in_bounded_time() -> None:
    from service.bench.processes import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", session_ttl_s=60, socket_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.get_session("any")
    with pytest.raises(StoreUnavailable):
        store.live_workers()
    assert not store.ping()
    assert time.monotonic() - started < 10  # a bound, not a benchmark: a hang would never end


def test_uncertainty_is_kept_with_its_version_and_followed_by_undo(store: MemoryStore | RedisStore) -> None:
    record = store.create_session(_record(), b"images")
    blobs = {BLOB_PROBABILITY: b"p0", BLOB_UNCERTAINTY: b"u0"}
    assert store.commit_version(record.id, -1, _version(0, None), blobs) is CommitResult.COMMITTED
    assert store.commit_version(record.id, 0, _version(1, 0, job="k"), {BLOB_PROBABILITY: b"p1"}) is CommitResult.COMMITTED
    undo = VersionRecord(version=2, parent=None, clicks=(), job_id="undo", probability_of=0)
    assert store.commit_version(record.id, 1, undo, {}) is CommitResult.COMMITTED
    assert store.load_blob(record.id, 0, BLOB_UNCERTAINTY).blob == b"u0"
    with pytest.raises(SessionNotFound):
        store.load_blob(record.id, 1, BLOB_UNCERTAINTY)  # committed without one
    assert store.load_blob(record.id, 2, BLOB_UNCERTAINTY).blob == b"u0"  # the undo's blobs are version 0's
