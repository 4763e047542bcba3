"""In-memory 3D images placed in world space."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


class ImageError(ValueError):
    """An image (upload or file) is unusable.

    ``str()`` names the problem and the role ('ct'/'pet'); it never carries header
    text or file names, so it is safe to show to the person who uploaded the image.
    """


@dataclass(frozen=True)
class Volume:
    """A 3D image in physical units with its voxel-to-world (RAS mm, as nibabel reads it) affine."""

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        array = np.asarray(self.array, dtype=np.float32)
        affine = np.asarray(self.affine, dtype=np.float64)
        if array.ndim != 3:
            raise ValueError(f"a Volume needs a 3D array, got {array.ndim}D")
        if affine.shape != (4, 4):
            raise ValueError(f"a Volume needs a 4x4 affine, got {affine.shape}")
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel counts along the array axes."""
        i, j, k = self.array.shape
        return int(i), int(j), int(k)

    def world_corners(self) -> np.ndarray:
        """World coordinates (8, 3) of the centres of the eight corner voxels."""
        last = [n - 1 for n in self.shape]
        corners = np.array(list(itertools.product(*[(0, m) for m in last])), dtype=np.float64)
        return corners @ self.affine[:3, :3].T + self.affine[:3, 3]

    def half_voxel_extent(self) -> np.ndarray:
        """World-axis half-widths (3,) of one voxel's bounding box, so a box of voxel
        centres can be grown to cover the voxels themselves."""
        return 0.5 * np.abs(self.affine[:3, :3]).sum(axis=1)
