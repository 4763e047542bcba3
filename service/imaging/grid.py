"""The network's working grid, and moving images onto and off it by their affines.

Images are always related through world (RAS mm) coordinates, never through array
shapes or indices: CT and PET arrive with different spacings, orientations and
fields of view, and the working grid is a third, isotropic, axis-aligned frame.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from service.imaging.volume import ImageError, Volume

CT_FILL_HU = -1024.0  # air outside the CT field of view
CT_WINDOW_HU = (-200.0, 200.0)  # soft-tissue window the network was trained on


@dataclass(frozen=True)
class WorkingGrid:
    """The network's grid: isotropic spacing, axis-aligned with world RAS axes, `shape` voxels, voxel (0,0,0) at `origin_mm`."""

    shape: tuple[int, int, int]
    spacing_mm: float
    origin_mm: tuple[float, float, float]

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        origin = tuple(float(x) for x in self.origin_mm)
        spacing = float(self.spacing_mm)
        if len(shape) != 3 or any(n <= 0 for n in shape):
            raise ValueError(f"grid shape must be three positive sizes, got {self.shape!r}")
        if not (math.isfinite(spacing) and spacing > 0):
            raise ValueError(f"grid spacing must be positive, got {self.spacing_mm!r}")
        if len(origin) != 3 or not all(math.isfinite(x) for x in origin):
            raise ValueError(f"grid origin must be three finite coordinates, got {self.origin_mm!r}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing_mm", spacing)
        object.__setattr__(self, "origin_mm", origin)

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-world 4x4 affine: diag(spacing) plus the origin."""
        affine = np.diag([self.spacing_mm] * 3 + [1.0])
        affine[:3, 3] = self.origin_mm
        return affine

    @classmethod
    def around(
        cls, centre_mm: npt.ArrayLike, shape: Sequence[int], spacing_mm: float
    ) -> WorkingGrid:
        """A grid whose continuous voxel index (n-1)/2 on each axis lies at ``centre_mm``."""
        centre = np.asarray(centre_mm, dtype=np.float64).reshape(3)
        half_extent = spacing_mm * (np.asarray(shape, dtype=np.float64) - 1) / 2
        origin = centre - half_extent
        depth, height, width = shape
        return cls(shape=(depth, height, width), spacing_mm=spacing_mm, origin_mm=tuple(origin))

    def world_to_voxel(self, points_mm: npt.ArrayLike) -> np.ndarray:
        """Continuous voxel indices of world points; (3,) or (N, 3) in, same shape out."""
        points = np.asarray(points_mm, dtype=np.float64)
        return (points - np.asarray(self.origin_mm)) / self.spacing_mm

    def voxel_to_world(self, voxels: npt.ArrayLike) -> np.ndarray:
        """World points of (continuous) voxel indices; (3,) or (N, 3) in, same shape out."""
        indices = np.asarray(voxels, dtype=np.float64)
        return indices * self.spacing_mm + np.asarray(self.origin_mm)

    def window(self, offset: Sequence[int], shape: Sequence[int] | None = None) -> WorkingGrid:
        """The grid of ``shape`` (default: this one's) whose voxel (0, 0, 0) is this grid's voxel ``offset``:
        a working window on the lattice this grid's voxels span, extended without end."""
        i, j, k = (int(n) for n in (self.shape if shape is None else shape))
        x, y, z = (float(v) for v in self.voxel_to_world(np.asarray(offset, dtype=np.float64)))
        return WorkingGrid(shape=(i, j, k), spacing_mm=self.spacing_mm, origin_mm=(x, y, z))

    def contains_voxel(self, voxel: npt.ArrayLike) -> bool:
        """Whether an integer voxel index lies inside the grid, i.e. 0 <= v < n on every axis."""
        index = np.asarray(voxel, dtype=np.float64).reshape(-1)
        if index.shape != (3,):
            return False
        return bool(np.all(index >= 0) and np.all(index <= np.asarray(self.shape) - 1))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description, the inverse of :meth:`from_dict`."""
        return {
            "shape": list(self.shape),
            "spacing_mm": self.spacing_mm,
            "origin_mm": list(self.origin_mm),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorkingGrid:
        """Rebuild a grid saved with :meth:`to_dict`; raises ValueError when malformed."""
        try:
            return cls(
                shape=tuple(d["shape"]),
                spacing_mm=d["spacing_mm"],
                origin_mm=tuple(d["origin_mm"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a working grid description: {exc}") from exc


def overlap_centre(ct: Volume, pet: Volume) -> np.ndarray:
    """Centre (3,) of the overlap of the two images' world bounding boxes.

    This is where a default working grid goes, so the network sees both modalities.
    """
    ct_low, ct_high = world_box(ct)
    pet_low, pet_high = world_box(pet)
    low = np.maximum(ct_low, pet_low)
    high = np.minimum(ct_high, pet_high)
    if np.any(high <= low):
        raise ImageError("ct and pet do not overlap")
    return (low + high) / 2


def describe_box(low: np.ndarray, high: np.ndarray) -> str:
    return ", ".join(f"{axis} {a:.1f} to {b:.1f}" for axis, a, b in zip("xyz", low, high)) + " mm (RAS)"


def check_centre(centre_mm: np.ndarray, ct: Volume, pet: Volume, grid: WorkingGrid) -> None:
    """A centre must lie inside the CT, and its working grid must reach into the PET.

    Raises ImageError naming the CT's extent, so a centre in the wrong frame (for
    example DICOM's LPS taken for RAS) is refused instead of segmenting air."""
    ct_low, ct_high = world_box(ct)
    if np.any(centre_mm < ct_low) or np.any(centre_mm > ct_high):
        raise ImageError(
            f"centre {[round(float(v), 1) for v in centre_mm]} lies outside the CT, which spans "
            f"{describe_box(ct_low, ct_high)}"
        )
    pet_low, pet_high = world_box(pet)
    grid_low = np.asarray(grid.origin_mm)
    grid_high = grid_low + grid.spacing_mm * (np.asarray(grid.shape) - 1)
    if np.any(grid_high < pet_low) or np.any(grid_low > pet_high):
        raise ImageError(
            f"the working window around centre {[round(float(v), 1) for v in centre_mm]} holds no PET data; "
            f"the PET spans {describe_box(pet_low, pet_high)}"
        )


def lattice_extent(volume: Volume, lattice: WorkingGrid) -> tuple[np.ndarray, np.ndarray]:
    """The lattice voxels (low, high; inclusive, int) whose centres lie inside ``volume``'s world box."""
    low, high = world_box(volume)
    first = np.ceil(lattice.world_to_voxel(low) - 1e-6).astype(int)
    last = np.floor(lattice.world_to_voxel(high) + 1e-6).astype(int)
    return first, np.maximum(last, first)


def resample(volume: Volume, grid: WorkingGrid, *, order: int = 1, fill: float = 0.0) -> np.ndarray:
    """Sample ``volume`` at every working-grid voxel centre, matched by world position.

    Grid points outside the image get ``fill``. Returns float32 of ``grid.shape``.
    With linear (or nearest) interpolation only the block of the image the grid covers
    is read, so a window costs the same in a whole-body scan as in a small crop.
    """
    source, affine = volume.array, volume.affine
    if order <= 1:
        block = _covered_block(grid, volume.shape, volume.affine)
        if block is None:
            return np.full(grid.shape, fill, dtype=np.float32)
        start, stop = block
        source = source[tuple(slice(a, b) for a, b in zip(start, stop))]
        affine = _shifted(affine, start)
    return _pull(source, source_affine=affine, target_shape=grid.shape, target_affine=grid.affine, order=order, fill=fill)


def _shifted(affine: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The affine of a block of an image whose first voxel is ``start``."""
    moved = np.array(affine, dtype=np.float64, copy=True)
    moved[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return moved


def normalise_ct(hu: np.ndarray) -> np.ndarray:
    """Clip to the soft-tissue window [-200, 200] HU and scale linearly to [-1, 1]."""
    low, high = CT_WINDOW_HU
    clipped = np.clip(np.asarray(hu, dtype=np.float32), low, high)
    return ((clipped - low) * (2.0 / (high - low)) - 1.0).astype(np.float32, copy=False)


def normalise_pet(suv: np.ndarray) -> np.ndarray:
    """Z-score over the given array; a constant array maps to zeros."""
    values = np.asarray(suv, dtype=np.float32)
    mean = float(values.mean(dtype=np.float64))
    std = float(values.std(dtype=np.float64))
    if not (math.isfinite(std) and std > 0):
        return np.zeros_like(values)
    return ((values - mean) / std).astype(np.float32, copy=False)


def preprocess(ct: Volume, pet: Volume, grid: WorkingGrid) -> np.ndarray:
    """The network input (2, *grid.shape) float32: normalised CT then normalised PET."""
    ct_channel = normalise_ct(resample(ct, grid, fill=CT_FILL_HU))
    pet_channel = normalise_pet(resample(pet, grid, fill=0.0))
    return np.stack([ct_channel, pet_channel]).astype(np.float32, copy=False)


def to_volume_grid(
    pieces: Sequence[tuple[np.ndarray, WorkingGrid]],
    shape: Sequence[int],
    affine: npt.ArrayLike,
) -> np.ndarray:
    """Map working-grid arrays (``(array, grid)`` pieces, e.g. a session's windows) onto another
    image grid (e.g. the uploaded CT's).

    Trilinear, matched by world position; a later piece replaces an earlier one where it
    reaches (between its voxel centres); target voxels no piece reaches are 0. Only the
    block of the target each piece covers is interpolated, since a working window is
    usually far smaller than a whole-body CT.
    """
    target_shape = tuple(int(n) for n in shape)
    target_affine = np.asarray(affine, dtype=np.float64)
    result = np.zeros(target_shape, dtype=np.float32)
    for array, grid in pieces:
        values = np.asarray(array, dtype=np.float32)
        if values.shape != grid.shape:
            raise ValueError(f"array shape {values.shape} does not match the grid {grid.shape}")
        block = _covered_block(grid, target_shape, target_affine)
        if block is None:
            continue
        start, stop = block
        where = tuple(slice(a, b) for a, b in zip(start, stop))
        pulled = _pull(values, source_affine=grid.affine, target_shape=tuple(int(n) for n in stop - start),
                       target_affine=_shifted(target_affine, start), order=1, fill=np.nan)
        reached = ~np.isnan(pulled)
        result[where][reached] = pulled[reached]
    return result


def _pull(
    source: np.ndarray,
    *,
    source_affine: np.ndarray,
    target_shape: tuple[int, ...],
    target_affine: np.ndarray,
    order: int,
    fill: float,
) -> np.ndarray:
    """For each target voxel, go to world and then to a source voxel, and interpolate there."""
    target_to_source = np.linalg.inv(source_affine) @ target_affine
    return ndimage.affine_transform(
        np.asarray(source, dtype=np.float32),
        target_to_source[:3, :3],
        offset=target_to_source[:3, 3],
        output_shape=target_shape,
        output=np.float32,
        order=order,
        mode="constant",
        cval=fill,
    )


def world_box(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world box (low, high) around all voxels of a volume."""
    corners = volume.world_corners()
    half_voxel = volume.half_voxel_extent()
    return corners.min(axis=0) - half_voxel, corners.max(axis=0) + half_voxel


def _covered_block(
    grid: WorkingGrid, target_shape: tuple[int, ...], target_affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Index range [start, stop) of target voxels that can receive non-zero values.

    Interpolation only yields values between working-grid voxel centres, so the
    grid's corner centres, taken into target indices, bound the block (plus one
    voxel of margin for rounding).
    """
    last = np.asarray(grid.shape, dtype=np.float64) - 1
    corners = np.array(np.meshgrid(*[[0.0, m] for m in last], indexing="ij")).reshape(3, -1).T
    world_to_target = np.linalg.inv(target_affine)
    target = grid.voxel_to_world(corners) @ world_to_target[:3, :3].T + world_to_target[:3, 3]
    start = np.maximum(np.floor(target.min(axis=0)).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(target.max(axis=0)).astype(int) + 2, np.asarray(target_shape))
    if np.any(stop <= start):
        return None
    return start, stop
