"""What a session keeps of the DICOM series it was made from (JSON, no pixels).

An RTSTRUCT or DICOM-SEG must reference the source CT's instances and carry its
patient and study identity, so this is kept with the session. It holds identifying
data: it is returned in DICOM outputs only and never logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from service.imaging.frames import affine_world_to_patient

# The Patient and General Study modules' attributes a derived object copies, so that a
# planning system or PACS files it with the right patient and study.
IDENTITY_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)


@dataclass(frozen=True)
class SeriesSource:
    """One series as uploaded: its UIDs, its slices in geometric order and its identity."""

    modality: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str  # "" when the series has none
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]  # one per slice, along the slice normal (array axis k)
    identity: dict[str, Any]  # DICOM JSON of IDENTITY_KEYWORDS present in the series
    slice_thickness_mm: float | None = None
    suv: dict[str, Any] | None = field(default=None)  # PET: the factor and the tags it came from
    multiframe: bool = False  # one multi-frame image: sop_instance_uids repeats its UID per frame

    def to_dict(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "sop_class_uid": self.sop_class_uid,
            "sop_instance_uids": list(self.sop_instance_uids),
            "identity": self.identity,
            "slice_thickness_mm": self.slice_thickness_mm,
            "suv": self.suv,
            "multiframe": self.multiframe,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeriesSource:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**{**known, "sop_instance_uids": tuple(data["sop_instance_uids"])})

    def identity_dataset(self) -> Dataset:
        """The patient and study attributes, ready to copy into a derived object."""
        return Dataset.from_json(self.identity)

    def image_headers(self, shape: tuple[int, int, int], affine_ras: np.ndarray) -> list[Dataset]:
        """Pixel-less headers of the source slices, rebuilt from the stored geometry.

        They carry what highdicom reads from source images (identity, UIDs, plane
        geometry); ``shape``/``affine_ras`` are the volume this series was read into.
        """
        lps = affine_world_to_patient(affine_ras)
        row_step, column_step = lps[:3, 0], lps[:3, 1]
        column_spacing, row_spacing = float(np.linalg.norm(row_step)), float(np.linalg.norm(column_step))
        orientation = [*(row_step / column_spacing), *(column_step / row_spacing)]
        headers = []
        for k, sop_instance_uid in enumerate(self.sop_instance_uids):
            header = self.identity_dataset()
            header.Modality = self.modality
            header.SOPClassUID = self.sop_class_uid
            header.SOPInstanceUID = sop_instance_uid
            header.SeriesInstanceUID = self.series_instance_uid
            header.FrameOfReferenceUID = self.frame_of_reference_uid
            header.Rows, header.Columns = shape[1], shape[0]
            header.PixelSpacing = [round(row_spacing, 6), round(column_spacing, 6)]
            header.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
            header.ImagePositionPatient = [round(float(v), 6) for v in lps[:3, :3] @ [0, 0, k] + lps[:3, 3]]
            if self.slice_thickness_mm is not None:
                header.SliceThickness = self.slice_thickness_mm
            header.SamplesPerPixel = 1
            header.PhotometricInterpretation = "MONOCHROME2"
            header.BitsAllocated, header.BitsStored, header.HighBit = 16, 16, 15
            header.PixelRepresentation = 1
            headers.append(header)
        return headers


def session_source(ct: SeriesSource | None, pet: SeriesSource | None) -> dict[str, Any] | None:
    """What a session stores of its DICOM inputs (None for a NIfTI pair): the whole CT
    source, for the outputs that reference it, and the PET series with its SUV."""
    if ct is None and pet is None:
        return None
    pet_series = None
    if pet is not None:  # no output references the PET: its series and SUV are enough
        pet_series = {**pet.to_dict(), "sop_instance_uids": [], "identity": {}, "slices": len(pet.sop_instance_uids)}
    ct_series = None if ct is None else {**ct.to_dict(), "slices": len(ct.sop_instance_uids)}
    return {"ct": ct_series, "pet": pet_series}


def ct_source(source: dict[str, Any] | None) -> SeriesSource | None:
    """The stored CT series, when the session was made from one."""
    if source is None or source.get("ct") is None:
        return None
    return SeriesSource.from_dict(source["ct"])
