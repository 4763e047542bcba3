"""A multi-frame (enhanced, or legacy-converted enhanced) CT image as a :class:`Volume`, by highdicom.

highdicom reads the per-frame functional groups (plane positions, orientation, pixel
measures, rescale) and refuses frames that are not one regular volume. Only CT: an
enhanced PET keeps its SUV inputs in functional groups this service does not read.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from service.imaging.frames import affine_patient_to_world
from service.imaging.volume import ImageError, Volume

logging.getLogger("highdicom").setLevel(logging.WARNING)  # it narrates UIDs at INFO


def read_multiframe(dataset: Dataset, *, role: str, max_voxels: int) -> tuple[Volume, tuple[str, ...]]:
    """The volume (HU) and the image's SOP Instance UID once per slice."""
    if role != "ct":
        raise ImageError(f"{role}: multi-frame (enhanced) PET is not supported; upload the PET as single-frame images")
    for keyword in ("NumberOfFrames", "Rows", "Columns"):
        if keyword not in dataset:
            raise ImageError(f"{role}: the multi-frame image lacks {keyword}")
    voxels = int(dataset.NumberOfFrames) * int(dataset.Rows) * int(dataset.Columns)
    if voxels > max_voxels:
        raise ImageError(f"{role}: the image holds {voxels} voxels, over the limit of {max_voxels}")
    try:
        volume = hd.Image.from_dataset(dataset, copy=False).get_volume(dtype=np.float32, apply_modality_transform=True)
    except Exception as error:  # highdicom raises ValueError/RuntimeError/AttributeError on irregular frames
        raise ImageError(
            f"{role}: the multi-frame image's frames are not one regular volume (missing, duplicated or unevenly "
            "spaced planes, or tilt)"
        ) from error
    if volume.array.ndim != 3:
        raise ImageError(f"{role}: the multi-frame image is not one grey-scale volume")
    # highdicom indexes (slice, row, column); ours is (column, row, slice) with the slice axis along
    # the row x column normal, as the single-frame reader lays it out.
    array = np.ascontiguousarray(volume.array.transpose(2, 1, 0), dtype=np.float32)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = volume.affine[:3, 2], volume.affine[:3, 1], volume.affine[:3, 0]
    lps[:3, 3] = volume.affine[:3, 3]
    if float(np.cross(lps[:3, 0], lps[:3, 1]) @ lps[:3, 2]) < 0:
        array = np.ascontiguousarray(array[:, :, ::-1])
        lps[:3, 3] = lps[:3, 3] + lps[:3, 2] * (array.shape[2] - 1)
        lps[:3, 2] = -lps[:3, 2]
    if not np.all(np.isfinite(array)):
        raise ImageError(f"{role}: the rescaled pixel values are not finite")
    return Volume(array=array, affine=affine_patient_to_world(lps)), (str(dataset.SOPInstanceUID),) * array.shape[2]
