"""Simulated user clicks for interactive segmentation, as in DeepGrow/DeepEdit and 2S-ICR.

A simulated user looks at where the current prediction disagrees with the ground
truth and clicks inside the larger of the two error regions, preferring voxels deep
inside it. This follows MONAI's ``FindDiscrepancyRegionsd`` + ``AddRandomGuidanced``
(DeepGrow; reused by DeepEdit's ``AddRandomGuidanceDeepEditd``):

* false negatives (truth and not prediction) call for a *foreground* click, false
  positives (prediction and not truth) for a *background* click;
* the error type with more voxels is corrected (ties go to foreground) -- MONAI's
  choice is deterministic, not a coin weighted by region size;
* within that error mask, the chessboard distance to the region border ``d``
  (``scipy.ndimage.distance_transform_cdt``) weights the click location.

Two weightings are offered. ``DEEPGROW`` is MONAI's code: ``p ~ exp(d) - 1``.
``LINEAR`` is the 2S-ICR paper's wording (Methods, "Simulated interactions"):
distances normalised by their sum and used directly as multinomial probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

import numpy as np
from scipy import ndimage

ClickLabel = Literal["foreground", "background"]
Voxel = tuple[int, int, int]


class ClickRule(str, Enum):
    """How border distance inside the error region becomes a click probability."""

    DEEPGROW = "deepgrow"
    LINEAR = "linear"


@dataclass(frozen=True)
class SimulatedClick:
    """One corrective click: its kind and its voxel index in the volume it was simulated on."""

    label: ClickLabel
    voxel: Voxel


def _as_mask(volume: np.ndarray) -> np.ndarray:
    """Boolean view of a mask; non-boolean inputs are thresholded at 0.5 as MONAI does."""
    array = np.asarray(volume)
    return array if array.dtype == bool else array > 0.5


def _error_bounding_box(error: np.ndarray) -> tuple[slice, ...]:
    """The error's bounding box grown by one voxel (clipped to the volume).

    The added ring holds no error voxels, so every error voxel's nearest non-error voxel
    is inside the crop and the distance transform on the crop equals the full-volume one.
    """
    box = []
    for axis in range(error.ndim):
        others = tuple(a for a in range(error.ndim) if a != axis)
        hits = np.flatnonzero(error.any(axis=others))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, error.shape[axis])))
    return tuple(box)


def _click_weights(distances: np.ndarray, rule: ClickRule) -> np.ndarray:
    """Unnormalised click probabilities from border distances (all >= 1 inside an error region)."""
    distances = distances.astype(np.float64)
    if rule is ClickRule.LINEAR:
        return distances
    # exp(d) - 1 scaled by exp(-max d): same distribution as MONAI's, without overflow.
    deepest = distances.max()
    return np.exp(distances - deepest) - np.exp(-deepest)


def _sample_in_error(error: np.ndarray, rng: np.random.Generator, rule: ClickRule) -> Voxel:
    """Draw one voxel of a non-empty error mask, weighted by its depth inside the region."""
    box = _error_bounding_box(error)
    crop = error[box]
    flat_indices = np.flatnonzero(crop)
    distances = ndimage.distance_transform_cdt(crop).ravel()[flat_indices]
    weights = _click_weights(distances, rule)
    total = weights.sum()
    if not np.isfinite(total) or total <= 0:  # error fills the whole volume: no border to measure from
        weights, total = np.ones_like(weights), float(weights.size)
    chosen = flat_indices[rng.choice(flat_indices.size, p=weights / total)]
    local = np.unravel_index(chosen, crop.shape)
    return tuple(int(i + s.start) for i, s in zip(local, box))  # type: ignore[return-value]


def next_click(
    prediction: np.ndarray,
    truth: np.ndarray,
    rng: np.random.Generator,
    rule: ClickRule = ClickRule.DEEPGROW,
) -> SimulatedClick | None:
    """The simulated user's next click correcting ``prediction`` towards ``truth``; None if they agree."""
    predicted, actual = _as_mask(prediction), _as_mask(truth)
    if predicted.shape != actual.shape:
        raise ValueError(f"prediction {predicted.shape} and truth {actual.shape} differ in shape")
    missed = actual & ~predicted
    spurious = predicted & ~actual
    n_missed, n_spurious = int(missed.sum()), int(spurious.sum())
    if n_missed == 0 and n_spurious == 0:
        return None
    if n_missed >= n_spurious:
        return SimulatedClick("foreground", _sample_in_error(missed, rng, ClickRule(rule)))
    return SimulatedClick("background", _sample_in_error(spurious, rng, ClickRule(rule)))
