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

Clicks are the service's own :class:`service.store.contract.Click`.

:func:`no_op_click` places the evaluation's *no-op* click: a background click that
agrees with the current mask and with the truth, inside the body and far from both
(see its docstring for the rule).
"""

from __future__ import annotations

from enum import Enum

import numpy as np
from scipy import ndimage

from service.imaging.grid import CT_WINDOW_HU
from service.store.contract import Click

Voxel = tuple[int, int, int]

NO_OP_MIN_DISTANCE_MM = 30.0
BODY_MIN_HU = -180.0  # tissue (fat and denser), not air: the no-op click lands inside the body


class ClickRule(str, Enum):
    """How border distance inside the error region becomes a click probability."""

    DEEPGROW = "deepgrow"
    LINEAR = "linear"


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
) -> Click | None:
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
        return Click("foreground", _sample_in_error(missed, rng, ClickRule(rule)))
    return Click("background", _sample_in_error(spurious, rng, ClickRule(rule)))


def body_mask(ct_channel: np.ndarray) -> np.ndarray:
    """Voxels of the normalised CT channel (see :func:`service.imaging.grid.normalise_ct`) above ``BODY_MIN_HU``."""
    low, high = CT_WINDOW_HU
    return np.asarray(ct_channel) > (BODY_MIN_HU - low) * (2.0 / (high - low)) - 1.0


def no_op_click(
    mask: np.ndarray,
    truth: np.ndarray,
    body: np.ndarray,
    spacing_mm: float,
    min_distance_mm: float = NO_OP_MIN_DISTANCE_MM,
) -> Click | None:
    """A background click that should change nothing: None when no voxel qualifies.

    The rule: among the voxels inside ``body`` whose Euclidean distance to every voxel
    of the mask and of the truth is at least ``min_distance_mm``, the one nearest to
    them (the most demanding place the rule allows; ties go to the first voxel in C
    order). The click agrees with the mask (background there) and with the truth, so a
    segmenter that keeps what is right should leave the mask as it is.
    """
    occupied = _as_mask(mask) | _as_mask(truth)
    if occupied.any():
        distance = ndimage.distance_transform_edt(~occupied, sampling=spacing_mm)
    else:
        distance = np.full(occupied.shape, np.inf)
    allowed = np.asarray(body, dtype=bool) & (distance >= min_distance_mm)
    if not allowed.any():
        return None
    candidates = np.flatnonzero(allowed)
    index = int(candidates[np.argmin(distance.ravel()[candidates])])  # argmin: the first of equals
    voxel = np.unravel_index(index, occupied.shape)
    return Click("background", (int(voxel[0]), int(voxel[1]), int(voxel[2])))
