"""Redis backend: shared by any number of API replicas and engine workers.

Keys (``{p}`` is the configured prefix, ``{id}`` a session id):

- ``{p}:s:{id}:meta``      hash: ``record`` (SessionRecord JSON), ``version`` (int)
- ``{p}:s:{id}:images``    the first window's network input (preprocessed images blob)
- ``{p}:s:{id}:scan``      the scan blob (CT and PET as uploaded, service.imaging.scan)
- ``{p}:s:{id}:versions``  hash: ``{k}`` VersionRecord JSON, ``probability:{k}``,
                           ``mask:{k}`` and ``uncertainty:{k}`` the version's blobs
- ``{p}:s:{id}:jobs``      hash: job id -> JobOutcome JSON (its state: queued or terminal)
- ``{p}:s:{id}:idem``      hash: Idempotency-Key -> Binding JSON (the job it started)
- ``{p}:s:{id}:known``     "live" or "deleted"; outlives the session to tell 410 from 404
- ``{p}:jobs``             stream of jobs, consumer group ``engines``
- ``{p}:wake:{job}``       list: the finished job's outcome, to wake the waiting request
- ``{p}:owner:{owner}``    set of an API key's (keyed-hash) session ids, for the live-session limit
- ``{p}:rate:{owner}:{n}`` the key's request count in fixed window ``n``
- ``{p}:workers``          sorted set of worker names by last heartbeat; ``{p}:worker:{name}`` its info

All keys of a session share its TTL, refreshed on every use. Submitting a job (its
state, the key binding, the stream entry) is one script, and so is a commit (version,
blobs, the job's ``done`` state, the binding of an undo's key, the wake-up). A job stays
pending in the consumer group until acknowledged; a job whose worker stopped
heartbeating is taken over at once, and any job unrefreshed for ``claim_idle_s``.

Every Redis error of connection or time becomes :class:`StoreUnavailable`; the client
answers or gives up within ``socket_timeout_s`` (one retry on a fresh connection), so
a frozen or unreachable Redis costs a request seconds, never a hang. Every script is
safe to run twice (a retried or late-delivered command): a resent submit finds its job,
a resent commit is a duplicate, a terminal job state stays as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service import metrics
from service.store.contract import (
    OUTCOME_TTL_S,
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
    StoreUnavailable,
    Submission,
    VersionBlob,
    VersionRecord,
)

GROUP = "engines"
WAKE_SLICE_S = 0.5  # a waiting request re-reads the job's state at least this often
DEAD_WORKER_SCAN_S = 1.0  # how often a worker looks for jobs held by dead workers

P = ParamSpec("P")
R = TypeVar("R")

_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {'queued'} end  -- a resent submit
if redis.call('ZCOUNT', KEYS[5], ARGV[6], '+inf') == 0 then return {'no-worker'} end
if ARGV[4] ~= '' then
  local bound = redis.call('HGET', KEYS[3], ARGV[4])
  if bound then
    local state = redis.call('HGET', KEYS[2], cjson.decode(bound)['job'])
    if state then
      local status = cjson.decode(state)['status']
      if status == 'queued' or status == 'done' then return {'bound', bound} end
    end
  end
  redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl); redis.call('PEXPIRE', KEYS[3], ttl) end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '100000', '*', 'job', ARGV[3])
return {'queued'}
"""

_COMMIT = """
local current = redis.call('HGET', KEYS[1], 'version')
if not current then return 'gone' end
local state = redis.call('HGET', KEYS[3], ARGV[4])
if state and cjson.decode(state)['status'] == 'cancelled' then return 'cancelled' end
local landed = redis.call('HGET', KEYS[2], ARGV[2])
if landed and cjson.decode(landed)['job_id'] == ARGV[4] then return 'duplicate' end
if ARGV[6] ~= '' and redis.call('HEXISTS', KEYS[4], ARGV[6]) == 1 then return 'bound' end
if tonumber(current) ~= tonumber(ARGV[1]) then return 'stale' end
for i = 10, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i] .. ':' .. ARGV[2], ARGV[i + 1]) end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'clicks', ARGV[9])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[4], ARGV[6], ARGV[7]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ttl) end
end
redis.call('RPUSH', KEYS[5], ARGV[5])
redis.call('EXPIRE', KEYS[5], ARGV[8])
return 'committed'
"""

_ADMIT = """
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. member .. ':meta') == 0 then redis.call('SREM', KEYS[1], member) end
end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# A queued job becomes terminal (stale, gone, failed, cancelled); one already terminal stays so.
_FINISH = """
local state = redis.call('HGET', KEYS[1], ARGV[1])
if state and cjson.decode(state)['status'] ~= 'queued' then return state end
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return ARGV[2]
"""


def _reachable(method: Callable[P, R]) -> Callable[P, R]:
    """Connection and time-out errors surface as StoreUnavailable."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise StoreUnavailable(f"Redis did not answer: {type(error).__name__}") from error

    return guarded


class RedisStore(SessionStore, JobQueue):
    def __init__(
        self,
        url: str,
        *,
        session_ttl_s: float,
        tombstone_ttl_s: float = 86400.0,
        claim_idle_s: float = 30.0,
        prefix: str = "icr",
        socket_timeout_s: float = 1.5,
    ) -> None:
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
        )
        self._ttl_ms = int(session_ttl_s * 1000)
        self._known_ttl_ms = self._ttl_ms + int(tombstone_ttl_s * 1000)
        self._claim_idle_ms = int(claim_idle_s * 1000)
        self._p = prefix
        self._submit = self._redis.register_script(_SUBMIT)
        self._commit = self._redis.register_script(_COMMIT)
        self._finish = self._redis.register_script(_FINISH)
        self._admit = self._redis.register_script(_ADMIT)
        self._entries: dict[str, bytes] = {}  # job id -> stream entry id, for this process's claims
        self._group_ready = False
        self._next_dead_scan = 0.0

    # -- keys -------------------------------------------------------------------
    def _key(self, session_id: str, part: str) -> str:
        return f"{self._p}:s:{session_id}:{part}"

    def _session_keys(self, session_id: str) -> list[str]:
        return [self._key(session_id, part) for part in ("meta", "images", "scan", "versions", "jobs", "idem")]

    def _wake(self, job_id: str) -> str:
        return f"{self._p}:wake:{job_id}"

    @property
    def _stream(self) -> str:
        return f"{self._p}:jobs"

    # -- sessions ---------------------------------------------------------------
    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False

    @_reachable
    def create_session(self, record: SessionRecord, images: bytes) -> SessionRecord:
        meta, images_key, *_ = self._session_keys(record.id)
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

    @_reachable
    def get_session(self, session_id: str, *, touch: bool = True) -> SessionRecord:
        meta = self._key(session_id, "meta")
        with self._redis.pipeline() as pipe:
            pipe.hmget(meta, "record", "version", "clicks")
            if touch:
                for key in self._session_keys(session_id):
                    pipe.pexpire(key, self._ttl_ms)
                pipe.pexpire(self._key(session_id, "known"), self._known_ttl_ms)
            pipe.pttl(meta)
            results = pipe.execute()
        record_json, version, clicks = results[0]
        if record_json is None:
            raise self._missing(session_id)
        return dataclasses.replace(self._record(record_json, int(version), results[-1]), click_count=int(clicks or 0))

    @_reachable
    def delete_session(self, session_id: str) -> None:
        if not self._redis.exists(self._key(session_id, "meta")):
            raise self._missing(session_id)
        with self._redis.pipeline() as pipe:
            pipe.delete(*self._session_keys(session_id))
            pipe.set(self._key(session_id, "known"), "deleted", px=self._known_ttl_ms)
            pipe.execute()

    @_reachable
    def load_images(self, session_id: str) -> bytes:
        images = self._redis.get(self._key(session_id, "images"))
        if images is None:
            raise self._missing(session_id)
        return bytes(cast(bytes, images))

    @_reachable
    def store_scan(self, session_id: str, scan: bytes) -> None:
        meta = self._key(session_id, "meta")
        with self._redis.pipeline() as pipe:  # MULTI: the scan is kept only while the session lives
            pipe.exists(meta)
            pipe.pttl(meta)
            exists, ttl_ms = pipe.execute()
        if not exists:
            raise self._missing(session_id)
        self._redis.set(self._key(session_id, "scan"), scan, px=max(int(ttl_ms), 1))

    @_reachable
    def load_scan(self, session_id: str) -> bytes:
        scan = self._redis.get(self._key(session_id, "scan"))
        if scan is None:
            if self._redis.exists(self._key(session_id, "meta")):
                raise ScanMissing(session_id)
            raise self._missing(session_id)
        return bytes(cast(bytes, scan))

    @_reachable
    def get_version(self, session_id: str, version: int) -> VersionRecord:
        text = self._redis.hget(self._key(session_id, "versions"), str(version))
        if text is None:
            if not self._redis.exists(self._key(session_id, "meta")):
                raise self._missing(session_id)
            raise SessionNotFound(f"{session_id} has no version {version}")
        return VersionRecord.from_json(text)

    @_reachable
    def load_blob(self, session_id: str, version: int, name: str) -> VersionBlob:
        versions = self._key(session_id, "versions")
        with self._redis.pipeline(transaction=False) as pipe:  # most versions hold their own blobs
            pipe.hget(versions, str(version))
            pipe.hget(versions, f"{name}:{version}")
            text, blob = pipe.execute()
        if text is None:
            if not self._redis.exists(self._key(session_id, "meta")):
                raise self._missing(session_id)
            raise SessionNotFound(f"{session_id} has no version {version}")
        record = VersionRecord.from_json(text)
        if record.probability_of != version:  # an undo shows an older version's blobs
            blob = self._redis.hget(versions, f"{name}:{record.probability_of}")
        if blob is None:
            if not self._redis.exists(self._key(session_id, "meta")):
                raise self._missing(session_id)
            raise SessionNotFound(f"{session_id} version {version} has no {name}")
        return VersionBlob(record, bytes(cast(bytes, blob)))

    @_reachable
    def commit_version(
        self,
        session_id: str,
        base_version: int,
        record: VersionRecord,
        blobs: dict[str, bytes],
        *,
        idempotency: IdempotencyClaim | None = None,
    ) -> CommitResult:
        done = JobOutcome(record.job_id, OutcomeStatus.DONE, version=record.version)
        binding = Binding(record.job_id, idempotency.fingerprint) if idempotency else None
        args: list[Any] = [
            base_version,
            record.version,
            record.to_json(),
            record.job_id,
            done.to_json(),
            idempotency.key if idempotency else "",
            binding.to_json() if binding else "",
            int(OUTCOME_TTL_S),
            len(record.clicks),
        ]
        for name, blob in blobs.items():
            args += [name, blob]
        keys = [self._key(session_id, part) for part in ("meta", "versions", "jobs", "idem")]
        result = self._commit(keys=[*keys, self._wake(record.job_id)], args=args)
        return CommitResult(result.decode())

    @_reachable
    def binding(self, session_id: str, key: str) -> Binding | None:
        text = self._redis.hget(self._key(session_id, "idem"), key)
        return None if text is None else Binding.from_json(text)

    # -- per-key limits -----------------------------------------------------------
    @_reachable
    def count_request(self, owner: str, window_s: int) -> int:
        key = f"{self._p}:rate:{owner}:{int(time.time() // window_s)}"
        with self._redis.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, 2 * window_s)
            count, _ = pipe.execute()
        return int(count)

    @_reachable
    def admit_session(self, owner: str, session_id: str, limit: int) -> bool:
        admitted = self._admit(
            keys=[f"{self._p}:owner:{owner}"],
            args=[f"{self._p}:s:", session_id, limit, self._known_ttl_ms],
        )
        return bool(admitted)

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

    @_reachable
    def submit(self, job: Job, idempotency: IdempotencyClaim | None = None) -> Submission:
        self._ensure_group()
        queued = JobOutcome(job.id, OutcomeStatus.QUEUED)
        fingerprint = idempotency.fingerprint if idempotency else ""
        keys = [self._key(job.session_id, part) for part in ("meta", "jobs", "idem")]
        answer = self._submit(
            keys=[*keys, self._stream, f"{self._p}:workers"],
            args=[
                job.id,
                queued.to_json(),
                job.to_json(),
                idempotency.key if idempotency else "",
                Binding(job.id, fingerprint).to_json(),
                time.time() - WORKER_TTL_S,
            ],
        )
        status = answer[0].decode()
        if status == "gone":
            raise self._missing(job.session_id)
        if status == "no-worker":
            raise NoLiveWorker("no engine worker is alive")
        if status == "bound":
            bound = Binding.from_json(answer[1])
            return Submission(bound.job_id, bound.fingerprint, new=False)
        return Submission(job.id, fingerprint, new=True)

    @_reachable
    def job_outcome(self, session_id: str, job_id: str) -> JobOutcome | None:
        text = self._redis.hget(self._key(session_id, "jobs"), job_id)
        return None if text is None else JobOutcome.from_json(text)

    @_reachable
    def wait_outcome(self, session_id: str, job_id: str, timeout_s: float) -> JobOutcome:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return JobOutcome(job_id, OutcomeStatus.QUEUED)
            try:
                answer = self._redis.blpop([self._wake(job_id)], timeout=min(WAKE_SLICE_S, max(remaining, 0.01)))
            except redis.TimeoutError:
                answer = None  # a late reply on a busy machine; the state read below tells an outage apart
            if answer is not None:
                return JobOutcome.from_json(answer[1])
            outcome = self.job_outcome(session_id, job_id)
            if outcome is None:
                return JobOutcome(job_id, OutcomeStatus.GONE, message="session was deleted or has expired")
            if outcome.status.finished:
                return outcome

    def _finish_queued(self, session_id: str, outcome: JobOutcome) -> JobOutcome:
        state = self._finish(
            keys=[self._key(session_id, "jobs"), self._wake(outcome.job_id), self._key(session_id, "meta")],
            args=[outcome.job_id, outcome.to_json(), int(OUTCOME_TTL_S)],
        )
        return JobOutcome.from_json(state)

    @_reachable
    def cancel(self, session_id: str, job_id: str) -> JobOutcome:
        return self._finish_queued(session_id, JobOutcome(job_id, OutcomeStatus.CANCELLED))

    @_reachable
    def finish(self, session_id: str, outcome: JobOutcome) -> None:
        self._finish_queued(session_id, outcome)

    def _take(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Job:
        job = Job.from_json(fields[b"job"])
        self._entries[job.id] = entry_id
        return job

    def _claim_from_dead_workers(self, consumer: str) -> Job | None:
        """A job held by a consumer with no heartbeat (it died): taken at once."""
        now = time.monotonic()
        if now < self._next_dead_scan:
            return None
        self._next_dead_scan = now + DEAD_WORKER_SCAN_S
        live = {n.decode() for n in self._worker_names()}
        for holder in self._redis.xpending(self._stream, GROUP).get("consumers") or []:
            name = holder["name"].decode() if isinstance(holder["name"], bytes) else str(holder["name"])
            if name == consumer or name in live:
                continue
            for entry in self._redis.xpending_range(self._stream, GROUP, "-", "+", 1, consumername=name):
                claimed: list[Any] = cast(list[Any], self._redis.xclaim(self._stream, GROUP, consumer, 500,
                                                                        [entry["message_id"]]))
                for entry_id, fields in claimed:
                    if fields:
                        return self._take(entry_id, fields)
        return None

    @_reachable
    def next_job(self, consumer: str, block_s: float) -> Job | None:
        try:
            return self._next_job(consumer, block_s)
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            self._group_ready = False  # Redis lost the stream (a restart without persistence)
            self._ensure_group()
            return None

    def _next_job(self, consumer: str, block_s: float) -> Job | None:
        self._ensure_group()
        orphan = self._claim_from_dead_workers(consumer)
        if orphan is not None:
            metrics.JOBS_RECLAIMED.inc()
            return orphan
        answer = self._redis.xautoclaim(self._stream, GROUP, consumer, min_idle_time=self._claim_idle_ms, count=1)
        for entry_id, fields in answer[1]:  # Redis 6.2 answers 2 items, 7.x adds a third
            if fields:  # None when the entry was deleted meanwhile
                metrics.JOBS_RECLAIMED.inc()
                return self._take(entry_id, fields)
        delivered: list[Any] = cast(list[Any], self._redis.xreadgroup(
            GROUP, consumer, {self._stream: ">"}, count=1, block=max(1, int(block_s * 1000))
        ))
        for _, entries in delivered or []:
            for entry_id, fields in entries:
                return self._take(entry_id, fields)
        return None

    @_reachable
    def keep_alive(self, job: Job, consumer: str) -> None:
        entry_id = self._entries.get(job.id)
        if entry_id is not None:
            self._redis.xclaim(self._stream, GROUP, consumer, 0, [entry_id], justid=True)

    @_reachable
    def ack(self, job: Job) -> None:
        entry_id = self._entries.pop(job.id, None)
        if entry_id is not None:
            with self._redis.pipeline() as pipe:
                pipe.xack(self._stream, GROUP, entry_id)
                pipe.xdel(self._stream, entry_id)
                pipe.execute()

    @_reachable
    def heartbeat(self, worker: str, info: dict[str, Any]) -> None:
        now = time.time()
        with self._redis.pipeline() as pipe:
            pipe.zadd(f"{self._p}:workers", {worker: now})
            pipe.zremrangebyscore(f"{self._p}:workers", "-inf", now - WORKER_TTL_S)
            pipe.set(f"{self._p}:worker:{worker}", json.dumps(info), px=int(WORKER_TTL_S * 1000))
            pipe.execute()

    @_reachable
    def retire(self, worker: str) -> None:
        with self._redis.pipeline() as pipe:
            pipe.zrem(f"{self._p}:workers", worker)
            pipe.delete(f"{self._p}:worker:{worker}")
            pipe.execute()

    def _worker_names(self) -> list[bytes]:
        return cast(list[bytes], self._redis.zrangebyscore(f"{self._p}:workers", time.time() - WORKER_TTL_S, "+inf"))

    @_reachable
    def live_workers(self) -> list[dict[str, Any]]:
        names = self._worker_names()
        if not names:
            return []
        infos = self._redis.mget([f"{self._p}:worker:{n.decode()}" for n in names])
        return [json.loads(info) for info in infos if info is not None]

    @_reachable
    def stats(self) -> StoreStats:
        """Acknowledged jobs are deleted from the stream, so its length is queued + pending."""
        self._ensure_group()
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self._stream)
            pipe.xinfo_groups(self._stream)
            pipe.info("memory")
            length, groups, memory = pipe.execute()
        group = next(g for g in groups if g["name"] in (GROUP, GROUP.encode()))
        pending = int(group["pending"])
        last = group["last-delivered-id"]
        oldest: list[Any] = cast(list[Any], self._redis.xrange(
            self._stream, min=b"(" + (last if isinstance(last, bytes) else last.encode()), count=1))
        age_s = max(time.time() - int(bytes(oldest[0][0]).split(b"-")[0]) / 1000, 0.0) if oldest else 0.0
        sessions = sum(1 for _ in self._redis.scan_iter(match=f"{self._p}:s:*:meta", count=1000))
        return StoreStats(queued=max(int(length) - pending, 0), pending=pending, oldest_queued_age_s=age_s,
                          sessions=sessions, bytes_stored=int(memory["used_memory"]))

    def close(self) -> None:
        self._redis.close()


def connect(url: str, **options: Any) -> RedisStore:
    """A RedisStore that has answered a ping, or StoreUnavailable naming the URL's host."""
    store = RedisStore(url, **options)
    if not store.ping():
        host = url.split("@")[-1]
        raise StoreUnavailable(f"Redis at {host} does not answer")
    return store
