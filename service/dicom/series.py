"""One uploaded DICOM series as a :class:`Volume` plus the :class:`SeriesSource` it came from.

Geometry comes from ImagePositionPatient / ImageOrientationPatient only: slices are
sorted along the slice normal, never by file name or InstanceNumber. The array is
laid out as nibabel gives a converted series, ``array[i, j, k]`` = column i, row j,
slice k, and the affine is DICOM's LPS one turned into world RAS explicitly.

Every refusal is an :class:`ImageError` naming the role and the problem (and the tag
when one is missing or contradictory), never header values: those may identify the
patient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from service.dicom.multiframe import read_multiframe
from service.dicom.source import IDENTITY_KEYWORDS, SeriesSource
from service.dicom.suv import suv_factor
from service.imaging.frames import affine_patient_to_world
from service.imaging.volume import ImageError, Volume

MODALITY_OF_ROLE = {"ct": "CT", "pet": "PT"}
IDENTIFYING_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
PLANE_KEYWORDS = ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient")
SPACING_RTOL = 0.01  # a slice gap may differ from the series' slice spacing by 1 %
DUPLICATE_POSITION_MM = 0.01  # slices closer than this along the normal occupy one position
ORIENTATION_ATOL = 1e-4  # direction cosines of all slices agree to this
STACKING_ATOL_MM = 0.1  # slice origins may stray this far from the line along the normal (else: tilt)
MIN_SLICES = 2


@dataclass(frozen=True)
class _Slice:
    dataset: Dataset
    position: np.ndarray  # ImagePositionPatient, LPS mm
    distance: float  # along the series normal


def read_series(datasets: Sequence[Dataset], *, role: str, max_voxels: int) -> tuple[Volume, SeriesSource]:
    """Check that ``datasets`` form one regular series of ``role`` and read it.

    ``max_voxels`` bounds what is decoded; CT comes back in HU, PET in SUVbw.
    """
    if not datasets:
        raise ImageError(f"{role}: no DICOM images")
    _check_not_mixed(datasets, role)
    for dataset in datasets:
        _require(dataset, IDENTIFYING_KEYWORDS, role)
    first = datasets[0]
    expected = MODALITY_OF_ROLE[role]
    if first.Modality != expected:
        raise ImageError(f"{role}: the series' Modality is {first.Modality!r}; {role} needs {expected}")
    if any(int(getattr(d, "NumberOfFrames", 1) or 1) != 1 for d in datasets):
        if len(datasets) != 1:
            raise ImageError(f"{role}: a multi-frame image must be uploaded on its own, not with other images")
        volume, sop_instance_uids = read_multiframe(first, role=role, max_voxels=max_voxels)
        return volume, series_source(first, sop_instance_uids, suv=None, multiframe=True, role=role)
    for dataset in datasets:
        _require(dataset, PLANE_KEYWORDS, role)
    _check_slices_unique(datasets, role)
    rows, columns = int(first.Rows), int(first.Columns)
    if len(datasets) * rows * columns > max_voxels:
        raise ImageError(f"{role}: the series holds {len(datasets) * rows * columns} voxels, over the limit of {max_voxels}")
    row_cosine, column_cosine, normal = _orientation(datasets, role)
    row_spacing, column_spacing = _pixel_spacing(datasets, role)
    slices = _sorted_slices(datasets, normal, role)
    spacing = _slice_spacing(slices, role)
    _check_stacking(slices, normal, role)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosine * column_spacing  # i: along a row, from column to column
    affine_lps[:3, 1] = column_cosine * row_spacing  # j: down a column, from row to row
    affine_lps[:3, 2] = normal * spacing
    affine_lps[:3, 3] = slices[0].position
    factor, suv = (1.0, None) if role == "ct" else suv_factor([s.dataset for s in slices], role=role)
    array = np.stack([_physical(s.dataset, role).T for s in slices], axis=-1)
    if factor != 1.0:
        array *= np.float32(factor)
    if not np.all(np.isfinite(array)):
        raise ImageError(f"{role}: the rescaled pixel values are not finite")
    source = series_source(first, tuple(str(s.dataset.SOPInstanceUID) for s in slices), suv=suv, multiframe=False,
                           role=role)
    return Volume(array=array, affine=affine_patient_to_world(affine_lps)), source


def series_source(first: Dataset, sop_instance_uids: tuple[str, ...], *, suv: dict[str, Any] | None,
                  multiframe: bool, role: str) -> SeriesSource:
    return SeriesSource(
        modality=str(first.Modality),
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(getattr(first, "FrameOfReferenceUID", "") or ""),  # some writers omit it
        sop_class_uid=str(first.SOPClassUID),
        sop_instance_uids=sop_instance_uids,
        identity=_identity(first),
        slice_thickness_mm=None if multiframe else _optional_float(first, "SliceThickness", role),
        suv=suv,
        multiframe=multiframe,
    )


def _require(dataset: Dataset, keywords: Sequence[str], role: str) -> None:
    for keyword in keywords:
        if keyword not in dataset or dataset[keyword].value in (None, "", b""):
            raise ImageError(f"{role}: a DICOM image lacks {keyword}")
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "DoubleFloatPixelData" not in dataset:
        raise ImageError(f"{role}: a DICOM object has no pixel data (PixelData); only images can be uploaded")


def _check_not_mixed(datasets: Sequence[Dataset], role: str) -> None:
    for keyword, what in (("PatientID", "patients"), ("StudyInstanceUID", "studies"), ("SeriesInstanceUID", "series"),
                          ("FrameOfReferenceUID", "frames of reference")):
        values = {str(getattr(d, keyword, "")) for d in datasets}
        if len(values) > 1:
            raise ImageError(f"{role}: the upload mixes {len(values)} {what} ({keyword}); upload one series per role")


def _check_slices_unique(datasets: Sequence[Dataset], role: str) -> None:
    uids = [str(d.SOPInstanceUID) for d in datasets]
    if len(set(uids)) != len(uids):
        raise ImageError(f"{role}: {len(uids) - len(set(uids))} duplicated slices (the same SOPInstanceUID twice)")
    shapes = {(int(d.Rows), int(d.Columns)) for d in datasets}
    if len(shapes) > 1:
        raise ImageError(f"{role}: slices of different sizes (Rows/Columns) in one series")


def _vector(dataset: Dataset, keyword: str, length: int, role: str) -> np.ndarray:
    try:
        values = np.asarray([float(v) for v in dataset[keyword].value], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ImageError(f"{role}: {keyword} is not numeric") from error
    if values.shape != (length,) or not np.all(np.isfinite(values)):
        raise ImageError(f"{role}: {keyword} must hold {length} finite numbers")
    return values


def _orientation(datasets: Sequence[Dataset], role: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    orientations = np.stack([_vector(d, "ImageOrientationPatient", 6, role) for d in datasets])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_ATOL:
        raise ImageError(f"{role}: slices of one series have different ImageOrientationPatient")
    row, column = orientations[0, :3], orientations[0, 3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3 or abs(row @ column) > 1e-3:
        raise ImageError(f"{role}: ImageOrientationPatient is not two orthogonal unit vectors")
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    return row, column, np.cross(row, column)


def _pixel_spacing(datasets: Sequence[Dataset], role: str) -> tuple[float, float]:
    spacings = np.stack([_vector(d, "PixelSpacing", 2, role) for d in datasets])
    if np.any(spacings <= 0):
        raise ImageError(f"{role}: PixelSpacing must be positive")
    if np.abs(spacings - spacings[0]).max() > 1e-4 * spacings[0].max():
        raise ImageError(f"{role}: slices of one series have different PixelSpacing")
    return float(spacings[0, 0]), float(spacings[0, 1])


def _sorted_slices(datasets: Sequence[Dataset], normal: np.ndarray, role: str) -> list[_Slice]:
    slices = []
    for dataset in datasets:
        position = _vector(dataset, "ImagePositionPatient", 3, role)
        slices.append(_Slice(dataset, position, float(position @ normal)))
    return sorted(slices, key=lambda s: s.distance)


def _slice_spacing(slices: Sequence[_Slice], role: str) -> float:
    if len(slices) < MIN_SLICES:
        raise ImageError(f"{role}: the series has {len(slices)} slice; a volume needs at least {MIN_SLICES}")
    gaps = np.diff([s.distance for s in slices])
    duplicated = int(np.count_nonzero(gaps < DUPLICATE_POSITION_MM))
    if duplicated:
        raise ImageError(f"{role}: {duplicated} duplicated slices (two images at one ImagePositionPatient)")
    spacing = float(np.median(gaps))
    off = np.abs(gaps - spacing) > SPACING_RTOL * spacing
    if not np.any(off):
        return float(gaps.mean())
    multiples = gaps[off] / spacing
    if np.all(np.abs(multiples - np.rint(multiples)) <= SPACING_RTOL * multiples) and np.all(multiples > 1.5):
        missing = int(np.rint(multiples).sum() - multiples.size)
        raise ImageError(f"{role}: {missing} missing slices (gaps of {spacing:.3g} mm spacing along the normal)")
    raise ImageError(
        f"{role}: inconsistent slice spacing ({gaps.min():.4g} to {gaps.max():.4g} mm along the normal; "
        f"the tolerance is {SPACING_RTOL:.0%})"
    )


def _check_stacking(slices: Sequence[_Slice], normal: np.ndarray, role: str) -> None:
    """Slice origins must lie on one line along the normal; a tilted gantry shears them."""
    offsets = np.stack([s.position - slices[0].position for s in slices])
    in_plane = offsets - np.outer(offsets @ normal, normal)
    if np.linalg.norm(in_plane, axis=1).max() > STACKING_ATOL_MM:
        raise ImageError(
            f"{role}: slices are not stacked along their normal (gantry tilt or a sheared series); "
            "resample it to an untilted series first"
        )


def _physical(dataset: Dataset, role: str) -> np.ndarray:
    """The slice's pixels in physical units (Modality LUT: RescaleSlope/Intercept)."""
    if role == "ct":
        _require_rescale(dataset, role)
    try:
        stored = dataset.pixel_array
    except Exception as error:  # pydicom raises many types for unsupported or broken pixel data
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        raise ImageError(f"{role}: pixel data cannot be decoded ({name})") from error
    if stored.shape != (int(dataset.Rows), int(dataset.Columns)):
        raise ImageError(f"{role}: pixel data is not one grey-scale frame of Rows x Columns")
    slope = _optional_float(dataset, "RescaleSlope", role)
    intercept = _optional_float(dataset, "RescaleIntercept", role)
    values = stored.astype(np.float32)
    if slope is not None and slope != 1.0:
        values *= np.float32(slope)
    if intercept:
        values += np.float32(intercept)
    return values


def _require_rescale(dataset: Dataset, role: str) -> None:
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if _optional_float(dataset, keyword, role) is None:
            raise ImageError(f"{role}: a CT image lacks {keyword}, so its values cannot be taken to HU")


def _optional_float(dataset: Dataset, keyword: str, role: str) -> float | None:
    value = getattr(dataset, keyword, None)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise ImageError(f"{role}: {keyword} is not a number") from error
    if not np.isfinite(number):
        raise ImageError(f"{role}: {keyword} is not finite")
    return number


def _identity(dataset: Dataset) -> dict[str, Any]:
    identity = Dataset()
    for keyword in IDENTITY_KEYWORDS:
        if keyword in dataset:
            identity[keyword] = dataset[keyword]
    return identity.to_json_dict()
