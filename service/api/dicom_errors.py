"""The DICOM verbs' domain errors and the problem each becomes (status, ``urn:icr:problem:*`` kind).

``DICOM_PROBLEMS`` has the shape of the API's problem table: ``install`` registers it on an
app, and it can as well be merged into one table of all problems.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.api.problems import problem_response
from service.dicom import dicomweb
from service.imaging.upload import UploadTooLarge
from service.imaging.volume import ImageError


class DicomServiceError(Exception):
    """Base of these errors; ``str()`` is the detail shown to the caller."""


class InvalidUpload(DicomServiceError):
    """The multipart or JSON body of a create request is not usable."""


class InvalidCentreFrame(DicomServiceError):
    """A centre given in both frames, or as a file."""


class NoDicomSource(DicomServiceError):
    """The session was made from NIfTI: no CT series to reference."""


class NoFrameOfReference(DicomServiceError):
    """The source CT series has no FrameOfReferenceUID to reference."""


class MultiframeSource(DicomServiceError):
    """The source CT is one multi-frame image; DICOM outputs need a single-frame series."""


class PacsNotConfigured(DicomServiceError):
    """No ICR_DICOMWEB_URL."""


# error type -> (status, kind, fixed detail or None to use str(error)); nearest listed base wins
DICOM_PROBLEMS: dict[type[Exception], tuple[int, str, str | None]] = {
    InvalidUpload: (422, "invalid-request", None),
    InvalidCentreFrame: (422, "invalid-centre", None),
    UploadTooLarge: (413, "upload-too-large", None),
    ImageError: (422, "invalid-image", None),
    NoDicomSource: (409, "no-dicom-source", None),
    NoFrameOfReference: (409, "no-frame-of-reference", None),
    MultiframeSource: (409, "multiframe-source", None),
    PacsNotConfigured: (503, "pacs-not-configured", None),
    dicomweb.StudyNotFound: (404, "study-not-found", None),
    dicomweb.AmbiguousSeries: (409, "ambiguous-series", None),
    dicomweb.SeriesRefused: (422, "invalid-series", None),
    dicomweb.PacsError: (502, "pacs-unavailable", None),
}


def install(app: FastAPI) -> None:
    async def on_error(request: Request, error: Exception) -> JSONResponse:
        for kind in type(error).__mro__:
            if kind in DICOM_PROBLEMS:
                status, name, detail = DICOM_PROBLEMS[kind]
                return problem_response(request, status, name, detail or str(error))
        raise error

    for error_type in DICOM_PROBLEMS:
        app.add_exception_handler(error_type, on_error)
