"""The store contract, run against both backends (Redis: a real server)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from service.store.codec import decode_array, encode_probability
from service.store.contract import (
    Click,
    CommitResult,
    Job,
    JobOutcome,
    OutcomeStatus,
    SessionGone,
    SessionNotFound,
    SessionRecord,
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


def test_unknown_and_deleted_sessions(store: MemoryStore | RedisStore) -> None:
    with pytest.raises(SessionNotFound):
        store.get_session("no-such-session")
    created = store.create_session(_record(), b"images")
    store.delete_session(created.id)
    with pytest.raises(SessionGone):
        store.get_session(created.id)
    with pytest.raises(SessionGone):
        store.load_images(created.id)
    assert store.commit_version(created.id, -1, _version(0, None), b"p") is CommitResult.GONE


def test_sessions_expire(redis_url: str, redis_prefix: str) -> None:
    for store in (MemoryStore(session_ttl_s=0.2), RedisStore(redis_url, session_ttl_s=0.2, prefix=redis_prefix)):
        created = store.create_session(_record(), b"images")
        store.get_session(created.id)
        time.sleep(0.4)
        with pytest.raises(SessionGone):
            store.get_session(created.id)


def test_use_refreshes_expiry(redis_url: str, redis_prefix: str) -> None:
    for store in (MemoryStore(session_ttl_s=0.6), RedisStore(redis_url, session_ttl_s=0.6, prefix=redis_prefix)):
        created = store.create_session(_record(), b"images")
        for _ in range(4):
            time.sleep(0.3)
            store.get_session(created.id)  # each use pushes expiry out again
        assert store.load_images(created.id) == b"images"


def test_commit_only_on_current_version(store: MemoryStore | RedisStore) -> None:
    session = store.create_session(_record(), b"images").id
    probability = np.linspace(0, 1, 64, dtype=np.float32).reshape(4, 4, 4)
    assert store.commit_version(session, -1, _version(0, None, job="a"), encode_probability(probability)) is CommitResult.COMMITTED
    click = Click("foreground", (1, 2, 3))
    assert store.commit_version(session, 0, _version(1, 0, (click,), job="b"), encode_probability(1 - probability)) is CommitResult.COMMITTED
    # a late result computed from version 0 must not overwrite version 1
    assert store.commit_version(session, 0, _version(1, 0, job="c"), encode_probability(probability)) is CommitResult.STALE
    # the same job delivered twice lands once
    assert store.commit_version(session, 0, _version(1, 0, (click,), job="b"), b"x") is CommitResult.DUPLICATE
    assert store.get_session(session).version == 1
    assert store.get_version(session, 1).clicks == (click,)
    np.testing.assert_allclose(decode_array(store.load_probability(session, 1)), 1 - probability, atol=1 / 510)


def test_version_can_share_an_older_probability(store: MemoryStore | RedisStore) -> None:
    session = store.create_session(_record(), b"images").id
    store.commit_version(session, -1, _version(0, None), b"blob-0")
    store.commit_version(session, 0, _version(1, 0, job="k"), b"blob-1")
    undo = VersionRecord(version=2, parent=None, clicks=(), job_id="undo", probability_of=0)
    assert store.commit_version(session, 1, undo, None) is CommitResult.COMMITTED
    assert store.load_probability(session, 2) == b"blob-0"


def test_concurrent_commits_land_once(store: MemoryStore | RedisStore) -> None:
    session = store.create_session(_record(), b"images").id
    store.commit_version(session, -1, _version(0, None), b"blob-0")
    results: list[CommitResult] = []

    def commit(job: str) -> None:
        results.append(store.commit_version(session, 0, _version(1, 0, job=job), job.encode()))

    threads = [threading.Thread(target=commit, args=(f"job-{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(CommitResult.COMMITTED) == 1
    assert results.count(CommitResult.STALE) == 7


def test_idempotency_claims(store: MemoryStore | RedisStore) -> None:
    session = store.create_session(_record(), b"images").id
    assert store.claim_idempotency(session, "key-1") is None
    assert store.claim_idempotency(session, "key-1") == "pending"
    store.finish_idempotency(session, "key-1", '{"version": 1}')
    assert store.claim_idempotency(session, "key-1") == '{"version": 1}'
    assert store.claim_idempotency(session, "key-2") is None
    store.release_idempotency(session, "key-2")
    assert store.claim_idempotency(session, "key-2") is None


def test_jobs_and_outcomes(store: MemoryStore | RedisStore) -> None:
    job = Job(id=uuid.uuid4().hex, session_id="s", kind="refine", base_version=3, clicks=(Click("background", (0, 1, 2)),))
    store.enqueue(job)
    taken = store.next_job("worker-1", block_s=1.0)
    assert taken == job
    store.ack(taken)
    assert store.next_job("worker-1", block_s=0.1) is None
    assert store.wait_outcome(job.id, timeout_s=0.05) is None
    store.publish_outcome(JobOutcome(job.id, OutcomeStatus.DONE, version=4))
    assert store.wait_outcome(job.id, timeout_s=1.0) == JobOutcome(job.id, OutcomeStatus.DONE, version=4)


def test_unacknowledged_job_is_reclaimed(redis_url: str, redis_prefix: str) -> None:
    store = RedisStore(redis_url, session_ttl_s=60, claim_idle_s=0.3, prefix=redis_prefix)
    job = Job(id="job-x", session_id="s", kind="initial", base_version=-1)
    store.enqueue(job)
    assert store.next_job("dies", block_s=1.0) == job  # taken, never acknowledged
    survivor = RedisStore(redis_url, session_ttl_s=60, claim_idle_s=0.3, prefix=redis_prefix)
    assert survivor.next_job("survivor", block_s=0.05) is None  # not idle long enough yet
    time.sleep(0.4)
    assert survivor.next_job("survivor", block_s=0.05) == job
    survivor.ack(job)
    time.sleep(0.4)
    assert survivor.next_job("survivor", block_s=0.05) is None


def test_keep_alive_holds_a_claim(redis_url: str, redis_prefix: str) -> None:
    store = RedisStore(redis_url, session_ttl_s=60, claim_idle_s=0.3, prefix=redis_prefix)
    other = RedisStore(redis_url, session_ttl_s=60, claim_idle_s=0.3, prefix=redis_prefix)
    job = Job(id="job-y", session_id="s", kind="initial", base_version=-1)
    store.enqueue(job)
    assert store.next_job("slow", block_s=1.0) == job
    for _ in range(4):
        time.sleep(0.15)
        store.keep_alive(job, "slow")
        assert other.next_job("other", block_s=0.01) is None


def test_worker_heartbeats(store: MemoryStore | RedisStore) -> None:
    assert store.live_workers() == []
    store.heartbeat("w1", {"name": "w1", "device": "cpu"})
    assert store.live_workers() == [{"name": "w1", "device": "cpu"}]


def test_uncertainty_is_kept_with_its_version_and_followed_by_undo(store: MemoryStore | RedisStore) -> None:
    record = store.create_session(_record(), b"images")
    assert store.commit_version(record.id, -1, _version(0, None), b"p0", b"u0") is CommitResult.COMMITTED
    assert store.commit_version(record.id, 0, _version(1, 0), b"p1") is CommitResult.COMMITTED
    undo = VersionRecord(version=2, parent=None, clicks=(), job_id="undo", probability_of=0)
    assert store.commit_version(record.id, 1, undo, None) is CommitResult.COMMITTED
    assert store.load_uncertainty(record.id, 0) == b"u0"
    assert store.load_uncertainty(record.id, 1) is None  # committed without one
    assert store.load_uncertainty(record.id, 2) == b"u0"  # the undo's blobs are version 0's
