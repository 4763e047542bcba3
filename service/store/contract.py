"""The store's contract: typed session state, jobs and outcomes, and the interface
that both backends (Redis, in-process) implement. The API and the engine meet only
here; everything crosses as JSON or the array blobs of :mod:`service.store.codec`.

Session state is versioned. Version ``k`` has a :class:`VersionRecord` (its clicks,
the version it came from, the job that made it) and a probability blob. A commit
names the version it was computed from and lands only while that is still the
current one, so a late result never overwrites a newer version. Undo commits a new
version that points at an older probability blob, so history is kept without copies.
"""

from __future__ import annotations

import abc
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Literal

ClickLabel = Literal["foreground", "background"]
JobKind = Literal["initial", "refine"]

WORKER_TTL_S = 15.0  # a worker unseen for this long counts as dead
OUTCOME_TTL_S = 600.0  # how long an outcome waits for the request that asked for it


class StoreError(Exception):
    """Base of the store's exceptions."""


class SessionNotFound(StoreError):
    """No such session, or not visible to the caller."""


class SessionGone(StoreError):
    """The session existed but was deleted or expired."""


class StoreUnavailable(StoreError):
    """The backing store cannot be reached."""


@dataclass(frozen=True)
class Click:
    label: ClickLabel
    voxel: tuple[int, int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "voxel": list(self.voxel)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Click:
        i, j, k = (int(v) for v in data["voxel"])
        return cls(label=data["label"], voxel=(i, j, k))


@dataclass(frozen=True)
class SessionRecord:
    """What a session is, independent of its versions."""

    id: str
    owner: str | None
    grid: dict[str, Any]
    original_shape: tuple[int, int, int]
    original_affine: tuple[tuple[float, ...], ...]
    created_at: float
    version: int = -1  # -1 until the initial pass has landed
    expires_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> SessionRecord:
        data = json.loads(text)
        data["original_shape"] = tuple(data["original_shape"])
        data["original_affine"] = tuple(tuple(row) for row in data["original_affine"])
        return cls(**data)


@dataclass(frozen=True)
class VersionRecord:
    version: int
    parent: int | None
    clicks: tuple[Click, ...]
    job_id: str
    probability_of: int  # the version whose blob holds this version's probability

    def to_json(self) -> str:
        data = asdict(self)
        data["clicks"] = [c.to_dict() for c in self.clicks]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str | bytes) -> VersionRecord:
        data = json.loads(text)
        data["clicks"] = tuple(Click.from_dict(c) for c in data["clicks"])
        return cls(**data)


@dataclass(frozen=True)
class Job:
    """One engine pass: the initial ensemble, or a refinement with all clicks so far."""

    id: str
    session_id: str
    kind: JobKind
    base_version: int
    clicks: tuple[Click, ...] = field(default=())

    def to_json(self) -> str:
        data = asdict(self)
        data["clicks"] = [c.to_dict() for c in self.clicks]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str | bytes) -> Job:
        data = json.loads(text)
        data["clicks"] = tuple(Click.from_dict(c) for c in data["clicks"])
        return cls(**data)


class OutcomeStatus(str, Enum):
    DONE = "done"
    STALE = "stale"  # the session moved on before the result landed
    GONE = "gone"  # the session was deleted or expired meanwhile
    FAILED = "failed"


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: OutcomeStatus
    version: int | None = None
    message: str = ""

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "status": self.status.value})

    @classmethod
    def from_json(cls, text: str | bytes) -> JobOutcome:
        data = json.loads(text)
        data["status"] = OutcomeStatus(data["status"])
        return cls(**data)


class CommitResult(str, Enum):
    COMMITTED = "committed"
    DUPLICATE = "duplicate"  # the same job already committed this version
    STALE = "stale"
    GONE = "gone"


class SessionStore(abc.ABC):
    """Session state with TTLs, atomic version commits and idempotency records."""

    @abc.abstractmethod
    def ping(self) -> bool: ...

    @abc.abstractmethod
    def create_session(self, record: SessionRecord, images: bytes) -> SessionRecord:
        """Store a new session (version -1) and its preprocessed images; sets expiry."""

    @abc.abstractmethod
    def get_session(self, session_id: str, *, touch: bool = True) -> SessionRecord:
        """The session's record; ``touch`` refreshes its TTL. Raises SessionNotFound/SessionGone."""

    @abc.abstractmethod
    def delete_session(self, session_id: str) -> None:
        """Remove all state; later reads raise SessionGone."""

    @abc.abstractmethod
    def load_images(self, session_id: str) -> bytes: ...

    @abc.abstractmethod
    def get_version(self, session_id: str, version: int) -> VersionRecord: ...

    @abc.abstractmethod
    def load_probability(self, session_id: str, version: int) -> bytes:
        """The probability blob of ``version`` (following ``probability_of``)."""

    @abc.abstractmethod
    def load_uncertainty(self, session_id: str, version: int) -> bytes | None:
        """The uncertainty blob stored with ``version``'s probability; None if it has none."""

    @abc.abstractmethod
    def commit_version(
        self,
        session_id: str,
        base_version: int,
        record: VersionRecord,
        probability: bytes | None,
        uncertainty: bytes | None = None,
    ) -> CommitResult:
        """Atomically make ``record`` current if ``base_version`` is still current.

        ``probability`` is None when the record reuses an older blob (undo); ``uncertainty``
        (the members' disagreement, :mod:`service.engine.uncertainty`) is kept beside it."""

    @abc.abstractmethod
    def claim_idempotency(self, session_id: str, key: str) -> str | None:
        """None if ``key`` was free and is now claimed; else its stored value
        ("pending" while the first request is in flight, else its outcome)."""

    @abc.abstractmethod
    def finish_idempotency(self, session_id: str, key: str, value: str) -> None: ...

    @abc.abstractmethod
    def release_idempotency(self, session_id: str, key: str) -> None:
        """Forget a claim whose request failed, so a retry can run."""


class JobQueue(abc.ABC):
    """Jobs for engine workers and their outcomes for the API."""

    @abc.abstractmethod
    def enqueue(self, job: Job) -> None: ...

    @abc.abstractmethod
    def next_job(self, consumer: str, block_s: float) -> Job | None:
        """A new job, or one whose worker stopped acknowledging; None after ``block_s``."""

    @abc.abstractmethod
    def keep_alive(self, job: Job, consumer: str) -> None:
        """Tell the queue that ``consumer`` is still working on ``job``."""

    @abc.abstractmethod
    def ack(self, job: Job) -> None: ...

    @abc.abstractmethod
    def publish_outcome(self, outcome: JobOutcome) -> None: ...

    @abc.abstractmethod
    def wait_outcome(self, job_id: str, timeout_s: float) -> JobOutcome | None: ...

    @abc.abstractmethod
    def heartbeat(self, worker: str, info: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def live_workers(self) -> list[dict[str, Any]]: ...
