"""Create-session requests: a multipart upload (NIfTI, zips of DICOM series, DICOM files)
or a JSON body naming a study on the PACS, read into CT, PET, centre and DICOM source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.api.errors import InvalidCentreFrame, InvalidUpload
from service.api.schemas import DicomwebSessionIn
from service.api.sessions import parse_centre
from service.dicom.source import session_source
from service.imaging.frames import patient_to_world
from service.imaging.upload import UploadLimits, check_pair, read_upload
from service.imaging.volume import Volume
from service.settings import Settings

ROLES = ("ct", "pet")


@dataclass(frozen=True)
class UploadForm:
    parts: dict[str, list[bytes]]
    centre: np.ndarray | None  # world RAS mm


def upload_limits(settings: Settings) -> UploadLimits:
    return UploadLimits(
        max_part_bytes=int(settings.max_upload_mb * 2**20),
        max_image_bytes=int(settings.max_image_mb * 2**20),
        max_files=settings.max_dicom_files,
    )


def world_centre(world: np.ndarray | None, patient: np.ndarray | None) -> np.ndarray | None:
    """The region centre in world RAS mm, given in world (RAS) or DICOM patient (LPS) mm."""
    if world is not None and patient is not None:
        raise InvalidCentreFrame("give the centre in world mm or in patient mm, not both")
    return patient_to_world(patient) if patient is not None else world


async def read_form(request: Request, settings: Settings) -> UploadForm:
    """The parts of each role (one or more files) and the centre, from a multipart body."""
    form = await request.form(max_files=2 * settings.max_dicom_files + 2, max_fields=16)
    try:
        parts: dict[str, list[bytes]] = {}
        for role in ROLES:
            files = [item for item in form.getlist(role) if isinstance(item, UploadFile)]
            if not files:
                raise InvalidUpload(f"{role}: a file is required")
            parts[role] = [await item.read() for item in files]
        texts: dict[str, str | None] = {}
        for name in ("centre", "centre_patient_mm"):
            value = form.get(name)
            if value is not None and not isinstance(value, str):
                raise InvalidCentreFrame(f"{name} must be a form field, not a file")
            texts[name] = value
    finally:
        await form.close()
    centre = world_centre(parse_centre(texts["centre"]),
                          parse_centre(texts["centre_patient_mm"], "centre_patient_mm", "patient mm (LPS)"))
    return UploadForm(parts, centre)


def read_pacs_body(body: bytes) -> tuple[DicomwebSessionIn, np.ndarray | None]:
    try:
        request = DicomwebSessionIn.model_validate_json(body)
    except ValidationError as error:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()[:10])
        raise InvalidUpload(detail or "request body is not valid") from error
    centre = world_centre(
        None if request.centre is None else np.asarray(request.centre, dtype=np.float64),
        None if request.centre_patient_mm is None else np.asarray(request.centre_patient_mm, dtype=np.float64),
    )
    return request, centre


def read_images(
    ct_parts: list[bytes], pet_parts: list[bytes], settings: Settings
) -> tuple[Volume, Volume, dict[str, Any] | None]:
    """CT (HU) and PET (SUV), and the DICOM source a session keeps (None for NIfTI).

    Raises ImageError (422) or UploadTooLarge (413)."""
    limits = upload_limits(settings)
    ct, ct_series = read_upload(ct_parts, "ct", limits)
    pet, pet_series = read_upload(pet_parts, "pet", limits)
    check_pair(ct_series, pet_series)
    return ct, pet, session_source(ct_series, pet_series)
