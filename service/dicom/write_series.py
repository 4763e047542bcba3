"""Volumes written as DICOM CT and PET series (the phantoms' DICOM form, and test data).

CT is stored as signed 16-bit with RescaleIntercept -1024 (HU = stored - 1024); PET as
Bq/ml in BQML with a per-slice RescaleSlope, decay-corrected to the series start, with
the injected dose, half-life, injection time and patient weight chosen so that the
header's SUVbw factor turns the values back into the SUV the volume holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)

from service import __version__
from service.imaging.frames import affine_world_to_patient
from service.imaging.volume import ImageError, Volume

CT_INTERCEPT = -1024.0
F18_HALF_LIFE_S = 6586.2
PET_STORED_MAX = 32767
MANUFACTURER = "2S-ICR"


@dataclass(frozen=True)
class Subject:
    """Patient, study and PET acquisition facts shared by a case's series."""

    patient_name: str = "Phantom^Case"
    patient_id: str = "PHANTOM-0"
    study_instance_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    study_datetime: datetime = datetime(2024, 1, 15, 9, 30, 0)
    weight_kg: float = 75.0
    injected_dose_bq: float = 350e6
    half_life_s: float = F18_HALF_LIFE_S
    uptake_s: float = 3600.0  # injection to the PET series start

    @property
    def injection(self) -> datetime:
        return self.study_datetime - timedelta(seconds=self.uptake_s)

    def suv_factor(self) -> float:
        """SUVbw per Bq/ml, as QIBA computes it from the headers written here."""
        decayed = self.injected_dose_bq * math.pow(2.0, -self.uptake_s / self.half_life_s)
        return self.weight_kg * 1000.0 / decayed


def ct_series(volume: Volume, subject: Subject, *, series_number: int = 1) -> list[Dataset]:
    """The CT volume (HU) as CT Image Storage slices, one per array slice k."""
    stored = np.clip(np.rint(volume.array - CT_INTERCEPT), -32768, 32767).astype(np.int16)
    slices = _slices(volume, subject, CTImageStorage, "CT", series_number, "CT from 2S-ICR phantom")
    for k, dataset in enumerate(slices):
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        dataset.KVP = 120
        dataset.AcquisitionNumber = 1
        dataset.PatientPosition = "HFS"
        dataset.RescaleIntercept = CT_INTERCEPT
        dataset.RescaleSlope = 1
        dataset.RescaleType = "HU"
        dataset.PixelRepresentation = 1
        _pixels(dataset, stored[:, :, k])
    return slices


def pet_series(volume: Volume, subject: Subject, *, series_number: int = 2) -> list[Dataset]:
    """The PET volume (SUVbw) as PET Image Storage slices in Bq/ml (BQML, DecayCorrection START)."""
    bq_ml = np.asarray(volume.array, dtype=np.float64) / subject.suv_factor()
    slices = _slices(volume, subject, PositronEmissionTomographyImageStorage, "PT", series_number,
                     "PET from 2S-ICR phantom")
    for k, dataset in enumerate(slices):
        plane = bq_ml[:, :, k]
        slope = max(float(np.abs(plane).max()) / PET_STORED_MAX, 1e-6)
        dataset.ImageType = ["ORIGINAL", "PRIMARY"]
        dataset.SeriesType = ["STATIC", "IMAGE"]
        dataset.Units = "BQML"
        dataset.CountsSource = "EMISSION"
        dataset.DecayCorrection = "START"
        dataset.CorrectedImage = ["ATTN", "DECY", "SCAT", "RAN"]
        dataset.RandomsCorrectionMethod = "DLYD"
        dataset.AttenuationCorrectionMethod = "CT"
        dataset.ReconstructionMethod = "OSEM"
        dataset.DecayFactor = 1.0
        dataset.FrameReferenceTime = 0
        dataset.ActualFrameDuration = 180000
        dataset.NumberOfSlices = len(slices)
        dataset.ImageIndex = k + 1
        dataset.PatientWeight = subject.weight_kg
        dataset.RadiopharmaceuticalInformationSequence = DicomSequence([_radiopharmaceutical(subject)])
        dataset.CollimatorType = "NONE"
        dataset.PatientOrientationCodeSequence = DicomSequence()
        dataset.PatientGantryRelationshipCodeSequence = DicomSequence()
        dataset.RescaleIntercept = 0
        dataset.RescaleSlope = f"{slope:.10g}"[:16]
        dataset.PixelRepresentation = 1  # signed: reconstructed PET can dip below zero
        stored = np.clip(np.rint(plane / float(dataset.RescaleSlope)), -32768, 32767).astype(np.int16)
        _pixels(dataset, stored)
    return slices


def write_phantom(directory: Path, case_id: str, ct: Volume, pet: Volume, gtvt: np.ndarray) -> Path:
    """One phantom case in DICOM under ``directory/<case_id>/``: ``ct/`` and ``pt/`` series and its
    ground truth as ``gtvt-rtstruct.dcm`` and ``gtvt-seg.dcm``. UIDs derive from the case id."""
    from service.dicom.derived import Derivation
    from service.dicom.rtstruct import rtstruct
    from service.dicom.seg import dicom_seg
    from service.dicom.series import read_series

    subject = Subject(
        patient_name=f"Phantom^{case_id}", patient_id=case_id,
        study_instance_uid=generate_uid(entropy_srcs=[case_id, "study"]),
        frame_of_reference_uid=generate_uid(entropy_srcs=[case_id, "frame"]),
    )
    out = directory / case_id
    ct_slices = ct_series(ct, subject)
    write_series(ct_slices, out / "ct")
    write_series(pet_series(pet, subject), out / "pt")
    volume, source = read_series(ct_slices, role="ct", max_voxels=ct.array.size)
    truth = Derivation(session_version=0, clicks=0, weights_digest="phantom-generator", origin="phantom truth")
    mask = np.asarray(gtvt) > 0.5
    rtstruct(mask, volume.affine, source, truth).save_as(out / "gtvt-rtstruct.dcm", enforce_file_format=True)
    dicom_seg(mask, volume.affine, source, truth).save_as(out / "gtvt-seg.dcm", enforce_file_format=True)
    return out


def write_series(datasets: Sequence[Dataset], directory: Path) -> list[Path]:
    """Write each slice as ``<n>.dcm`` (Part 10) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, dataset in enumerate(datasets, start=1):
        path = directory / f"{number:04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _radiopharmaceutical(subject: Subject) -> Dataset:
    item = Dataset()
    item.Radiopharmaceutical = "Fluorodeoxyglucose"
    item.RadiopharmaceuticalStartTime = subject.injection.strftime("%H%M%S")
    item.RadiopharmaceuticalStartDateTime = subject.injection.strftime("%Y%m%d%H%M%S")
    item.RadionuclideTotalDose = f"{subject.injected_dose_bq:.6g}"
    item.RadionuclideHalfLife = f"{subject.half_life_s:.6g}"
    item.RadionuclidePositronFraction = 0.97
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "77004003", "SCT", "^18^Fluorine"
    item.RadionuclideCodeSequence = DicomSequence([code])
    return item


def _slices(volume: Volume, subject: Subject, sop_class: UID, modality: str, series_number: int,
            description: str) -> list[Dataset]:
    lps = affine_world_to_patient(volume.affine)
    column_spacing, row_spacing, slice_spacing = (float(np.linalg.norm(lps[:3, a])) for a in range(3))
    orientation = [*(lps[:3, 0] / column_spacing), *(lps[:3, 1] / row_spacing)]
    normal = np.cross(lps[:3, 0], lps[:3, 1])
    if float(normal @ lps[:3, 2]) <= 0:
        raise ImageError(f"{modality}: the slice axis must follow the row x column normal to be written as DICOM")
    series_uid = generate_uid(entropy_srcs=[subject.study_instance_uid, modality, str(series_number)])
    day, clock = subject.study_datetime.strftime("%Y%m%d"), subject.study_datetime.strftime("%H%M%S")
    columns, rows, depth = volume.shape
    slices = []
    for k in range(depth):
        dataset = Dataset()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.MediaStorageSOPClassUID = sop_class
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.SpecificCharacterSet = "ISO_IR 100"
        dataset.SOPClassUID = sop_class
        dataset.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.PatientName, dataset.PatientID = subject.patient_name, subject.patient_id
        dataset.PatientBirthDate, dataset.PatientSex = "", "O"
        dataset.StudyInstanceUID, dataset.StudyID = subject.study_instance_uid, "1"
        dataset.StudyDate, dataset.StudyTime = day, clock
        dataset.ReferringPhysicianName, dataset.AccessionNumber = "", ""
        dataset.Modality, dataset.SeriesInstanceUID, dataset.SeriesNumber = modality, series_uid, series_number
        dataset.SeriesDate, dataset.SeriesTime = day, clock
        dataset.AcquisitionDate, dataset.AcquisitionTime = day, clock
        dataset.ContentDate, dataset.ContentTime = day, clock
        dataset.SeriesDescription = description
        dataset.Manufacturer = MANUFACTURER
        dataset.SoftwareVersions = __version__
        dataset.FrameOfReferenceUID = subject.frame_of_reference_uid
        dataset.PositionReferenceIndicator = ""
        dataset.BodyPartExamined = "HEADNECK"
        dataset.InstanceNumber = k + 1
        dataset.ImageOrientationPatient = [f"{v:.8g}" for v in orientation]
        position = lps[:3, :3] @ [0, 0, k] + lps[:3, 3]
        dataset.ImagePositionPatient = [f"{v:.10g}"[:16] for v in position]
        dataset.SliceLocation = f"{float(position @ normal / np.linalg.norm(normal)):.10g}"[:16]
        dataset.PixelSpacing = [f"{row_spacing:.10g}"[:16], f"{column_spacing:.10g}"[:16]]
        dataset.SliceThickness = f"{slice_spacing:.10g}"[:16]
        dataset.Rows, dataset.Columns = rows, columns
        slices.append(dataset)
    return slices


def _pixels(dataset: Dataset, plane: np.ndarray) -> None:
    """``plane`` is (columns, rows) as the volume holds it; DICOM stores rows first."""
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.PixelData = np.ascontiguousarray(plane.T).tobytes()
