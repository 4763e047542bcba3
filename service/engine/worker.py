"""The engine worker: takes jobs from the queue, runs the ensembles, commits results.

A job names the version it was computed from; the commit lands only if that is
still the session's current version (else the outcome is ``stale``), a job delivered
twice (its first worker died after committing) lands once, and a job its request
cancelled is skipped or, if already running, never commits. While a job runs, the
worker keeps its claim alive and heartbeats; a worker that dies stops both and its
job is taken over by another. A store outage never kills the worker: it waits with
backoff and carries on, re-registering its heartbeat when the store is back.

A job runs its passes in the session's working windows (:mod:`service.engine.windows`:
which window a click uses, the memory where no window reached yet, the border rule) and
stores only the windows it computed. The click guarantee (:mod:`service.engine.guarantee`)
is applied to every pass before its probability is stored, unless ``honour_clicks`` is off
(research and evaluation). After it, every click pass keeps only what its clicks may change
(:mod:`service.engine.locality`: the objects they touch; "not tumour" only removes, and in an
object's core removes all of it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from service import logs, metrics
from service.engine import windows
from service.engine.ensemble import Engine
from service.engine.guarantee import honour_clicks, honour_radius_voxels
from service.engine.locality import confine
from service.engine.outputs import mask_blob, mask_summary, stored_probability
from service.engine.uncertainty import Uncertainty, encode_uncertainty, summarise, votes_after_clicks, votes_for_mask
from service.engine.windows import Canvas
from service.imaging.grid import WorkingGrid, preprocess
from service.imaging.scan import Scan, decode_scan
from service.store.codec import decode_array
from service.store.contract import (
    BLOB_MASK,
    BLOB_PROBABILITY,
    BLOB_UNCERTAINTY,
    Click,
    CommitResult,
    Extent,
    Job,
    JobOutcome,
    JobQueue,
    OutcomeStatus,
    ScanMissing,
    SessionGone,
    SessionNotFound,
    SessionStore,
    StoreUnavailable,
    VersionRecord,
    WindowRef,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
SCAN_CACHE_SESSIONS = 2  # decoded scans (a whole-body CT is a few hundred MB as float32)
IMAGE_CACHE_WINDOWS = 16  # preprocessed network inputs of recent windows
SCAN_WAIT_S = 60.0  # how long a job waits for a scan its session's creation is still storing
WINDOW_CACHE = 64  # decoded window probabilities (they never change once stored)
OUTAGE_BACKOFF_S = (0.2, 5.0)  # first and longest wait while the store is unreachable

_OUTCOMES = {
    CommitResult.COMMITTED: OutcomeStatus.DONE,
    CommitResult.DUPLICATE: OutcomeStatus.DONE,
    CommitResult.STALE: OutcomeStatus.STALE,
    CommitResult.GONE: OutcomeStatus.GONE,
    CommitResult.CANCELLED: OutcomeStatus.CANCELLED,
}


class Worker:
    def __init__(
        self,
        engine: Engine,
        store: SessionStore,
        queue: JobQueue,
        *,
        name: str | None = None,
        claim_idle_s: float = 30.0,
        honour_clicks: bool = True,
        border_passes: int = 1,
    ) -> None:
        self.engine = engine
        self.store = store
        self.queue = queue
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._keep_alive_s = max(claim_idle_s / 3, 0.05)
        self._scans: OrderedDict[str, Scan] = OrderedDict()
        self._images: OrderedDict[tuple[str, tuple[float, ...]], np.ndarray] = OrderedDict()
        self._windows: OrderedDict[tuple[str, WindowRef], np.ndarray] = OrderedDict()
        self.honour_clicks = honour_clicks
        self.border_passes = border_passes
        metrics.watch_device(engine.device)

    # -- loop -------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": str(self.engine.device),
            "weights": self.engine.checkpoint.digest,
            "precision": self.engine.precision,
            "grid_shape": list(self.engine.grid_shape),
            "spacing_mm": self.engine.checkpoint.spacing_mm,
            "stages": list(self.engine.stages),  # without "refinement", clicks are refused (409)
        }

    def run(self, stop: threading.Event, *, poll_s: float = 1.0) -> None:
        """Serve jobs until ``stop`` is set; the job in hand is finished first."""
        beat = threading.Thread(target=self._heartbeat, args=(stop,), name="icr-heartbeat", daemon=True)
        beat.start()
        log.info("worker %s serving on %s", self.name, self.engine.device)
        wait_s = OUTAGE_BACKOFF_S[0]
        while not stop.is_set():
            try:
                job = self.queue.next_job(self.name, block_s=poll_s)
                if job is not None:
                    with logs.bound(request_id=job.request_id, session_id=job.session_id, job_id=job.id):
                        self.handle(job)
                wait_s = OUTAGE_BACKOFF_S[0]
            except StoreUnavailable as error:
                log.warning("store unavailable (%s); retrying in %.1f s", error, wait_s)
                stop.wait(wait_s)
                wait_s = min(wait_s * 2, OUTAGE_BACKOFF_S[1])
        try:
            self.queue.retire(self.name)
        except StoreUnavailable:
            log.warning("could not retire from the live set; it expires by itself")
        log.info("worker %s stopped", self.name)

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.queue.heartbeat(self.name, self.info())
                metrics.mark_heartbeat()
            except Exception:  # a store outage must not stop the heartbeat; it re-registers when back
                log.warning("heartbeat failed", exc_info=True)
            stop.wait(HEARTBEAT_S)

    @contextmanager
    def _claim_held(self, job: Job) -> Iterator[None]:
        done = threading.Event()

        def refresh() -> None:
            while not done.wait(self._keep_alive_s):
                try:
                    self.queue.keep_alive(job, self.name)
                except Exception:
                    log.warning("could not refresh the claim on job %s", job.id, exc_info=True)

        thread = threading.Thread(target=refresh, name="icr-claim", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def handle(self, job: Job) -> JobOutcome:
        """Process and record the outcome, then acknowledge (so a crash before the ack retries)."""
        started = time.perf_counter()
        earlier = self.queue.job_outcome(job.session_id, job.id)
        if earlier is not None and earlier.status.finished:  # cancelled, or done before a crash
            self.queue.ack(job)
            log.info("job %s skipped: already %s", job.id, earlier.status.value)
            return earlier
        metrics.observe_phase(job.kind, "queue_wait", time.time() - job.created_at)
        with self._claim_held(job):
            outcome = self._process_safely(job)
        if outcome.status not in (OutcomeStatus.DONE, OutcomeStatus.CANCELLED):
            self.queue.finish(job.session_id, outcome)  # a commit records done itself
        self.queue.ack(job)
        metrics.JOBS.labels(job.kind, outcome.status.value).inc()
        log.info(
            "job %s %s on session %s: %s in %.2f s",
            job.id, job.kind, job.session_id, outcome.status.value, time.perf_counter() - started,
        )
        return outcome

    def _process_safely(self, job: Job) -> JobOutcome:
        try:
            return self.process(job)
        except StoreUnavailable:
            raise  # not the job's fault: it stays pending and is retried
        except (SessionGone, SessionNotFound):
            return JobOutcome(job.id, OutcomeStatus.GONE, message="session was deleted or expired")
        except Exception as error:
            log.exception("job %s failed", job.id)
            metrics.ENGINE_FAILURES.labels(job.kind, type(error).__name__).inc()
            return JobOutcome(job.id, OutcomeStatus.FAILED, message=f"engine error: {type(error).__name__}")

    # -- one job ----------------------------------------------------------------
    def _scan(self, session_id: str) -> Scan:
        if session_id in self._scans:
            self._scans.move_to_end(session_id)
            return self._scans[session_id]
        scan = decode_scan(self._stored_scan(session_id))
        self._scans[session_id] = scan
        while len(self._scans) > SCAN_CACHE_SESSIONS:
            self._scans.popitem(last=False)
        return scan

    def _stored_scan(self, session_id: str) -> bytes:
        """The session's scan; a job that needs it before its creation has stored it (the border rule
        right after the initial pass) waits for it, ``SCAN_WAIT_S`` at most."""
        deadline = time.monotonic() + SCAN_WAIT_S
        while True:
            try:
                return self.store.load_scan(session_id)
            except ScanMissing:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _window_images(self, session_id: str, window: WorkingGrid, offset: windows.Offset) -> np.ndarray:
        """The network input of a window: the first one's as the API made it, the others from the scan."""
        key = (session_id, window.origin_mm)
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        if offset == FIRST_WINDOW:
            images = decode_array(self.store.load_images(session_id)).astype(np.float32)
        else:
            scan = self._scan(session_id)
            images = preprocess(scan.ct, scan.pet, window)
        self._images[key] = images
        while len(self._images) > IMAGE_CACHE_WINDOWS:
            self._images.popitem(last=False)
        return images

    def process(self, job: Job) -> JobOutcome:
        session = self.store.get_session(job.session_id, touch=False)
        lattice = WorkingGrid.from_dict(session.grid)
        extent = session.lattice_extent()
        version = job.base_version + 1
        started = time.perf_counter()
        if job.kind == "initial":
            base_windows: tuple[WindowRef, ...] = ()
            clicks: tuple[Click, ...] = ()
            targets = [FIRST_WINDOW]
            parent = None
        else:
            base = self.store.get_version(job.session_id, job.base_version)
            base_windows, clicks = base.windows, base.clicks + job.new_clicks
            targets = windows.plan(job.new_clicks, [w.offset for w in base.windows], lattice.shape, extent)
            parent = job.base_version
        canvas = Canvas(base_windows, lattice.shape, lambda ref: self._stored_window(job.session_id, ref))
        changed = Canvas((), lattice.shape, canvas.probability)  # only windows this job computes: nothing to load
        run = _JobRun(job, version, lattice, extent, canvas, clicks, self.border_passes, changed)
        for n, offset in enumerate(targets):
            current = self._pass(run, offset, name=BLOB_PROBABILITY if n == len(targets) - 1 else f"{BLOB_PROBABILITY}.{n}")
            self._extend(run, current)
        encoding = time.perf_counter()
        summary = self._summary(run)
        record = VersionRecord(
            version=version, parent=parent, clicks=clicks, job_id=job.id, probability_of=version,
            summary=summary, windows=tuple(canvas.windows),
        )
        committing = time.perf_counter()
        result = self.store.commit_version(job.session_id, job.base_version, record, run.blobs)
        metrics.observe_phase(job.kind, "engine", encoding - started)
        metrics.observe_phase(job.kind, "encode", committing - encoding)
        metrics.observe_phase(job.kind, "commit", time.perf_counter() - committing)
        status = _OUTCOMES[result]
        return JobOutcome(job.id, status, version=version if status is OutcomeStatus.DONE else None)

    def _stored_window(self, session_id: str, ref: WindowRef) -> np.ndarray:
        key = (session_id, ref)
        if key not in self._windows:
            self._windows[key] = decode_array(self.store.load_blob(session_id, ref.version, ref.blob).blob)
            while len(self._windows) > WINDOW_CACHE:
                self._windows.popitem(last=False)
        return self._windows[key]

    def _pass(self, run: _JobRun, offset: windows.Offset, *, name: str, under: WindowRef | None = None) -> WindowRef:
        """One pass in the window at ``offset``: its memory composed from the session (the window's
        first mask where no window reached yet), the clicks it holds, the guarantee; recorded in the canvas."""
        grid = run.lattice.window(offset)
        images = self._window_images(run.job.session_id, grid, offset)
        memory, covered = run.canvas.compose(offset, grid.shape)
        earlier = memory  # the session's probability so far in this window, 0 where uncovered (rebound, never written)
        clicks = windows.local_clicks(run.clicks, offset)
        first = None
        if run.job.kind == "initial" or not covered.all():
            first = self.engine.initial_pass(images)
            metrics.ENGINE_PASSES.labels(run.job.kind, "initial").inc()
            metrics.ENGINE_PASSES.labels(run.job.kind, "refinement").inc(self.engine.zero_click_passes)
            memory = np.where(covered, memory, first.probability)
        if first is not None and run.job.kind == "initial":
            result_pass = first
        else:
            shown = windows.inside(clicks, grid.shape)
            new = sum(1 for c in windows.local_clicks(run.job.new_clicks, offset) if c in shown)
            result_pass = self.engine.refine_pass(images, memory, shown, new_clicks=new)
            metrics.ENGINE_PASSES.labels(run.job.kind, "refinement").inc()
        probability, votes = result_pass.probability, result_pass.votes
        if self.honour_clicks:
            radius = honour_radius_voxels(run.lattice.spacing_mm)
            probability = honour_clicks(probability, clicks, radius)
            votes = votes_after_clicks(votes, result_pass.members, clicks, radius)
        ref = WindowRef(offset, run.version, name)
        if run.job.kind != "initial":  # what the request's clicks may change (service.engine.locality)
            reached = run.changed.compose(offset, grid.shape)[0] > 0.5 if run.changed.windows else None
            drawn = probability > 0.5
            probability, changed = confine(probability, earlier, windows.local_clicks(run.job.new_clicks, offset),
                                           clicks, run.lattice.spacing_mm, reached=reached)
            votes = votes_for_mask(votes, result_pass.members, drawn, probability > 0.5)
            run.changed.add(ref, changed.astype(np.float32))
        blob, stored = stored_probability(probability)
        run.canvas.add(ref, stored, under=under)
        run.blobs[name] = blob
        if under is None:  # the window the version shows
            run.blobs[BLOB_MASK] = mask_blob(stored > 0.5)
            disagreement = summarise(votes, result_pass.members, stored, run.lattice.spacing_mm)
            run.blobs[BLOB_UNCERTAINTY] = encode_uncertainty(votes, disagreement)
            run.uncertainty = dataclasses.replace(disagreement, suggested_click=_on_lattice(disagreement.suggested_click, offset))
        run.passes += 1
        return ref

    def _extend(self, run: _JobRun, window: WindowRef) -> None:
        """The border rule (service.engine.windows): a mask that reaches the window's border gets
        another pass in the window shifted towards it, kept under the window it extends."""
        if run.extensions_left <= 0:
            return
        shifted = windows.border_shift(run.canvas.probability(window) > 0.5, window.offset, run.extent)
        if shifted is None:
            return
        run.extensions_left -= 1
        self._pass(run, shifted, name=f"{BLOB_PROBABILITY}.border{run.passes}", under=window)

    def _summary(self, run: _JobRun) -> dict[str, Any]:
        """The mask summary over every window of the version, and the current window's disagreement."""
        low, shape = run.canvas.union_box()
        probability, _ = run.canvas.compose(low, shape)
        summary = mask_summary(probability > 0.5, run.lattice.spacing_mm, low)
        assert run.uncertainty is not None
        summary["uncertainty"] = run.uncertainty.to_dict()
        return summary


FIRST_WINDOW: windows.Offset = (0, 0, 0)


@dataclasses.dataclass
class _JobRun:
    """What the passes of one job share."""

    job: Job
    version: int
    lattice: WorkingGrid
    extent: Extent
    canvas: Canvas
    clicks: tuple[Click, ...]
    extensions_left: int
    changed: Canvas  # the objects each of the job's passes changed (1) or kept (0), for the border rule's passes
    blobs: dict[str, bytes] = dataclasses.field(default_factory=dict)
    uncertainty: Uncertainty | None = None
    passes: int = 0


def _on_lattice(click: Click | None, offset: windows.Offset) -> Click | None:
    if click is None:
        return None
    i, j, k = (v + o for v, o in zip(click.voxel, offset))
    return Click(click.label, (i, j, k))
