"""The click guarantee: every click so far keeps its label, whatever the networks output.

After each pass the probability inside a small ball around every click is set to
1 (foreground click) or 0 (background click) before it is thresholded and stored, so
the returned mask gives each clicked voxel its label and the next pass's memory
starts from what the user said. Where the balls of clicks with opposite labels
overlap, each voxel takes the label of the nearest click (a later click wins a
tie), so two nearby clicks are both honoured unless they name the same voxel, where
the later one wins.

The ball's radius is ``HONOUR_RADIUS_MM`` and never less than ``MIN_RADIUS_VOXELS``
(sqrt(3) voxels and a little), so all eight working-grid voxels around the clicked
point are set and the mask resampled onto the uploaded CT keeps the label there too.
Where two clicks of opposite labels lie closer than a working-grid voxel, the CT's finer
voxels between them cannot take both labels from the resampled probability; so the mask
on the CT's grid also gives each clicked CT voxel (the one holding the clicked point) its
click's label, a later click winning the same voxel (:func:`honour_clicked_voxels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from service.store.contract import Click

HONOUR_RADIUS_MM = 3.0
MIN_RADIUS_VOXELS = 1.75


def honour_radius_voxels(spacing_mm: float, radius_mm: float = HONOUR_RADIUS_MM) -> float:
    return max(radius_mm / spacing_mm, MIN_RADIUS_VOXELS)


def honour_clicks(probability: np.ndarray, clicks: Sequence[Click], radius_voxels: float) -> np.ndarray:
    """A copy of ``probability`` with every click's ball set to its label (see the module doc)."""
    result = np.array(probability, dtype=np.float32, copy=True)
    if not clicks:
        return result
    nearest = np.full(result.shape, np.inf, dtype=np.float32)
    reach = int(np.ceil(radius_voxels))
    for click in clicks:
        centre = np.asarray(click.voxel, dtype=np.int64)
        low = np.maximum(centre - reach, 0)
        high = np.minimum(centre + reach + 1, result.shape)
        if np.any(high <= low):
            continue
        box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
        axes = np.ogrid[box]
        distance = np.sqrt(sum((axis - c).astype(np.float32) ** 2 for axis, c in zip(axes, centre)))
        closer = (distance <= radius_voxels) & (distance <= nearest[box])
        nearest[box] = np.where(closer, distance, nearest[box])
        result[box] = np.where(closer, 1.0 if click.label == "foreground" else 0.0, result[box])
    return result


def honour_clicked_voxels(mask: np.ndarray, points: Sequence[tuple[str, npt.ArrayLike]], affine: np.ndarray) -> None:
    """Give each voxel of ``mask`` (on the image grid of ``affine``) that holds a clicked world point
    (``(label, point_mm)``, in click order) the click's label, in place."""
    to_index = np.linalg.inv(affine)
    for label, point in points:
        index = np.rint(to_index[:3, :3] @ np.asarray(point, dtype=np.float64) + to_index[:3, 3]).astype(int)
        if np.all(index >= 0) and np.all(index < mask.shape):
            mask[tuple(index)] = label == "foreground"
