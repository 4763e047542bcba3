"""One upload role's parts to a :class:`Volume`: a NIfTI file, a zip of a DICOM series, or its files.

The kind is told from the bytes (zip and DICOM Part 10 signatures), never from file
names. A DICOM upload also gives the :class:`SeriesSource` that DICOM outputs need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.dicom.files import FileLimits, is_dicom, is_zip, parse_dicom, unzip
from service.dicom.series import read_series
from service.dicom.source import SeriesSource
from service.imaging.nifti import read_nifti
from service.imaging.volume import ImageError, Volume

FLOAT32_BYTES = 4


class UploadTooLarge(ImageError):
    """One uploaded part is over the upload limit (HTTP 413 rather than 422)."""


@dataclass(frozen=True)
class UploadLimits:
    max_part_bytes: int  # one part, as uploaded
    max_image_bytes: int  # one role's image data once decompressed
    max_files: int  # DICOM files in one role's upload


def read_upload(parts: Sequence[bytes], role: str, limits: UploadLimits) -> tuple[Volume, SeriesSource | None]:
    """The role's image (CT in HU, PET in SUV) and, for DICOM, the series it came from."""
    if not parts:
        raise ImageError(f"{role}: no file was uploaded")
    for index, part in enumerate(parts):
        if len(part) > limits.max_part_bytes:
            raise UploadTooLarge(
                f"{role}: part {index + 1} is {len(part)} bytes, over the upload limit of {limits.max_part_bytes}"
            )
    if len(parts) > limits.max_files:
        raise ImageError(f"{role}: {len(parts)} files, over the limit of {limits.max_files}")
    file_limits = FileLimits(max_bytes=limits.max_image_bytes, max_files=limits.max_files)
    if len(parts) == 1 and is_zip(parts[0]):
        datasets = parse_dicom(unzip(parts[0], role=role, limits=file_limits), role=role, what="zip member")
    elif any(is_dicom(part) for part in parts):
        if sum(len(part) for part in parts) > limits.max_image_bytes:
            raise ImageError(f"{role}: the DICOM files hold more than the limit of {limits.max_image_bytes} bytes")
        datasets = parse_dicom(list(parts), role=role, what="part")
    elif len(parts) == 1:
        return read_nifti(parts[0], role=role, max_decompressed_bytes=limits.max_image_bytes), None
    else:
        raise ImageError(
            f"{role}: {len(parts)} parts that are not DICOM files; send one NIfTI file, one zip of a DICOM series, "
            "or the series' DICOM files as repeated parts"
        )
    return read_series(datasets, role=role, max_voxels=limits.max_image_bytes // FLOAT32_BYTES)


def check_pair(ct: SeriesSource | None, pet: SeriesSource | None) -> None:
    """CT and PET from DICOM must be one patient in one frame of reference (no registration is applied).

    Series without a FrameOfReferenceUID (some writers omit it) are taken as co-registered,
    as NIfTI uploads are."""
    if ct is None or pet is None:
        return
    if ct.identity.get("00100020") != pet.identity.get("00100020"):  # PatientID
        raise ImageError("ct and pet are of different patients (PatientID)")
    if ct.frame_of_reference_uid and pet.frame_of_reference_uid and (
        ct.frame_of_reference_uid != pet.frame_of_reference_uid
    ):
        raise ImageError(
            "ct and pet have different FrameOfReferenceUID and no registration was given; "
            "upload a co-registered PET/CT pair"
        )
