"""A binary DICOM-SEG (highdicom) of the GTVt mask on the source CT's frames."""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from service.dicom.derived import MANUFACTURER, PRODUCT, ROI_NAME, Derivation
from service.dicom.source import SeriesSource

# highdicom narrates at INFO which source instance it copies from: UIDs stay out of the logs.
logging.getLogger("highdicom").setLevel(logging.WARNING)


def segment_description(derivation: Derivation) -> hd.seg.SegmentDescription:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=PRODUCT, version=derivation.algorithm_version, family=codes.cid7162.ArtificialIntelligence
    )
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=ROI_NAME,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.NeoplasmPrimary,
        algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if derivation.interactive
                        else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC),
        algorithm_identification=algorithm,
        tracking_uid=generate_uid(),
        tracking_id=f"{ROI_NAME} session v{derivation.session_version}",
    )


def dicom_seg(mask: np.ndarray, affine_ras: np.ndarray, source: SeriesSource, derivation: Derivation) -> Dataset:
    """The SEG of ``mask`` (i, j, k on the source CT's grid), one frame per CT image it touches."""
    headers = source.image_headers((mask.shape[0], mask.shape[1], mask.shape[2]), affine_ras)
    frames = np.ascontiguousarray(np.asarray(mask, dtype=bool).transpose(2, 1, 0))  # (slice, row, column)
    segmentation = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(derivation)],
        series_instance_uid=generate_uid(),
        series_number=800 + derivation.session_version % 100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=PRODUCT,
        software_versions=derivation.software_versions,
        device_serial_number=derivation.algorithm_version,
        series_description=derivation.series_description,
        content_label=ROI_NAME.upper(),
        content_description=derivation.series_description[:64],
        omit_empty_frames=bool(frames.any()),
    )
    return segmentation
