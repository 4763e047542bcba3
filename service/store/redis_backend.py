"""Redis backend: shared by any number of API replicas and engine workers.

Keys (``{p}`` is the configured prefix, ``{id}`` a session id):

- ``{p}:s:{id}:meta``      hash: ``record`` (SessionRecord JSON), ``version`` (int)
- ``{p}:s:{id}:images``    preprocessed images blob
- ``{p}:s:{id}:versions``  hash: ``{k}`` VersionRecord JSON, ``blob:{k}`` probability blob,
  ``uncertainty:{k}`` the members' disagreement blob (optional)
- ``{p}:s:{id}:idem``      hash: Idempotency-Key -> "pending" or the stored outcome
- ``{p}:s:{id}:known``     "live" or "deleted"; outlives the session to tell 410 from 404
- ``{p}:jobs``             stream of jobs, consumer group ``engines``
- ``{p}:outcome:{job}``    list holding one JobOutcome for the waiting request
- ``{p}:workers``          sorted set of worker names by last heartbeat; ``{p}:worker:{name}`` its info

All keys of a session share its TTL, refreshed on every use. A job stays pending in
the consumer group until acknowledged; a worker that stops refreshing its claim
(it died) loses the job to another worker after ``claim_idle_s``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import redis

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
    StoreUnavailable,
    VersionRecord,
)

GROUP = "engines"

_COMMIT = """
local current = redis.call('HGET', KEYS[1], 'version')
if not current then return 'gone' end
local landed = redis.call('HGET', KEYS[2], ARGV[2])
if landed and cjson.decode(landed)['job_id'] == ARGV[4] then return 'duplicate' end
if tonumber(current) ~= tonumber(ARGV[1]) then return 'stale' end
if ARGV[5] == '1' then redis.call('HSET', KEYS[2], 'blob:' .. ARGV[2], ARGV[6]) end
if ARGV[7] == '1' then redis.call('HSET', KEYS[2], 'uncertainty:' .. ARGV[2], ARGV[8]) end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[1], 'version', ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 'committed'
"""


class RedisStore(SessionStore, JobQueue):
    def __init__(
        self,
        url: str,
        *,
        session_ttl_s: float,
        tombstone_ttl_s: float = 86400.0,
        claim_idle_s: float = 30.0,
        prefix: str = "icr",
    ) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=None, health_check_interval=30)
        self._ttl_ms = int(session_ttl_s * 1000)
        self._known_ttl_ms = self._ttl_ms + int(tombstone_ttl_s * 1000)
        self._claim_idle_ms = int(claim_idle_s * 1000)
        self._p = prefix
        self._commit = self._redis.register_script(_COMMIT)
        self._entries: dict[str, bytes] = {}  # job id -> stream entry id, for this process's claims
        self._group_ready = False

    # -- keys -------------------------------------------------------------------
    def _key(self, session_id: str, part: str) -> str:
        return f"{self._p}:s:{session_id}:{part}"

    def _session_keys(self, session_id: str) -> list[str]:
        return [self._key(session_id, part) for part in ("meta", "images", "versions", "idem")]

    @property
    def _stream(self) -> str:
        return f"{self._p}:jobs"

    # -- sessions ---------------------------------------------------------------
    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False

    def create_session(self, record: SessionRecord, images: bytes) -> SessionRecord:
        meta, images_key, _, _ = self._session_keys(record.id)
        with self._redis.pipeline() as pipe:
            pipe.hset(meta, mapping={"record": record.to_json(), "version": -1})
            pipe.pexpire(meta, self._ttl_ms)
            pipe.set(images_key, images, px=self._ttl_ms)
            pipe.set(self._key(record.id, "known"), "live", px=self._known_ttl_ms)
            pipe.execute()
        return self._record(record.to_json(), -1, self._ttl_ms)

    @staticmethod
    def _record(record_json: str | bytes, version: int, pttl_ms: int) -> SessionRecord:
        expires_at = time.time() + max(pttl_ms, 0) / 1000
        return dataclasses.replace(
            SessionRecord.from_json(record_json), version=version, expires_at=expires_at
        )

    def _missing(self, session_id: str) -> Exception:
        state = self._redis.get(self._key(session_id, "known"))
        return SessionGone(session_id) if state is not None else SessionNotFound(session_id)

    def get_session(self, session_id: str, *, touch: bool = True) -> SessionRecord:
        meta = self._key(session_id, "meta")
        with self._redis.pipeline() as pipe:
            pipe.hmget(meta, "record", "version")
            if touch:
                for key in self._session_keys(session_id):
                    pipe.pexpire(key, self._ttl_ms)
                pipe.pexpire(self._key(session_id, "known"), self._known_ttl_ms)
            pipe.pttl(meta)
            results = pipe.execute()
        record_json, version = results[0]
        if record_json is None:
            raise self._missing(session_id)
        return self._record(record_json, int(version), results[-1])

    def delete_session(self, session_id: str) -> None:
        if not self._redis.exists(self._key(session_id, "meta")):
            raise self._missing(session_id)
        with self._redis.pipeline() as pipe:
            pipe.delete(*self._session_keys(session_id))
            pipe.set(self._key(session_id, "known"), "deleted", px=self._known_ttl_ms)
            pipe.execute()

    def load_images(self, session_id: str) -> bytes:
        images = self._redis.get(self._key(session_id, "images"))
        if images is None:
            raise self._missing(session_id)
        return bytes(images)

    def get_version(self, session_id: str, version: int) -> VersionRecord:
        text = self._redis.hget(self._key(session_id, "versions"), str(version))
        if text is None:
            if not self._redis.exists(self._key(session_id, "meta")):
                raise self._missing(session_id)
            raise SessionNotFound(f"{session_id} has no version {version}")
        return VersionRecord.from_json(text)

    def load_probability(self, session_id: str, version: int) -> bytes:
        record = self.get_version(session_id, version)
        blob = self._redis.hget(self._key(session_id, "versions"), f"blob:{record.probability_of}")
        if blob is None:
            raise self._missing(session_id)
        return bytes(blob)

    def load_uncertainty(self, session_id: str, version: int) -> bytes | None:
        record = self.get_version(session_id, version)
        blob = self._redis.hget(self._key(session_id, "versions"), f"uncertainty:{record.probability_of}")
        return None if blob is None else bytes(blob)

    def commit_version(
        self,
        session_id: str,
        base_version: int,
        record: VersionRecord,
        probability: bytes | None,
        uncertainty: bytes | None = None,
    ) -> CommitResult:
        result = self._commit(
            keys=[self._key(session_id, "meta"), self._key(session_id, "versions")],
            args=[
                base_version,
                record.version,
                record.to_json(),
                record.job_id,
                "1" if probability is not None else "0",
                probability if probability is not None else b"",
                "1" if uncertainty is not None else "0",
                uncertainty if uncertainty is not None else b"",
            ],
        )
        return CommitResult(result.decode())

    def claim_idempotency(self, session_id: str, key: str) -> str | None:
        idem = self._key(session_id, "idem")
        with self._redis.pipeline() as pipe:
            pipe.hsetnx(idem, key, "pending")
            pipe.hget(idem, key)
            pipe.pexpire(idem, self._ttl_ms)
            claimed, value, _ = pipe.execute()
        return None if claimed else value.decode()

    def finish_idempotency(self, session_id: str, key: str, value: str) -> None:
        idem = self._key(session_id, "idem")
        if self._redis.hexists(idem, key):
            self._redis.hset(idem, key, value)

    def release_idempotency(self, session_id: str, key: str) -> None:
        self._redis.hdel(self._key(session_id, "idem"), key)

    # -- jobs -------------------------------------------------------------------
    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self._redis.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._group_ready = True

    def enqueue(self, job: Job) -> None:
        self._ensure_group()
        self._redis.xadd(self._stream, {"job": job.to_json()}, maxlen=100_000, approximate=True)

    def _take(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Job:
        job = Job.from_json(fields[b"job"])
        self._entries[job.id] = entry_id
        return job

    def next_job(self, consumer: str, block_s: float) -> Job | None:
        self._ensure_group()
        answer = self._redis.xautoclaim(
            self._stream, GROUP, consumer, min_idle_time=self._claim_idle_ms, count=1
        )
        for entry_id, fields in answer[1]:  # Redis 6.2 answers 2 items, 7.x adds a third
            if fields:  # None when the entry was deleted meanwhile
                return self._take(entry_id, fields)
        delivered = self._redis.xreadgroup(
            GROUP, consumer, {self._stream: ">"}, count=1, block=max(1, int(block_s * 1000))
        )
        for _, entries in delivered or []:
            for entry_id, fields in entries:
                return self._take(entry_id, fields)
        return None

    def keep_alive(self, job: Job, consumer: str) -> None:
        entry_id = self._entries.get(job.id)
        if entry_id is not None:
            self._redis.xclaim(self._stream, GROUP, consumer, 0, [entry_id], justid=True)

    def ack(self, job: Job) -> None:
        entry_id = self._entries.pop(job.id, None)
        if entry_id is not None:
            with self._redis.pipeline() as pipe:
                pipe.xack(self._stream, GROUP, entry_id)
                pipe.xdel(self._stream, entry_id)
                pipe.execute()

    def publish_outcome(self, outcome: JobOutcome) -> None:
        key = f"{self._p}:outcome:{outcome.job_id}"
        with self._redis.pipeline() as pipe:
            pipe.rpush(key, outcome.to_json())
            pipe.expire(key, int(OUTCOME_TTL_S))
            pipe.execute()

    def wait_outcome(self, job_id: str, timeout_s: float) -> JobOutcome | None:
        answer = self._redis.blpop([f"{self._p}:outcome:{job_id}"], timeout=max(timeout_s, 0.01))
        return None if answer is None else JobOutcome.from_json(answer[1])

    def heartbeat(self, worker: str, info: dict[str, Any]) -> None:
        now = time.time()
        with self._redis.pipeline() as pipe:
            pipe.zadd(f"{self._p}:workers", {worker: now})
            pipe.zremrangebyscore(f"{self._p}:workers", "-inf", now - WORKER_TTL_S)
            pipe.set(f"{self._p}:worker:{worker}", json.dumps(info), ex=int(WORKER_TTL_S))
            pipe.execute()

    def live_workers(self) -> list[dict[str, Any]]:
        names = self._redis.zrangebyscore(f"{self._p}:workers", time.time() - WORKER_TTL_S, "+inf")
        if not names:
            return []
        infos = self._redis.mget([f"{self._p}:worker:{n.decode()}" for n in names])
        return [json.loads(info) for info in infos if info is not None]

    def close(self) -> None:
        self._redis.close()


def connect(url: str, **options: Any) -> RedisStore:
    """A RedisStore that has answered a ping, or StoreUnavailable naming the URL's host."""
    store = RedisStore(url, **options)
    if not store.ping():
        host = url.split("@")[-1]
        raise StoreUnavailable(f"Redis at {host} does not answer")
    return store
