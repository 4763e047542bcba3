"""The service's domain errors: what went wrong, in the use case's words.

Use-case code raises these (and the store's and imaging's own errors); it never names
an HTTP status. One table in :mod:`service.api.problems` maps each to its status and
``urn:icr:problem:*`` kind. ``retry_after_s`` (when set) becomes a Retry-After header.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the domain errors; ``str()`` is the detail shown to the caller."""

    retry_after_s: float | None = None

    def __init__(self, detail: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class InvalidCentre(ServiceError):
    """The centre is malformed or names a place without data."""


class InvalidImage(ServiceError):
    """An uploaded image cannot be used."""


class ClickOutsideVolume(ServiceError):
    """A click lies outside the session's volume."""


class IdempotencyKeyReused(ServiceError):
    """An Idempotency-Key came back with a different request."""


class SessionNotReady(ServiceError):
    """The session's initial segmentation has not landed yet."""


class VersionNotFound(ServiceError):
    """The session has no such version."""


class VersionMismatch(ServiceError):
    """If-Match names a version the session is no longer at."""


class VersionConflict(ServiceError):
    """The session changed while the request was computed."""


class NothingToUndo(ServiceError):
    """The session is at its initial segmentation."""


class NoRefinementStage(ServiceError):
    """The served weights have no refinement stage (an initial-only checkpoint): clicks cannot be applied."""


class UncertaintyNotAvailable(ServiceError):
    """The version was computed without the members' votes."""


class RequestInFlight(ServiceError):
    """A request with the same Idempotency-Key is still running."""

    retry_after_s = 2.0


class NoEngine(ServiceError):
    """No engine worker is alive."""

    retry_after_s = 5.0


class EngineTimeout(ServiceError):
    """The engine did not answer in time; the request's job was cancelled."""

    retry_after_s = 5.0


class OutcomeUnknown(ServiceError):
    """The store went away while a request waited: its job may still land."""

    retry_after_s = 5.0


class EngineFailed(ServiceError):
    """The engine failed on this job."""


class Unauthorised(ServiceError):
    """No valid API key."""


class QuotaExceeded(ServiceError):
    """A per-key limit is reached."""

    retry_after_s = 60.0


# -- DICOM inputs and outputs ---------------------------------------------------------
class InvalidUpload(ServiceError):
    """The multipart or JSON body of a create request is not usable."""


class InvalidCentreFrame(ServiceError):
    """A centre given in both frames, or as a file."""


class NoDicomSource(ServiceError):
    """The session was made from NIfTI: no CT series to reference."""


class NoFrameOfReference(ServiceError):
    """The source CT series has no FrameOfReferenceUID to reference."""


class MultiframeSource(ServiceError):
    """The source CT is one multi-frame image; DICOM outputs need a single-frame series."""


class PacsNotConfigured(ServiceError):
    """No ICR_DICOMWEB_URL."""
