"""RTSTRUCT and DICOM-SEG of a mask on the source CT: read back independently, validated by dciodvfy."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from skimage.draw import polygon

from service.dicom.derived import Derivation
from service.dicom.rtstruct import rtstruct
from service.dicom.seg import dicom_seg
from service.dicom.series import read_series
from service.dicom.source import SeriesSource
from service.imaging.volume import Volume
from tests.dicom.conftest import PATIENT_ID, PATIENT_NAME

DERIVATION = Derivation(session_version=3, clicks=2, weights_digest="0123456789abcdef0123")


def _shapes(shape: tuple[int, int, int]) -> np.ndarray:
    """Two islands, one with a hole, one touching the image border, over several slices."""
    mask = np.zeros(shape, dtype=bool)
    i, j = np.mgrid[: shape[0], : shape[1]]
    ring = (np.hypot(i - 20, j - 20) < 10) & ~(np.hypot(i - 20, j - 20) < 4)
    mask[:, :, 5:12] |= ring[:, :, None]
    mask[:6, 30:40, 8:10] = True
    mask[40, 2, 14] = True  # a single voxel
    return mask


@pytest.fixture(scope="module")
def ct_read(pair: dict[str, list[Dataset]]) -> tuple[Volume, SeriesSource]:
    return read_series(pair["ct"], role="ct", max_voxels=10**7)


def rasterise(structure: Dataset, ct: list[Dataset]) -> np.ndarray:
    """An independent reader: each contour filled by skimage's polygon in its referenced image, even-odd."""
    by_uid = {d.SOPInstanceUID: d for d in ct}
    order = sorted(ct, key=lambda d: float(d.ImagePositionPatient[2]))
    index = {d.SOPInstanceUID: k for k, d in enumerate(order)}
    mask = np.zeros((int(ct[0].Columns), int(ct[0].Rows), len(ct)), dtype=bool)
    for contour in structure.ROIContourSequence[0].ContourSequence:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        uid = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
        image = by_uid[uid]
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        origin = np.asarray(image.ImagePositionPatient, dtype=float)
        row_cosine = np.asarray(image.ImageOrientationPatient[:3], dtype=float)
        column_cosine = np.asarray(image.ImageOrientationPatient[3:], dtype=float)
        row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
        columns = (points - origin) @ row_cosine / column_spacing
        rows = (points - origin) @ column_cosine / row_spacing
        assert np.allclose((points - origin) @ np.cross(row_cosine, column_cosine), 0, atol=1e-3)  # in the plane
        filled = np.zeros(mask.shape[:2], dtype=bool)
        filled[polygon(columns, rows, shape=filled.shape)] = True
        mask[:, :, index[uid]] ^= filled
    return mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def test_rtstruct_rasterises_back_onto_the_ct(pair: dict[str, list[Dataset]], ct_read) -> None:
    volume, source = ct_read
    mask = _shapes(volume.shape)
    structure = pydicom.dcmread(io.BytesIO(_bytes(rtstruct(mask, volume.affine, source, DERIVATION))))
    back = rasterise(structure, pair["ct"])
    assert dice(back, mask) >= 0.95
    touched = set(np.flatnonzero(mask.any(axis=(0, 1))))
    assert set(np.flatnonzero(back.any(axis=(0, 1)))) == touched  # every slice of the mask has a contour
    assert back[20, 20, 8] == 0 and mask[20, 26, 8] and back[20, 26, 8]  # the hole stays a hole
    assert structure.StructureSetROISequence[0].ROIName == "GTVt"
    assert structure.RTROIObservationsSequence[0].RTROIInterpretedType == "GTV"
    frame = structure.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == pair["ct"][0].FrameOfReferenceUID
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == pair["ct"][0].StudyInstanceUID
    assert study.RTReferencedSeriesSequence[0].SeriesInstanceUID == pair["ct"][0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in study.RTReferencedSeriesSequence[0].ContourImageSequence} == {
        d.SOPInstanceUID for d in pair["ct"]}
    assert (structure.PatientName, structure.PatientID) == (PATIENT_NAME, PATIENT_ID)
    assert structure.StudyInstanceUID == pair["ct"][0].StudyInstanceUID
    assert structure.SeriesDescription == "2S-ICR GTVt session v3"


def test_seg_reads_back_exactly_with_highdicom(pair: dict[str, list[Dataset]], ct_read) -> None:
    volume, source = ct_read
    mask = _shapes(volume.shape)
    segmentation = hd.seg.segread(io.BytesIO(_bytes(dicom_seg(mask, volume.affine, source, DERIVATION))))
    uids = [d.SOPInstanceUID for d in sorted(pair["ct"], key=lambda d: float(d.ImagePositionPatient[2]))]
    frames = segmentation.get_pixels_by_source_instance(uids, segment_numbers=[1], ignore_spatial_locations=True)
    np.testing.assert_array_equal(frames[..., 0].transpose(2, 1, 0).astype(bool), mask)
    described = segmentation.get_segment_description(1)
    assert described.segment_label == "GTVt"
    assert described.segmented_property_type.value == "372087000"  # SNOMED CT: primary malignant neoplasm
    assert described.algorithm_identification[0].AlgorithmVersion == "0123456789abcdef"
    assert (segmentation.PatientName, segmentation.PatientID) == (PATIENT_NAME, PATIENT_ID)
    assert segmentation.FrameOfReferenceUID == pair["ct"][0].FrameOfReferenceUID
    assert segmentation.SeriesDescription == "2S-ICR GTVt session v3"


def _bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_dciodvfy_finds_no_errors(ct_read, tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed; .ci/setup.d/20-dicom.sh installs it")
    volume, source = ct_read
    mask = _shapes(volume.shape)
    for name, build in (("rtstruct", rtstruct), ("seg", dicom_seg)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(_bytes(build(mask, volume.affine, source, DERIVATION)))
        assert dciodvfy_errors(path) == [], name
