"""What the API does with sessions: validate, store, hand jobs to the engine, answer.

Nothing here changes a session until its input has passed validation; a click only
becomes part of a session when the engine's commit for it lands. Errors are the
domain errors of :mod:`service.api.errors` (and the store's and imaging's own).

The click contract (see :mod:`service.store.contract`): a request submits one job and
waits for its outcome; a request with an Idempotency-Key follows the job the key is
bound to instead of starting another; a request that gives up waiting (the engine is
slow, or no worker is left) cancels its job, so an error answer never lands later.
Answers come from the committed version's record and packed mask: the probability is
decoded only for the NIfTI downloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import numpy as np

from service import logs
from service.api import errors, observability
from service.api.schemas import (
    ClickIn,
    ClickOut,
    ExtentOut,
    GridOut,
    MaskSummary,
    OriginalOut,
    SeriesOut,
    SourceOut,
    SuvOut,
    UncertaintyOut,
    WindowOut,
)
from service.engine.guarantee import honour_clicked_voxels
from service.imaging.frames import patient_to_world, world_to_patient
from service.imaging.grid import (
    WorkingGrid,
    check_centre,
    describe_box,
    lattice_extent,
    overlap_centre,
    preprocess,
    to_volume_grid,
    world_box,
)
from service.imaging.localise import localise_tumour
from service.imaging.scan import Scan, encode_scan
from service.imaging.volume import ImageError, Volume
from service.settings import Settings
from service.store.codec import decode_array, decode_mask, encode_array
from service.store.contract import (
    BLOB_MASK,
    Binding,
    Click,
    CommitResult,
    Extent,
    IdempotencyClaim,
    Job,
    JobOutcome,
    JobQueue,
    NoLiveWorker,
    OutcomeStatus,
    SessionGone,
    SessionNotFound,
    SessionRecord,
    SessionStore,
    StoreUnavailable,
    VersionRecord,
    WindowRef,
)

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the owner id the limits use when auth is off
ENGINE_CHECK_S = 2.0
STAGES_CACHE_S = 5.0  # while waiting, how often the request checks that a worker is still alive


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


def parse_centre(text: str | None, name: str = "centre", frame: str = "world mm") -> np.ndarray | None:
    if text is None or not text.strip():
        return None
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not np.all(np.isfinite(values)) or max(abs(v) for v in values) > 1e6:
        raise errors.InvalidCentre(f"{name} must be three finite numbers 'x,y,z' in {frame}")
    return np.asarray(values, dtype=np.float64)


def _outcome_unknown(phase: str) -> errors.OutcomeUnknown:
    return errors.OutcomeUnknown(
        f"the session store became unreachable while this request {phase}; it may still be applied: "
        "retry with the same Idempotency-Key to get its outcome"
    )


def fingerprint(operation: str, body: Any) -> str:
    """What an Idempotency-Key promises: the same operation with the same body."""
    canonical = json.dumps({"operation": operation, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclasses.dataclass
class SessionView:
    """A session at one version, with what the wire schemas need.

    ``grid`` is the session's first working window; its voxel indices, extended beyond
    its shape, are the session lattice that clicks and bounding boxes are given on.
    ``window`` is the version's current window: the grid of its mask and probability."""

    record: SessionRecord
    version: VersionRecord
    grid: WorkingGrid
    mask_wire: dict[str, Any] | None = None
    probability: np.ndarray | None = None

    @property
    def window(self) -> WorkingGrid:
        return self.grid.window(self.version.window.offset)

    def clicks_out(self) -> list[ClickOut]:
        return [
            ClickOut(label=c.label, voxel=c.voxel, world_mm=_vector3(world), patient_mm=_vector3(world_to_patient(world)))
            for c in self.version.clicks
            for world in (click_point(c, self.grid),)
        ]

    def source_out(self) -> SourceOut | None:
        source = self.record.source
        if source is None:
            return None
        series = {
            role: None if source.get(role) is None else SeriesOut.model_validate(source[role])
            for role in ("ct", "pet")
        }
        suv = (source.get("pet") or {}).get("suv")
        return SourceOut(ct=series["ct"], pet=series["pet"], suv=None if suv is None else SuvOut(**suv))

    def grid_out(self) -> GridOut:
        return GridOut(**_grid_fields(self.grid))

    def window_out(self) -> WindowOut:
        return WindowOut(**_grid_fields(self.window), offset=self.version.window.offset, windows=len(self.version.windows))

    def extent_out(self) -> ExtentOut:
        return ExtentOut(**self.record.lattice_extent().to_dict())

    def original_out(self) -> OriginalOut:
        return OriginalOut(shape=self.record.original_shape, affine=[list(r) for r in self.record.original_affine])

    def mask(self) -> np.ndarray:
        if self.mask_wire is not None:
            return decode_mask(self.mask_wire)
        assert self.probability is not None
        return self.probability > 0.5

    def uncertainty_out(self) -> UncertaintyOut | None:
        """The members' disagreement, from the version's summary (None for versions without one)."""
        data = self.version.summary.get("uncertainty")
        if data is None:
            return None
        data = {**data}
        if data["suggested_click"] is not None:
            click = {**data["suggested_click"]}
            click["world_mm"] = tuple(float(v) for v in self.grid.voxel_to_world(click["voxel"]))
            data["suggested_click"] = click
        return UncertaintyOut(**data)

    def result(self) -> dict[str, Any]:
        assert self.mask_wire is not None
        return {
            "id": self.record.id,
            "version": self.version.version,
            "window": self.window_out(),
            "clicks": self.clicks_out(),
            "summary": MaskSummary(**{k: v for k, v in self.version.summary.items() if k != "uncertainty"}),
            "mask": self.mask_wire,
            "uncertainty": self.uncertainty_out(),
        }


class Sessions:
    def __init__(self, store: SessionStore, queue: JobQueue, settings: Settings) -> None:
        self.store = store
        self.queue = queue
        self.settings = settings
        self._stages_read_at = -math.inf
        self._refinement_served = True
        self._scan_writers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="icr-scan")

    # -- reading ------------------------------------------------------------------
    def record(self, session_id: str, owner: str | None) -> SessionRecord:
        record = self.store.get_session(session_id)
        if record.owner != owner:
            raise SessionNotFound(session_id)  # never reveal another key's session
        return record

    def ready_record(self, session_id: str, owner: str | None) -> SessionRecord:
        record = self.record(session_id, owner)
        if record.version < 0:
            raise errors.SessionNotReady("the initial segmentation of this session is still running")
        return record

    def view(self, record: SessionRecord, version: int | None = None, *, with_probability: bool = True) -> SessionView:
        """The session at ``version`` (default: current), with its probability decoded when asked."""
        number = record.version if version is None else version
        try:
            version_record = self.store.get_version(record.id, number)
            probability = self.window_probability(record, version_record.window) if with_probability else None
        except SessionGone:
            raise
        except SessionNotFound as error:  # the session is there (it was just read): the version is not
            raise errors.VersionNotFound(f"session has no version {number}") from error
        return SessionView(record, version_record, WorkingGrid.from_dict(record.grid), probability=probability)

    def window_probability(self, record: SessionRecord, window: WindowRef) -> np.ndarray:
        return decode_array(self.store.load_blob(record.id, window.version, window.blob).blob)

    def answer(self, record: SessionRecord, version: int) -> SessionView:
        """The result of ``version`` from its record and packed mask (no probability decoded)."""
        stored = self.store.load_blob(record.id, version, BLOB_MASK)
        return SessionView(record, stored.record, WorkingGrid.from_dict(record.grid), mask_wire=json.loads(stored.blob))

    # -- creating -----------------------------------------------------------------
    def _live_workers(self) -> list[dict[str, Any]]:
        workers = self.queue.live_workers()
        if not workers:
            raise errors.NoEngine("no engine worker is alive; start one with 'icr worker'")
        return workers

    def _engine_grid(self) -> tuple[tuple[int, int, int], float, str]:
        """The grid shape, spacing and weights digest a live worker serves (one read of the workers)."""
        worker = self._live_workers()[0]
        shape = tuple(int(n) for n in worker["grid_shape"])
        return (shape[0], shape[1], shape[2]), float(worker.get("spacing_mm", 1.0)), str(worker.get("weights", "unknown"))

    def create(
        self, ct: Volume, pet: Volume, centre: np.ndarray | None, owner: str | None,
        source: dict[str, Any] | None = None, request_id: str = "",
    ) -> SessionView:
        """A session on a CT/PET pair (see service.api.uploads.read_images); ``centre`` in world mm."""
        overlap = overlap_centre(ct, pet)
        shape, spacing, weights = self._engine_grid()
        placement = self._place(ct, pet, centre, overlap, shape[0] * spacing)
        grid = WorkingGrid.around(placement["centre_mm"], shape, spacing)
        if centre is not None:
            try:
                check_centre(centre, ct, pet, grid)
            except ImageError as error:
                raise errors.InvalidCentre(str(error)) from error
        images = preprocess(ct, pet, grid).astype(np.float16)
        if not np.all(np.isfinite(images)):  # values whose normalisation overflows (float16 tops at 65504)
            raise errors.InvalidImage("ct/pet: voxel values are too extreme to normalise; check the units (HU, SUV)")
        low, high = lattice_extent(ct, grid)
        world_low, world_high = world_box(ct)
        record = SessionRecord(
            id=secrets.token_urlsafe(24),  # 192 random bits
            owner=owner,
            grid=grid.to_dict(),
            original_shape=ct.shape,
            original_affine=tuple(tuple(float(v) for v in row) for row in ct.affine),
            created_at=time.time(),
            source=None if source is None else {**source, "weights": weights},
            placement=placement,
            extent=Extent(_index3(low), _index3(high), _vector3(world_low), _vector3(world_high)).to_dict(),
        )
        limit = self.settings.max_sessions_per_key
        if not self.store.admit_session(owner or ANONYMOUS, record.id, limit):
            raise errors.QuotaExceeded(
                f"this key holds {limit} live sessions (ICR_MAX_SESSIONS_PER_KEY); delete one or let one expire"
            )
        record = self.store.create_session(record, encode_array(images))
        job = Job(id=uuid.uuid4().hex, session_id=record.id, kind="initial", base_version=-1,
                  request_id=request_id or logs.request_id.get())
        # the scan (for windows elsewhere) is compressed and stored while the initial pass runs
        keeping = self._scan_writers.submit(self._keep_scan, record.id, Scan(ct, pet))
        try:
            outcome = self._run(job, None)
            if outcome.status is not OutcomeStatus.DONE or outcome.version is None:
                raise self._outcome_error(outcome)
            keeping.result()
        except BaseException:
            keeping.cancel()
            self._forget(record.id)
            raise
        log.info("session %s created", record.id)
        return self.answer(self.store.get_session(record.id), outcome.version)

    def _keep_scan(self, session_id: str, scan: Scan) -> None:
        self.store.store_scan(session_id, encode_scan(scan))

    @staticmethod
    def _place(ct: Volume, pet: Volume, centre: np.ndarray | None, overlap: np.ndarray,
               window_mm: float) -> dict[str, Any]:
        """Where the working window goes and why: the given centre, else the tumour found on
        PET/CT (service.imaging.localise), else the middle of the CT/PET overlap."""
        if centre is not None:
            return {"centre_mm": [float(v) for v in centre], "reason": "the centre given with the request"}
        try:
            found = localise_tumour(ct, pet, window_mm=window_mm)
        except (ImageError, ValueError) as error:  # a field of view the localiser cannot read
            log.info("localisation failed (%s); window on the CT/PET overlap", type(error).__name__)
        else:
            if found.candidates:
                return found.to_dict()
        return {"centre_mm": [float(v) for v in overlap],
                "reason": "no PET hotspot found in a head-and-neck band: the middle of the CT/PET overlap"}

    def _forget(self, session_id: str) -> None:
        try:
            self.store.delete_session(session_id)
        except (SessionGone, SessionNotFound, StoreUnavailable):
            pass  # already gone, or the store is down and its TTL removes it

    # -- jobs -----------------------------------------------------------------------
    def _run(self, job: Job, claim: IdempotencyClaim | None) -> JobOutcome:
        """Submit ``job`` (or follow the job ``claim``'s key is bound to) and wait for its outcome."""
        observability.observe_validation(job.kind)
        try:
            submission = self.queue.submit(job, claim)
        except NoLiveWorker as error:
            raise errors.NoEngine("no engine worker is alive; start one with 'icr worker'") from error
        except StoreUnavailable as error:  # the command may have reached the store before it went away
            raise _outcome_unknown("was submitted") from error
        if not submission.new:
            self._check_fingerprint(submission.fingerprint, claim)
        return self._await(job.session_id, submission.job_id)

    def _await(self, session_id: str, job_id: str) -> JobOutcome:
        """The job's outcome; a job still unfinished at the deadline, or with no live
        worker left to run it, is cancelled, so the error answered never lands later."""
        deadline = time.monotonic() + self.settings.job_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                outcome = self.queue.wait_outcome(session_id, job_id, max(0.0, min(ENGINE_CHECK_S, remaining)))
                if outcome.status.finished:
                    return outcome
                if remaining > ENGINE_CHECK_S and self.queue.live_workers():
                    continue
                final = self.queue.cancel(session_id, job_id)
            except StoreUnavailable as error:
                raise _outcome_unknown("waited") from error
            if final.status is not OutcomeStatus.CANCELLED:
                return final  # it finished just now
            if remaining > ENGINE_CHECK_S:
                raise errors.NoEngine("no engine worker is alive to run this request; it was not applied")
            raise errors.EngineTimeout(
                f"the engine did not answer within {self.settings.job_timeout_s:g} s; "
                "the request was cancelled and not applied: retry"
            )

    @staticmethod
    def _check_fingerprint(bound: str, claim: IdempotencyClaim | None) -> None:
        if claim is not None and bound != claim.fingerprint:
            raise errors.IdempotencyKeyReused(
                "this Idempotency-Key was used for a different request; use a new key for a new request"
            )

    @staticmethod
    def _outcome_error(outcome: JobOutcome) -> Exception:
        if outcome.status is OutcomeStatus.STALE:
            return errors.VersionConflict("the session changed while this request was computed; retry")
        if outcome.status is OutcomeStatus.GONE:
            return SessionGone(outcome.job_id)
        if outcome.status is OutcomeStatus.CANCELLED:
            return errors.EngineTimeout("the request was cancelled before it was applied: retry")
        return errors.EngineFailed(outcome.message or "the engine failed")

    def _answer_outcome(self, record: SessionRecord, outcome: JobOutcome) -> SessionView:
        if outcome.status is not OutcomeStatus.DONE or outcome.version is None:
            raise self._outcome_error(outcome)
        return self.answer(record, outcome.version)

    def _replay(self, record: SessionRecord, claim: IdempotencyClaim | None) -> SessionView | None:
        """The answer to a retried request whose job landed or may still land; None otherwise."""
        if claim is None:
            return None
        bound: Binding | None = self.store.binding(record.id, claim.key)
        if bound is None:
            return None
        self._check_fingerprint(bound.fingerprint, claim)
        outcome = self.queue.job_outcome(record.id, bound.job_id)
        if outcome is None or not outcome.status.landed:
            return None  # it failed, went stale or was cancelled: never applied, so run it anew
        if not outcome.status.finished:
            outcome = self._await(record.id, bound.job_id)
        return self._answer_outcome(record, outcome)

    # -- changing -----------------------------------------------------------------
    @staticmethod
    def check_if_match(record: SessionRecord, if_match: str | None) -> None:
        if if_match is None:
            return
        tag = if_match.strip().removeprefix("W/").strip('"')
        if tag != str(record.version):
            raise errors.VersionMismatch(
                f"If-Match names version {tag!r}; the session is at version {record.version}"
            )

    @staticmethod
    def _to_click(index: int, click: ClickIn, lattice: WorkingGrid, extent: Extent) -> Click:
        """The click on the session lattice; anywhere inside the CT, else ClickOutsideVolume naming its extent."""
        low, high = np.asarray(extent.low), np.asarray(extent.high)
        if click.voxel is not None:
            voxel = np.asarray(click.voxel, dtype=np.float64)
            where = f"voxel {list(click.voxel)}"
            inside = bool(np.all(voxel >= low) and np.all(voxel <= high))
        else:
            world = np.asarray(patient_to_world(click.patient_mm) if click.patient_mm is not None else click.world_mm,
                               dtype=np.float64)
            where = f"patient_mm {list(click.patient_mm)}" if click.patient_mm is not None else f"world_mm {list(click.world_mm or ())}"
            inside = bool(np.all(world >= extent.world_low_mm) and np.all(world <= extent.world_high_mm))
            voxel = np.clip(np.rint(lattice.world_to_voxel(world)), low, high)  # within half a voxel of the CT's edge
        if not inside:
            raise errors.ClickOutsideVolume(
                f"clicks[{index}] at {where} lies outside the CT, which spans "
                f"{describe_box(np.asarray(extent.world_low_mm), np.asarray(extent.world_high_mm))}, "
                f"lattice voxels {list(extent.low)} to {list(extent.high)}"
            )
        i, j, k = (int(v) for v in voxel)
        point = None if click.voxel is not None else _vector3(world)
        return Click(label=click.label, voxel=(i, j, k), world_mm=point)

    def _check_refinement_served(self) -> None:
        """Clicks need a refinement stage; workers that predate the ``stages`` key have one.
        The live workers' stages are read at most every ``STAGES_CACHE_S`` (not a store read per click)."""
        now = time.monotonic()
        if now - self._stages_read_at > STAGES_CACHE_S:
            workers = self.queue.live_workers()
            self._refinement_served = not workers or any(
                "refinement" in w.get("stages", ("refinement",)) for w in workers
            )
            self._stages_read_at = now
        if not self._refinement_served:
            raise errors.NoRefinementStage(
                "the served weights have no refinement stage (an initial-only import): this deployment gives the "
                "automatic mask but cannot refine it with clicks; import a refinement ensemble to enable clicks"
            )

    def add_clicks(
        self,
        session_id: str,
        owner: str | None,
        clicks: Sequence[ClickIn],
        if_match: str | None,
        key: str | None,
        request_id: str = "",
    ) -> SessionView:
        record = self.ready_record(session_id, owner)
        self._check_refinement_served()
        claim = None
        if key is not None:
            claim = IdempotencyClaim(key, fingerprint("clicks", [c.model_dump(mode="json") for c in clicks]))
        replayed = self._replay(record, claim)
        if replayed is not None:
            return replayed
        self.check_if_match(record, if_match)
        self._check_click_limits(record, len(clicks))
        lattice, extent = WorkingGrid.from_dict(record.grid), record.lattice_extent()
        new = tuple(self._to_click(n, click, lattice, extent) for n, click in enumerate(clicks))
        job = Job(
            id=uuid.uuid4().hex, session_id=record.id, kind="refine",
            base_version=record.version, new_clicks=new, request_id=request_id or logs.request_id.get(),
        )
        return self._answer_outcome(record, self._run(job, claim))

    def _check_click_limits(self, record: SessionRecord, adding: int) -> None:
        per_request, per_session = self.settings.max_clicks_per_request, self.settings.max_clicks_per_session
        if adding > per_request:
            raise errors.QuotaExceeded(
                f"{adding} clicks in one request; the limit is {per_request} (ICR_MAX_CLICKS_PER_REQUEST)"
            )
        if record.click_count + adding > per_session:
            raise errors.QuotaExceeded(
                f"the session holds {record.click_count} clicks; {adding} more would pass the limit of "
                f"{per_session} (ICR_MAX_CLICKS_PER_SESSION): start a new session"
            )

    def undo(self, session_id: str, owner: str | None, if_match: str | None, key: str | None = None) -> SessionView:
        record = self.ready_record(session_id, owner)
        claim = IdempotencyClaim(key, fingerprint("undo", None)) if key is not None else None
        replayed = self._replay(record, claim)
        if replayed is not None:
            return replayed
        self.check_if_match(record, if_match)
        current = self.store.get_version(record.id, record.version)
        if current.parent is None:
            raise errors.NothingToUndo("the session is at its initial segmentation")
        target = self.store.get_version(record.id, current.parent)
        restored = dataclasses.replace(
            target, version=record.version + 1, job_id=f"undo-{uuid.uuid4().hex}"
        )
        result = self.store.commit_version(record.id, record.version, restored, {}, idempotency=claim)
        if result is CommitResult.BOUND:
            replayed = self._replay(record, claim)  # a retry of this undo committed first
            if replayed is not None:
                return replayed
        if result is CommitResult.GONE:
            raise SessionGone(record.id)
        if result is not CommitResult.COMMITTED:
            raise errors.VersionConflict("the session changed during the undo; retry")
        return self.answer(record, restored.version)

    def delete(self, session_id: str, owner: str | None) -> None:
        self.record(session_id, owner)
        self.store.delete_session(session_id)

    # -- volumes --------------------------------------------------------------------
    def mask_volume(self, view: SessionView, space: str) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 mask, affine) in the current window or on the uploaded CT's grid (every window)."""
        if space == "working":
            return view.mask().astype(np.uint8), view.window.affine
        affine = np.asarray(view.record.original_affine, dtype=np.float64)
        pieces = [(self.window_probability(view.record, ref), view.grid.window(ref.offset)) for ref in view.version.windows]
        mask = to_volume_grid(pieces, view.record.original_shape, affine) > 0.5
        if self.settings.honour_clicks:  # at the CT's own resolution, each clicked voxel has its click's label
            honour_clicked_voxels(mask, [(c.label, click_point(c, view.grid)) for c in view.version.clicks], affine)
        return mask.astype(np.uint8), affine


def _grid_fields(grid: WorkingGrid) -> dict[str, Any]:
    return {"shape": grid.shape, "spacing_mm": grid.spacing_mm, "origin_mm": grid.origin_mm, "affine": grid.affine.tolist()}


def click_point(click: Click, lattice: WorkingGrid) -> np.ndarray:
    """The world point (mm) of a click: where the user clicked, or its lattice voxel's centre."""
    return np.asarray(click.world_mm) if click.world_mm is not None else lattice.voxel_to_world(click.voxel)


def _index3(values: np.ndarray) -> tuple[int, int, int]:
    i, j, k = (int(v) for v in values)
    return i, j, k


def _vector3(values: np.ndarray) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in values)
    return x, y, z


def expires_iso(record: SessionRecord) -> str:
    return _iso(record.expires_at)


def created_iso(record: SessionRecord) -> str:
    return _iso(record.created_at)
