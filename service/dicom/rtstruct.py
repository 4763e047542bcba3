"""An RT Structure Set with one ROI, ``GTVt``, from a mask on the source CT's grid.

Each CT slice the mask touches gets CLOSED_PLANAR contours traced by scikit-image's
marching squares at the 0.5 level between voxel centres: every island gives an outer
contour, every hole an inner one. Planning systems fill the contours of one slice by
the even-odd rule, so an inner contour cuts its hole out. Built from pydicom datasets;
no RTSTRUCT library is maintained well enough to depend on.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid
from skimage import measure

from service.dicom.derived import MANUFACTURER, PRODUCT, ROI_NAME, Derivation
from service.dicom.source import SeriesSource
from service.imaging.frames import affine_world_to_patient

STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, as RTReferencedStudySequence names the study
GTV_COLOUR = (255, 0, 0)
CONTOUR_LEVEL = 0.5


def slice_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed contours (M, 2) in (i, j) voxel indices around the True pixels of one slice."""
    padded = np.pad(np.asarray(plane, dtype=np.float32), 1)  # contours close at the image border too
    contours = []
    for contour in measure.find_contours(padded, CONTOUR_LEVEL):
        points = contour[:-1] - 1.0  # find_contours repeats the first point to close a loop
        if len(points) >= 3:
            contours.append(points)
    return contours


def rtstruct(mask: np.ndarray, affine_ras: np.ndarray, source: SeriesSource, derivation: Derivation) -> Dataset:
    """The RTSTRUCT of ``mask`` (i, j, k on the source CT's grid) referencing ``source``."""
    if mask.shape[2] != len(source.sop_instance_uids):
        raise ValueError("the mask does not have one slice per source CT image")
    lps = affine_world_to_patient(affine_ras)
    now = datetime.now()
    dataset = _header(source, derivation, now)
    dataset.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(source)])
    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = source.frame_of_reference_uid
    roi.ROIName = ROI_NAME
    roi.ROIGenerationAlgorithm = "SEMIAUTOMATIC" if derivation.interactive else "AUTOMATIC"
    roi.ROIGenerationDescription = f"{PRODUCT} weights {derivation.algorithm_version}"
    dataset.StructureSetROISequence = DicomSequence([roi])
    contours = Dataset()
    contours.ReferencedROINumber = 1
    contours.ROIDisplayColor = list(GTV_COLOUR)
    contours.ContourSequence = DicomSequence(_contours(mask, lps, source))
    dataset.ROIContourSequence = DicomSequence([contours])
    observation = Dataset()
    observation.ObservationNumber = 1
    observation.ReferencedROINumber = 1
    observation.RTROIInterpretedType = "GTV"
    observation.ROIInterpreter = ""
    dataset.RTROIObservationsSequence = DicomSequence([observation])
    return dataset


def _header(source: SeriesSource, derivation: Derivation, now: datetime) -> Dataset:
    dataset = source.identity_dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = RTStructureSetStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.InstanceCreationDate, dataset.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    dataset.Modality = "RTSTRUCT"
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SeriesNumber = 900 + derivation.session_version % 100
    dataset.SeriesDescription = derivation.series_description
    dataset.OperatorsName = ""
    dataset.Manufacturer = MANUFACTURER
    dataset.ManufacturerModelName = PRODUCT
    dataset.SoftwareVersions = derivation.software_versions
    dataset.InstanceNumber = 1
    dataset.FrameOfReferenceUID = source.frame_of_reference_uid
    dataset.PositionReferenceIndicator = ""
    dataset.StructureSetLabel = ROI_NAME
    dataset.StructureSetName = derivation.series_description[:64]
    dataset.StructureSetDate, dataset.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword in ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
                    "PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        if keyword not in dataset:
            setattr(dataset, keyword, "")  # type 2: present, empty when the source had none
    return dataset


def _referenced_frame(source: SeriesSource) -> Dataset:
    images = []
    for sop_instance_uid in source.sop_instance_uids:
        image = Dataset()
        image.ReferencedSOPClassUID = source.sop_class_uid
        image.ReferencedSOPInstanceUID = sop_instance_uid
        images.append(image)
    series = Dataset()
    series.SeriesInstanceUID = source.series_instance_uid
    series.ContourImageSequence = DicomSequence(images)
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_COMPONENT_SOP_CLASS
    study.ReferencedSOPInstanceUID = source.study_instance_uid
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = source.frame_of_reference_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _contours(mask: np.ndarray, lps: np.ndarray, source: SeriesSource) -> list[Dataset]:
    items: list[Dataset] = []
    for k in np.flatnonzero(mask.reshape(-1, mask.shape[2]).any(axis=0)):
        for points in slice_contours(mask[:, :, k]):
            voxels = np.column_stack([points, np.full(len(points), float(k))])
            patient = voxels @ lps[:3, :3].T + lps[:3, 3]
            image = Dataset()
            image.ReferencedSOPClassUID = source.sop_class_uid
            image.ReferencedSOPInstanceUID = source.sop_instance_uids[int(k)]
            contour = Dataset()
            contour.ContourImageSequence = DicomSequence([image])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(patient)
            contour.ContourNumber = len(items) + 1
            contour.ContourData = [f"{v:.4f}" for v in patient.reshape(-1)]
            items.append(contour)
    return items
