"""The API's DICOM verbs: sessions from a PACS study, masks as RTSTRUCT/DICOM-SEG, STOW-RS export.

Errors are domain errors (:mod:`service.api.errors`, the PACS's, imaging's).
"""

from __future__ import annotations

import io
from typing import Any, Literal

from pydicom.dataset import Dataset

from service.api.errors import (
    MultiframeSource,
    NoDicomSource,
    NoFrameOfReference,
    PacsNotConfigured,
)
from service.api.schemas import DicomwebStudyIn, ExportOut
from service.api.sessions import Sessions, SessionView
from service.api.uploads import upload_limits
from service.dicom import dicomweb
from service.dicom.derived import Derivation
from service.dicom.rtstruct import rtstruct
from service.dicom.seg import dicom_seg
from service.dicom.series import read_series
from service.dicom.source import ct_source, session_source
from service.imaging.upload import FLOAT32_BYTES, check_pair
from service.imaging.volume import ImageError, Volume
from service.settings import Settings

DicomFormat = Literal["rtstruct", "dicom-seg"]
DICOM_MEDIA_TYPE = "application/dicom"


def pacs_settings(settings: Settings) -> dicomweb.PacsSettings:
    if not settings.dicomweb_url:
        raise PacsNotConfigured("this service has no PACS configured (ICR_DICOMWEB_URL)")
    return dicomweb.PacsSettings(
        url=settings.dicomweb_url,
        username=settings.dicomweb_username,
        password=None if settings.dicomweb_password is None else settings.dicomweb_password.get_secret_value(),
        token=None if settings.dicomweb_token is None else settings.dicomweb_token.get_secret_value(),
        timeout_s=settings.dicomweb_timeout_s,
    )


def pull_study(study: DicomwebStudyIn, settings: Settings) -> tuple[Volume, Volume, dict[str, Any] | None]:
    """CT and PET of a PACS study, read as an upload of the same series would be."""
    client = dicomweb.connect(pacs_settings(settings))
    limits = upload_limits(settings)
    ct_info, pet_info = dicomweb.pick_pair(dicomweb.study_series(client, study.study), study.ct_series,
                                           study.pet_series)
    volumes = []
    sources = []
    for role, info in (("ct", ct_info), ("pet", pet_info)):
        if info.instances is not None and info.instances > limits.max_files:
            raise ImageError(f"{role}: {info.instances} images, over the limit of {limits.max_files}")
        volume, source = read_series(dicomweb.retrieve(client, study.study, info), role=role,
                                     max_voxels=limits.max_image_bytes // FLOAT32_BYTES)
        volumes.append(volume)
        sources.append(source)
    check_pair(sources[0], sources[1])
    return volumes[0], volumes[1], session_source(sources[0], sources[1])


def mask_object(sessions: Sessions, view: SessionView, format: DicomFormat) -> Dataset:
    """The session's mask at ``view`` as an RTSTRUCT or DICOM-SEG on the source CT."""
    source = ct_source(view.record.source)
    if source is None:
        raise NoDicomSource(
            f"{format}: this session was made from a NIfTI CT, so there is no DICOM CT series to reference; "
            "use format=nifti, or create the session from the DICOM series",
        )
    if source.multiframe:
        raise MultiframeSource(
            f"{format}: the source CT is one multi-frame image; RTSTRUCT and DICOM-SEG are made for single-frame "
            "CT series only; use format=nifti",
        )
    if not source.frame_of_reference_uid:
        raise NoFrameOfReference(
            f"{format}: the source CT series has no FrameOfReferenceUID, which an RTSTRUCT or DICOM-SEG must "
            "reference; use format=nifti",
        )
    mask, affine = sessions.mask_volume(view, "original")
    derivation = Derivation(
        session_version=view.version.version,
        clicks=len(view.version.clicks),
        weights_digest=str((view.record.source or {}).get("weights", "unknown")),
    )
    build = rtstruct if format == "rtstruct" else dicom_seg
    return build(mask.astype(bool), affine, source, derivation)


def dicom_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def export(sessions: Sessions, view: SessionView, format: DicomFormat) -> ExportOut:
    """Store the mask object on the configured PACS (STOW-RS)."""
    client = dicomweb.connect(pacs_settings(sessions.settings))
    dataset = mask_object(sessions, view, format)
    dicomweb.store(client, dataset)
    return ExportOut(
        format=format,
        sop_instance_uid=str(dataset.SOPInstanceUID),
        series_instance_uid=str(dataset.SeriesInstanceUID),
        study_instance_uid=str(dataset.StudyInstanceUID),
        version=view.version.version,
    )
