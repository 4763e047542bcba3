"""What the API does with sessions: validate, store, hand jobs to the engine, answer.

Nothing here changes a session until its input has passed validation; a click only
becomes part of a session when the engine's result for it commits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
import uuid
from datetime import datetime, timezone

import numpy as np

from service.api.problems import Problem
from service.api.schemas import (
    ClickIn,
    ClickOut,
    GridOut,
    MaskSummary,
    OriginalOut,
    UncertaintyOut,
)
from service.engine.uncertainty import Uncertainty, decode_summary
from service.imaging.grid import WorkingGrid, overlap_centre, preprocess, to_volume_grid
from service.imaging.nifti import read_nifti
from service.imaging.volume import ImageError
from service.settings import Settings
from service.store.codec import decode_array, encode_array, encode_mask
from service.store.contract import (
    Click,
    CommitResult,
    Job,
    JobOutcome,
    JobQueue,
    OutcomeStatus,
    SessionGone,
    SessionNotFound,
    SessionRecord,
    SessionStore,
    VersionRecord,
)

log = logging.getLogger(__name__)

IDEMPOTENCY_POLL_S = 0.1


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


def parse_centre(text: str | None) -> np.ndarray | None:
    if text is None or not text.strip():
        return None
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not np.all(np.isfinite(values)):
        raise Problem(422, "invalid-centre", "centre must be three finite numbers 'x,y,z' in world mm")
    return np.asarray(values, dtype=np.float64)


@dataclasses.dataclass
class SessionView:
    """A session at one version, with what the wire schemas need."""

    record: SessionRecord
    version: VersionRecord
    grid: WorkingGrid
    probability: np.ndarray | None = None
    uncertainty: Uncertainty | None = None

    def clicks_out(self) -> list[ClickOut]:
        return [
            ClickOut(label=c.label, voxel=c.voxel, world_mm=tuple(float(v) for v in self.grid.voxel_to_world(c.voxel)))
            for c in self.version.clicks
        ]

    def grid_out(self) -> GridOut:
        return GridOut(
            shape=self.grid.shape,
            spacing_mm=self.grid.spacing_mm,
            origin_mm=self.grid.origin_mm,
            affine=self.grid.affine.tolist(),
        )

    def original_out(self) -> OriginalOut:
        return OriginalOut(shape=self.record.original_shape, affine=[list(r) for r in self.record.original_affine])

    def mask(self) -> np.ndarray:
        assert self.probability is not None
        return self.probability > 0.5

    def summary(self) -> MaskSummary:
        mask = self.mask()
        voxels = int(mask.sum())
        volume_ml = voxels * self.grid.spacing_mm**3 / 1000.0
        if voxels == 0:
            return MaskSummary(voxels=0, volume_ml=0.0, bbox_min=None, bbox_max=None)
        where = np.argwhere(mask)
        low, high = where.min(axis=0), where.max(axis=0)
        return MaskSummary(
            voxels=voxels,
            volume_ml=round(volume_ml, 4),
            bbox_min=tuple(int(v) for v in low),
            bbox_max=tuple(int(v) for v in high),
        )

    def uncertainty_out(self) -> UncertaintyOut | None:
        if self.uncertainty is None:
            return None
        data = self.uncertainty.to_dict()
        click = self.uncertainty.suggested_click
        if click is not None:
            data["suggested_click"]["world_mm"] = tuple(float(v) for v in self.grid.voxel_to_world(click.voxel))
        return UncertaintyOut(**data)

    def result(self) -> dict:
        return {
            "id": self.record.id,
            "version": self.version.version,
            "clicks": self.clicks_out(),
            "summary": self.summary(),
            "mask": encode_mask(self.mask()),
            "uncertainty": self.uncertainty_out(),
        }


class Sessions:
    def __init__(self, store: SessionStore, queue: JobQueue, settings: Settings) -> None:
        self.store = store
        self.queue = queue
        self.settings = settings

    # -- reading ------------------------------------------------------------------
    def record(self, session_id: str, owner: str | None) -> SessionRecord:
        try:
            record = self.store.get_session(session_id)
        except SessionNotFound as error:
            raise Problem(404, "session-not-found", "no such session") from error
        except SessionGone as error:
            raise Problem(410, "session-gone", "session was deleted or has expired") from error
        if record.owner != owner:
            raise Problem(404, "session-not-found", "no such session")  # never reveal another key's session
        return record

    def ready_record(self, session_id: str, owner: str | None) -> SessionRecord:
        record = self.record(session_id, owner)
        if record.version < 0:
            raise Problem(409, "session-not-ready", "the initial segmentation of this session is still running")
        return record

    def view(self, record: SessionRecord, version: int | None = None, *, with_probability: bool = True) -> SessionView:
        number = record.version if version is None else version
        try:
            version_record = self.store.get_version(record.id, number)
            probability = decode_array(self.store.load_probability(record.id, number)) if with_probability else None
            blob = self.store.load_uncertainty(record.id, number) if with_probability else None
        except SessionGone as error:
            raise Problem(410, "session-gone", "session was deleted or has expired") from error
        except SessionNotFound as error:
            raise Problem(404, "version-not-found", f"session has no version {number}") from error
        uncertainty = None if blob is None else decode_summary(blob)
        return SessionView(record, version_record, WorkingGrid.from_dict(record.grid), probability, uncertainty)

    # -- creating -----------------------------------------------------------------
    def _engine_grid(self) -> tuple[tuple[int, int, int], float]:
        workers = self.queue.live_workers()
        if not workers:
            raise Problem(503, "no-engine", "no engine worker is alive; start one with 'icr worker'")
        shape = tuple(int(n) for n in workers[0]["grid_shape"])
        return (shape[0], shape[1], shape[2]), float(workers[0].get("spacing_mm", 1.0))

    def create(self, ct_bytes: bytes, pet_bytes: bytes, centre_text: str | None, owner: str | None) -> SessionView:
        centre = parse_centre(centre_text)
        upload_limit = int(self.settings.max_upload_mb * 2**20)
        for role, payload in (("ct", ct_bytes), ("pet", pet_bytes)):
            if len(payload) > upload_limit:
                raise Problem(413, "upload-too-large", f"{role}: file is {len(payload)} bytes, over the upload limit of {upload_limit}")
        limit = int(self.settings.max_image_mb * 2**20)
        try:
            ct = read_nifti(ct_bytes, role="ct", max_decompressed_bytes=limit)
            pet = read_nifti(pet_bytes, role="pet", max_decompressed_bytes=limit)
            overlap = overlap_centre(ct, pet)
        except ImageError as error:
            raise Problem(422, "invalid-image", str(error)) from error
        shape, spacing = self._engine_grid()
        grid = WorkingGrid.around(overlap if centre is None else centre, shape, spacing)
        images = preprocess(ct, pet, grid).astype(np.float16)
        record = SessionRecord(
            id=secrets.token_urlsafe(24),  # 192 random bits
            owner=owner,
            grid=grid.to_dict(),
            original_shape=ct.shape,
            original_affine=tuple(tuple(float(v) for v in row) for row in ct.affine),
            created_at=time.time(),
        )
        record = self.store.create_session(record, encode_array(images))
        outcome = self._run(Job(id=uuid.uuid4().hex, session_id=record.id, kind="initial", base_version=-1))
        if outcome.status is not OutcomeStatus.DONE:
            self.store.delete_session(record.id)
            raise self._outcome_problem(outcome)
        log.info("session %s created", record.id)
        return self.view(self.store.get_session(record.id))

    # -- changing -----------------------------------------------------------------
    def _run(self, job: Job) -> JobOutcome:
        if not self.queue.live_workers():
            raise Problem(503, "no-engine", "no engine worker is alive; start one with 'icr worker'")
        self.queue.enqueue(job)
        outcome = self.queue.wait_outcome(job.id, self.settings.job_timeout_s)
        if outcome is None:
            raise Problem(
                503,
                "engine-timeout",
                f"the engine did not answer within {self.settings.job_timeout_s:g} s; "
                "the result may still land: GET the session to see its version",
            )
        return outcome

    @staticmethod
    def _outcome_problem(outcome: JobOutcome) -> Problem:
        if outcome.status is OutcomeStatus.STALE:
            return Problem(409, "version-conflict", "the session changed while this request was computed; retry")
        if outcome.status is OutcomeStatus.GONE:
            return Problem(410, "session-gone", "session was deleted or has expired")
        return Problem(500, "engine-failed", outcome.message or "the engine failed")

    @staticmethod
    def check_if_match(record: SessionRecord, if_match: str | None) -> None:
        if if_match is None:
            return
        tag = if_match.strip().removeprefix("W/").strip('"')
        if tag != str(record.version):
            raise Problem(412, "version-mismatch", f"If-Match names version {tag!r}; the session is at version {record.version}")

    def _to_click(self, index: int, click: ClickIn, grid: WorkingGrid) -> Click:
        if click.voxel is not None:
            voxel = np.asarray(click.voxel)
        else:
            voxel = np.rint(grid.world_to_voxel(np.asarray(click.world_mm, dtype=np.float64)))
        if not grid.contains_voxel(voxel):
            where = f"voxel {list(click.voxel)}" if click.voxel is not None else f"world_mm {list(click.world_mm or ())}"
            raise Problem(
                422, "click-outside-volume",
                f"clicks[{index}] at {where} lies outside the working grid of shape {list(grid.shape)}",
            )
        i, j, k = (int(v) for v in voxel)
        return Click(label=click.label, voxel=(i, j, k))

    def add_clicks(
        self, session_id: str, owner: str | None, clicks: list[ClickIn], if_match: str | None, key: str | None
    ) -> SessionView:
        record = self.ready_record(session_id, owner)
        if key is not None:
            earlier = self._replay(record, key)
            if earlier is not None:
                return earlier
        try:
            self.check_if_match(record, if_match)
            grid = WorkingGrid.from_dict(record.grid)
            new = [self._to_click(n, click, grid) for n, click in enumerate(clicks)]
            current = self.store.get_version(record.id, record.version)
            job = Job(
                id=uuid.uuid4().hex, session_id=record.id, kind="refine",
                base_version=record.version, clicks=current.clicks + tuple(new),
            )
            outcome = self._run(job)
            if outcome.status is not OutcomeStatus.DONE or outcome.version is None:
                raise self._outcome_problem(outcome)
        except BaseException:
            if key is not None:
                self.store.release_idempotency(record.id, key)
            raise
        if key is not None:
            self.store.finish_idempotency(record.id, key, json.dumps({"version": outcome.version}))
        return self.view(self.store.get_session(record.id), outcome.version)

    def _replay(self, record: SessionRecord, key: str) -> SessionView | None:
        """The earlier answer to a retried request, waiting while the first is in flight."""
        deadline = time.monotonic() + self.settings.job_timeout_s
        while True:
            stored = self.store.claim_idempotency(record.id, key)
            if stored is None:
                return None  # first time: the caller processes it
            if stored != "pending":
                return self.view(record, int(json.loads(stored)["version"]))
            if time.monotonic() > deadline:
                raise Problem(409, "request-in-flight", "a request with this Idempotency-Key is still running")
            time.sleep(IDEMPOTENCY_POLL_S)

    def undo(self, session_id: str, owner: str | None, if_match: str | None) -> SessionView:
        record = self.ready_record(session_id, owner)
        self.check_if_match(record, if_match)
        current = self.store.get_version(record.id, record.version)
        if current.parent is None:
            raise Problem(409, "nothing-to-undo", "the session is at its initial segmentation")
        target = self.store.get_version(record.id, current.parent)
        restored = VersionRecord(
            version=record.version + 1,
            parent=target.parent,
            clicks=target.clicks,
            job_id=f"undo-{uuid.uuid4().hex}",
            probability_of=target.probability_of,
        )
        result = self.store.commit_version(record.id, record.version, restored, None)
        if result is CommitResult.GONE:
            raise Problem(410, "session-gone", "session was deleted or has expired")
        if result is not CommitResult.COMMITTED:
            raise Problem(409, "version-conflict", "the session changed during the undo; retry")
        return self.view(self.store.get_session(record.id))

    def delete(self, session_id: str, owner: str | None) -> None:
        self.record(session_id, owner)
        try:
            self.store.delete_session(session_id)
        except SessionGone as error:
            raise Problem(410, "session-gone", "session was deleted or has expired") from error

    # -- volumes --------------------------------------------------------------------
    def mask_volume(self, view: SessionView, space: str) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 mask, affine) in the working grid or on the uploaded CT's grid."""
        if space == "working":
            return view.mask().astype(np.uint8), view.grid.affine
        affine = np.asarray(view.record.original_affine, dtype=np.float64)
        assert view.probability is not None
        on_ct = to_volume_grid(view.probability, view.grid, view.record.original_shape, affine)
        return (on_ct > 0.5).astype(np.uint8), affine


def expires_iso(record: SessionRecord) -> str:
    return _iso(record.expires_at)


def created_iso(record: SessionRecord) -> str:
    return _iso(record.created_at)
