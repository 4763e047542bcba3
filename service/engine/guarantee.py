"""The click guarantee: every click so far keeps its label, whatever the networks output.

After each pass the probability at every clicked working-grid voxel is set to 1
(foreground click) or 0 (background click) before it is thresholded and stored, so the
returned mask gives each clicked voxel its label and the next pass's memory starts from
what the user said. Where two clicks name the same voxel, the later one wins.

The mechanism is a ball of ``HONOUR_RADIUS_MM`` around each click, where the nearest click
gives each voxel its label; the radius is 0, the clicked voxel alone. A 3 mm ball (at least
1.75 voxels) was measured first: on the 12 held-out phantoms it lowered the DSC after 10
clicks from 0.880 (the model alone) to 0.855, because a ball around a click in a thin error
region also overwrites the correct voxels beside it; the clicked voxel alone gave 0.879
(``docs/results/interaction-f877027dc36d.md``).

The clicked point need not be the working-grid voxel's centre, and the uploaded CT's voxels
are finer, so the mask resampled onto the CT might not keep the label at the clicked point:
the mask on the CT's grid also gives each clicked CT voxel (the one holding the clicked
point) its click's label, a later click winning the same voxel (:func:`honour_clicked_voxels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from service.store.contract import Click

HONOUR_RADIUS_MM = 0.0


def honour_radius_voxels(spacing_mm: float) -> float:
    return HONOUR_RADIUS_MM / spacing_mm


def honour_rule() -> str:
    """Where the guarantee sets each click's label, in words (reports and help texts)."""
    return "at the clicked voxel" if HONOUR_RADIUS_MM == 0 else f"in a ball of {HONOUR_RADIUS_MM:g} mm around each click"


def honour_clicks(probability: np.ndarray, clicks: Sequence[Click], radius_voxels: float) -> np.ndarray:
    """A copy of ``probability`` with every click's ball of ``radius_voxels`` (0: its voxel) set to its label
    (see the module doc)."""
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
