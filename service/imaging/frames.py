"""World (RAS mm, as nibabel reads a NIfTI affine) and DICOM patient (LPS mm) coordinates.

The two frames differ only in the sign of x and y; every conversion in the service
goes through this module so the sign convention is written down once.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
_FLIP = RAS_FROM_LPS.diagonal()[:3]


def patient_to_world(points_mm: npt.ArrayLike) -> np.ndarray:
    """DICOM patient coordinates (LPS) to world RAS; (3,) or (N, 3) in, same shape out."""
    return np.asarray(points_mm, dtype=np.float64) * _FLIP


def world_to_patient(points_mm: npt.ArrayLike) -> np.ndarray:
    """World RAS to DICOM patient coordinates (LPS); (3,) or (N, 3) in, same shape out."""
    return np.asarray(points_mm, dtype=np.float64) * _FLIP


def affine_patient_to_world(affine_lps: npt.ArrayLike) -> np.ndarray:
    """A voxel-to-LPS affine as the voxel-to-RAS affine of the same image (and back)."""
    return RAS_FROM_LPS @ np.asarray(affine_lps, dtype=np.float64)


affine_world_to_patient = affine_patient_to_world
