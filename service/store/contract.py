"""The store's contract: typed session state, jobs and outcomes, and the interface
that both backends (Redis, in-process) implement. The API and the engine meet only
here; everything crosses as JSON or the array blobs of :mod:`service.store.codec`.

Session state is versioned. Version ``k`` has a :class:`VersionRecord` (its clicks,
the version it came from, the job that made it, its mask summary, its working windows)
and its blobs: the probability of each window it computed (the next pass's memory) and
the packed mask of its current window, which the API answers with.

A session covers its whole scan (the CT and PET as uploaded, stored once, beside the
first window's network input, which the initial pass uses without decoding the scan). The networks
see working windows of the checkpoint's grid shape placed on the session's lattice (the
voxels of the first window's grid, extended without end); a version lists the windows
computed so far as :class:`WindowRef` s, each naming the version and blob that hold its
probability, so a click stores only the windows it recomputed (see
:mod:`service.engine.windows`). A
commit names the version it was computed from and lands only while that is still the
current one, so a late result never overwrites a newer version. Undo commits a new
version that points at an older version's blobs, so history is kept without copies.

The click contract is exact. Every job has a state in its session (queued, then one
terminal state); the worker's commit writes the version, its blobs and the job's
``done`` state in one atomic step. An Idempotency-Key is bound to the job it started
(with a fingerprint of the request body): a retry follows that job, it never starts
another while the job is queued, running or done. A request that gives up waiting
cancels its job; a cancelled job never commits, so an error answer never lands later.
"""

from __future__ import annotations

import abc
import json
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, ClassVar, Literal, TypeVar

ClickLabel = Literal["foreground", "background"]
CLICK_LABELS: tuple[ClickLabel, ...] = ("foreground", "background")  # also the click-map channel order
JobKind = Literal["initial", "refine"]

WORKER_TTL_S = 6.0  # a worker unseen for this long (three missed heartbeats) counts as dead
OUTCOME_TTL_S = 600.0  # how long a finished job's wake-up waits for the request that asked for it
BLOB_PROBABILITY = "probability"
BLOB_MASK = "mask"
BLOB_UNCERTAINTY = "uncertainty"  # the members' votes (service.engine.uncertainty)


class StoreError(Exception):
    """Base of the store's exceptions."""


class SessionNotFound(StoreError):
    """No such session, or not visible to the caller."""


class SessionGone(StoreError):
    """The session existed but was deleted or expired."""


class StoreUnavailable(StoreError):
    """The backing store cannot be reached (or did not answer in time)."""


class ScanMissing(StoreError):
    """The session has no scan yet: its creation stores the scan while the initial pass runs."""


class NoLiveWorker(StoreError):
    """A job was submitted while no engine worker is alive: nothing was queued."""


@dataclass(frozen=True)
class Click:
    """One click: its label, its voxel (on the session lattice; a window's own indices inside the
    engine) and, when the user gave a point, that point in world mm. The one click type of the project."""

    label: ClickLabel
    voxel: tuple[int, int, int]
    world_mm: tuple[float, float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"label": self.label, "voxel": list(self.voxel)}
        if self.world_mm is not None:
            data["world_mm"] = list(self.world_mm)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Click:
        i, j, k = (int(v) for v in data["voxel"])
        if data["label"] not in CLICK_LABELS:
            raise ValueError(f"unknown click label {data['label']!r}")
        world = data.get("world_mm")
        x, y, z = (float(v) for v in world) if world is not None else (0.0, 0.0, 0.0)
        return cls(label=data["label"], voxel=(i, j, k), world_mm=None if world is None else (x, y, z))


@dataclass(frozen=True)
class WindowRef:
    """A working window of a version: its first voxel on the session lattice and where its probability is
    stored (blob ``blob`` of version ``version``). All windows of a session have the grid's shape."""

    offset: tuple[int, int, int]
    version: int
    blob: str = BLOB_PROBABILITY

    def to_dict(self) -> dict[str, Any]:
        return {"offset": list(self.offset), "version": self.version, "blob": self.blob}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WindowRef:
        i, j, k = (int(v) for v in data["offset"])
        return cls(offset=(i, j, k), version=int(data["version"]), blob=str(data["blob"]))


@dataclass(frozen=True)
class Extent:
    """The session lattice's voxels the CT spans (``low`` to ``high``, inclusive) and its world box (RAS mm)."""

    low: tuple[int, int, int]
    high: tuple[int, int, int]
    world_low_mm: tuple[float, float, float]
    world_high_mm: tuple[float, float, float]

    def contains(self, voxel: Any) -> bool:
        return all(lo <= int(v) <= hi for v, lo, hi in zip(voxel, self.low, self.high))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Extent:
        low, high = (tuple(int(v) for v in data[side]) for side in ("low", "high"))
        world_low, world_high = (tuple(float(v) for v in data[side]) for side in ("world_low_mm", "world_high_mm"))
        return cls((low[0], low[1], low[2]), (high[0], high[1], high[2]),
                   (world_low[0], world_low[1], world_low[2]), (world_high[0], world_high[1], world_high[2]))


@dataclass(frozen=True)
class SessionRecord:
    """What a session is, independent of its versions."""

    id: str
    owner: str | None
    grid: dict[str, Any]  # the first working window; its voxel indices, extended, are the session lattice
    original_shape: tuple[int, int, int]
    original_affine: tuple[tuple[float, ...], ...]
    created_at: float
    version: int = -1  # -1 until the initial pass has landed
    expires_at: float = 0.0
    click_count: int = 0  # clicks of the current version
    placement: dict[str, Any] | None = None  # where the working window was placed and why
    source: dict[str, Any] | None = None  # DICOM inputs (service.dicom.source.session_source); None for NIfTI
    extent: dict[str, Any] | None = None  # Extent.to_dict(): where the CT lies on the session lattice

    def lattice_extent(self) -> Extent:
        """The CT's extent on the session lattice; a record made without one spans its first window."""
        if self.extent is not None:
            return Extent.from_dict(self.extent)
        i, j, k = (int(n) - 1 for n in self.grid["shape"])
        spacing = float(self.grid["spacing_mm"])
        x, y, z = (float(v) for v in self.grid["origin_mm"])
        return Extent((0, 0, 0), (i, j, k), (x, y, z), (x + i * spacing, y + j * spacing, z + k * spacing))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> SessionRecord:
        data = json.loads(text)
        data["original_shape"] = tuple(data["original_shape"])
        data["original_affine"] = tuple(tuple(row) for row in data["original_affine"])
        return cls(**data)


Record = TypeVar("Record", bound="JsonRecord")


class JsonRecord:
    """JSON for a dataclass whose fields ``NESTED`` names hold tuples of Click-like records (``from_dict``)."""

    NESTED: ClassVar[dict[str, Any]] = {}

    def to_json(self) -> str:
        return json.dumps(asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_json(cls: type[Record], text: str | bytes) -> Record:
        data = json.loads(text)
        for name, kind in cls.NESTED.items():
            data[name] = tuple(kind.from_dict(item) for item in data.get(name, ()))
        return cls(**data)


@dataclass(frozen=True)
class VersionRecord(JsonRecord):
    version: int
    parent: int | None
    clicks: tuple[Click, ...]
    job_id: str
    probability_of: int  # the version whose blobs (mask, uncertainty) this version shows
    summary: dict[str, Any] = field(default_factory=dict)  # the mask's voxels, volume, bounding box
    windows: tuple[WindowRef, ...] = ()  # composed in order, a later one over an earlier; the last is current
    NESTED: ClassVar[dict[str, Any]] = {"clicks": Click, "windows": WindowRef}

    def __post_init__(self) -> None:
        if not self.windows:  # a version of one window: the first, with its own probability
            object.__setattr__(self, "windows", (WindowRef((0, 0, 0), self.probability_of, BLOB_PROBABILITY),))

    @property
    def window(self) -> WindowRef:
        """The current window: the one the version's mask shows."""
        return self.windows[-1]



@dataclass(frozen=True)
class Job(JsonRecord):
    """One engine pass: the initial ensemble, or a refinement adding ``new_clicks`` to
    the clicks of ``base_version``."""

    id: str
    session_id: str
    kind: JobKind
    base_version: int
    new_clicks: tuple[Click, ...] = field(default=())
    request_id: str = ""  # the X-Request-ID of the request that made the job, for the worker's logs
    created_at: float = field(default_factory=time.time)  # Unix time; the worker measures queue wait from it
    NESTED: ClassVar[dict[str, Any]] = {"new_clicks": Click}


class OutcomeStatus(str, Enum):
    QUEUED = "queued"  # not finished: waiting for or on a worker
    DONE = "done"
    STALE = "stale"  # the session moved on before the result landed
    GONE = "gone"  # the session was deleted or expired meanwhile
    FAILED = "failed"
    CANCELLED = "cancelled"  # the request gave up waiting; the job never lands

    @property
    def finished(self) -> bool:
        return self is not OutcomeStatus.QUEUED

    @property
    def landed(self) -> bool:
        """Whether the job's work is (or may still become) part of the session."""
        return self in (OutcomeStatus.QUEUED, OutcomeStatus.DONE)


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


@dataclass(frozen=True)
class IdempotencyClaim:
    """A request's Idempotency-Key and the fingerprint of what it asked for."""

    key: str
    fingerprint: str


@dataclass(frozen=True)
class Binding:
    """The job an Idempotency-Key is bound to."""

    job_id: str
    fingerprint: str

    def to_json(self) -> str:
        return json.dumps({"job": self.job_id, "fingerprint": self.fingerprint})

    @classmethod
    def from_json(cls, text: str | bytes) -> Binding:
        data = json.loads(text)
        return cls(job_id=str(data["job"]), fingerprint=str(data["fingerprint"]))


@dataclass(frozen=True)
class Submission:
    """What :meth:`JobQueue.submit` did: queued ``job_id`` (``new``) or found the key bound to it."""

    job_id: str
    fingerprint: str
    new: bool


class CommitResult(str, Enum):
    COMMITTED = "committed"
    DUPLICATE = "duplicate"  # the same job already committed this version
    STALE = "stale"
    GONE = "gone"
    CANCELLED = "cancelled"  # the job was cancelled: nothing written
    BOUND = "bound"  # the Idempotency-Key is already bound to another job: nothing written


@dataclass(frozen=True)
class StoreStats:
    """What a metrics scrape reads from the store; None where a backend cannot tell."""

    queued: int  # jobs no worker has taken yet
    pending: int  # jobs taken by a worker and not yet acknowledged
    oldest_queued_age_s: float  # how long the oldest queued job has waited (0 when none)
    sessions: int | None
    bytes_stored: int | None


class SessionStore(abc.ABC):
    """Session state with TTLs, atomic version commits and idempotency records."""

    @abc.abstractmethod
    def ping(self) -> bool: ...

    @abc.abstractmethod
    def create_session(self, record: SessionRecord, images: bytes) -> SessionRecord:
        """Store a new session (version -1) and its first window's network input (the preprocessed
        images, a codec array blob); sets expiry."""

    @abc.abstractmethod
    def get_session(self, session_id: str, *, touch: bool = True) -> SessionRecord:
        """The session's record; ``touch`` refreshes its TTL. Raises SessionNotFound/SessionGone."""

    @abc.abstractmethod
    def delete_session(self, session_id: str) -> None:
        """Remove all state; later reads raise SessionGone."""

    @abc.abstractmethod
    def load_images(self, session_id: str) -> bytes: ...

    @abc.abstractmethod
    def store_scan(self, session_id: str, scan: bytes) -> None:
        """Keep the session's scan (:mod:`service.imaging.scan`), from which the windows other than the
        first are made; under the session's expiry. Raises SessionNotFound/SessionGone."""

    @abc.abstractmethod
    def load_scan(self, session_id: str) -> bytes:
        """The scan :meth:`store_scan` kept; ScanMissing while none is."""

    @abc.abstractmethod
    def get_version(self, session_id: str, version: int) -> VersionRecord: ...

    @abc.abstractmethod
    def load_blob(self, session_id: str, version: int, name: str) -> VersionBlob:
        """The version's record and its blob ``name`` (a window's probability, ``BLOB_MASK``:
        the packed mask's wire form as JSON), following ``probability_of``; one read."""

    @abc.abstractmethod
    def commit_version(
        self,
        session_id: str,
        base_version: int,
        record: VersionRecord,
        blobs: dict[str, bytes],
        *,
        idempotency: IdempotencyClaim | None = None,
    ) -> CommitResult:
        """Atomically make ``record`` current if ``base_version`` is still current, store
        its ``blobs`` (its windows' probabilities, ``BLOB_MASK``; none when it reuses an older
        version's, as undo does) and mark its job done, all in one step; ``idempotency``'s
        key is bound to ``record.job_id`` in that step too. Nothing is written when the job
        was cancelled or when the key is already bound (``BOUND``)."""

    @abc.abstractmethod
    def binding(self, session_id: str, key: str) -> Binding | None:
        """The job an Idempotency-Key of this session is bound to, if any."""

    # -- per-key limits -----------------------------------------------------------
    @abc.abstractmethod
    def count_request(self, owner: str, window_s: int) -> int:
        """Count one request of ``owner`` in the current fixed window; the count so far."""

    @abc.abstractmethod
    def admit_session(self, owner: str, session_id: str, limit: int) -> bool:
        """Record ``session_id`` as one of ``owner``'s live sessions unless it already has
        ``limit`` of them (expired and deleted sessions no longer count)."""


@dataclass(frozen=True)
class VersionBlob:
    record: VersionRecord
    blob: bytes


class JobQueue(abc.ABC):
    """Jobs for engine workers, their states and outcomes for the API."""

    @abc.abstractmethod
    def submit(self, job: Job, idempotency: IdempotencyClaim | None = None) -> Submission:
        """Queue ``job`` (state ``queued``), binding ``idempotency``'s key to it, in one step;
        NoLiveWorker (nothing queued) when no engine worker is alive.

        When the key is bound to a job that is queued or done, nothing is queued and the
        answer names that job; a key bound to a job that failed, went stale or was
        cancelled is bound anew, since that job never landed."""

    @abc.abstractmethod
    def job_outcome(self, session_id: str, job_id: str) -> JobOutcome | None:
        """The job's state now (``queued`` or terminal); None for an unknown job."""

    @abc.abstractmethod
    def wait_outcome(self, session_id: str, job_id: str, timeout_s: float) -> JobOutcome:
        """The job's state once it is terminal, or ``queued`` after ``timeout_s``."""

    @abc.abstractmethod
    def cancel(self, session_id: str, job_id: str) -> JobOutcome:
        """Cancel a job that has not finished; the job's state afterwards (``cancelled``,
        or the terminal state it had already reached)."""

    @abc.abstractmethod
    def finish(self, session_id: str, outcome: JobOutcome) -> None:
        """Record a terminal state that is not a commit (stale, gone, failed) and wake waiters."""

    @abc.abstractmethod
    def next_job(self, consumer: str, block_s: float) -> Job | None:
        """A new job, or one whose worker died; None after ``block_s``."""

    @abc.abstractmethod
    def keep_alive(self, job: Job, consumer: str) -> None:
        """Tell the queue that ``consumer`` is still working on ``job``."""

    @abc.abstractmethod
    def ack(self, job: Job) -> None: ...

    @abc.abstractmethod
    def heartbeat(self, worker: str, info: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def retire(self, worker: str) -> None:
        """A worker that stops cleanly leaves the live set at once."""

    @abc.abstractmethod
    def live_workers(self) -> list[dict[str, Any]]: ...

    def stats(self) -> StoreStats:
        """Queue depth, sessions and bytes stored, for metrics (may be slow-ish: scrape time only)."""
        raise NotImplementedError
