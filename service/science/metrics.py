"""Evaluation measures of the 2S-ICR paper: DSC, HD95, NoC/PoF and the significance test.

HD95 follows MONAI's ``compute_hausdorff_distance(percentile=95, directed=False)``
(surface = mask XOR its 6-connected erosion, exact Euclidean distances in mm, the
larger of the two directed 95th percentiles). The paper's Eq. 10-11 pools both
directed distance sets before taking one percentile; the reported numbers come from
MONAI, so MONAI's definition is the one implemented here.

Interaction measures (the paper has none; see :mod:`service.science.report`):
:func:`clicks_honoured` says which clicks have their label in a mask, :func:`local_dice`
is the DSC inside a ball around a click.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage, stats

from service.store.contract import Click

PAPER_DSC_THRESHOLDS = (0.75, 0.85)
PAPER_HD95_THRESHOLDS_MM = (5.0, 2.5)
PAPER_MAX_CLICKS = 20


def _as_mask(volume: np.ndarray) -> np.ndarray:
    array = np.asarray(volume)
    return array if array.dtype == bool else array > 0.5


def _paired_masks(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predicted, actual = _as_mask(pred), _as_mask(truth)
    if predicted.shape != actual.shape:
        raise ValueError(f"prediction {predicted.shape} and truth {actual.shape} differ in shape")
    return predicted, actual


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity coefficient 2|P & T| / (|P| + |T|); two empty masks agree perfectly (1.0)."""
    predicted, actual = _paired_masks(pred, truth)
    total = int(predicted.sum()) + int(actual.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(predicted, actual).sum()) / total


def clicks_honoured(mask: np.ndarray, clicks: Sequence[Click]) -> np.ndarray:
    """Per click, in order: does the mask give its voxel the click's label?"""
    predicted = _as_mask(mask)
    return np.array([bool(predicted[click.voxel]) == (click.label == "foreground") for click in clicks], dtype=bool)


def ball(shape: Sequence[int], centre: Sequence[int], radius_voxels: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """The ball of ``radius_voxels`` around ``centre``, clipped to the volume: (bounding box, mask inside the box)."""
    reach = int(np.floor(radius_voxels))
    box = tuple(slice(max(int(c) - reach, 0), min(int(c) + reach + 1, int(n))) for c, n in zip(centre, shape))
    axes = np.ogrid[box]
    squared = sum((axis - int(c)) ** 2 for axis, c in zip(axes, centre))
    return box, np.asarray(squared <= radius_voxels**2)


def local_dice(pred: np.ndarray, truth: np.ndarray, centre: Sequence[int], radius_voxels: float) -> float:
    """DSC of the two masks restricted to the ball around ``centre`` (both empty there: 1.0, as :func:`dice`)."""
    predicted, actual = _paired_masks(pred, truth)
    box, inside = ball(predicted.shape, centre, radius_voxels)
    return dice(predicted[box] & inside, actual[box] & inside)


def _surfaces_in_union_box(predicted: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surface voxels of both masks, cropped to their union's bounding box plus a one-voxel zero margin."""
    union = predicted | actual
    box = tuple(
        slice(int(hits[0]), int(hits[-1]) + 1)
        for hits in (np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
                     for axis in range(union.ndim))
    )
    surfaces = []
    for mask in (predicted, actual):
        padded = np.pad(mask[box], 1)
        surfaces.append(padded ^ ndimage.binary_erosion(padded))
    return surfaces[0], surfaces[1]


def _directed_surface_distances(source: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) from every ``source`` surface voxel to the nearest ``target`` surface voxel."""
    return ndimage.distance_transform_edt(~target, sampling=spacing)[source]


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
         percentile: float = 95.0) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (MONAI's definition, see module doc).

    Empty prediction or empty truth -> ``inf`` (no surface to measure to; MONAI gives inf too).
    Both empty -> 0.0, i.e. perfect agreement, consistent with ``dice`` == 1.0 (MONAI gives nan).
    """
    predicted, actual = _paired_masks(pred, truth)
    if len(spacing_mm) != predicted.ndim:
        raise ValueError(f"spacing {tuple(spacing_mm)} does not match a {predicted.ndim}-D mask")
    has_pred, has_truth = bool(predicted.any()), bool(actual.any())
    if not has_pred and not has_truth:
        return 0.0
    if not has_pred or not has_truth:
        return math.inf
    pred_surface, truth_surface = _surfaces_in_union_box(predicted, actual)
    spacing = [float(s) for s in spacing_mm]
    return float(max(
        np.percentile(_directed_surface_distances(pred_surface, truth_surface, spacing), percentile),
        np.percentile(_directed_surface_distances(truth_surface, pred_surface, spacing), percentile),
    ))


def _reaches(value: float, threshold: float, higher_is_better: bool) -> bool:
    if math.isnan(value):
        return False
    return value >= threshold if higher_is_better else value <= threshold


def number_of_clicks(curve: Sequence[float], threshold: float, higher_is_better: bool,
                     max_clicks: int = PAPER_MAX_CLICKS) -> int | None:
    """Clicks needed to reach ``threshold``: ``curve[k]`` is the metric after k clicks.

    Returns the first k in 0..max_clicks where DSC >= threshold (``higher_is_better``)
    or HD95 <= threshold; None when it is never reached (a failure).
    """
    for clicks, value in enumerate(curve[: max_clicks + 1]):
        if _reaches(float(value), threshold, higher_is_better):
            return clicks
    return None


def noc_summary(curves: Sequence[Sequence[float]], thresholds: Sequence[float], higher_is_better: bool,
                max_clicks: int = PAPER_MAX_CLICKS) -> dict[float, dict[str, float]]:
    """Mean/std NoC and PoF (%) per threshold over per-case metric-vs-clicks curves.

    A failure enters the NoC mean as ``max_clicks`` (the usual convention in interactive
    segmentation benchmarks, so that failing is never cheaper than succeeding late) and
    is counted in PoF, the percentage of cases that never reach the threshold.
    """
    if not curves:
        raise ValueError("noc_summary needs at least one curve")
    summary: dict[float, dict[str, float]] = {}
    for threshold in thresholds:
        reached = [number_of_clicks(curve, threshold, higher_is_better, max_clicks) for curve in curves]
        clicks = np.array([max_clicks if k is None else k for k in reached], dtype=np.float64)
        failures = sum(k is None for k in reached)
        summary[float(threshold)] = {
            "noc_mean": float(clicks.mean()),
            "noc_std": float(clicks.std()),
            "pof_percent": 100.0 * failures / len(curves),
            "failures": float(failures),
            "cases": float(len(curves)),
        }
    return summary


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (step-up, monotone, capped at 1), in input order."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] * p.size / np.arange(1, p.size + 1)
    adjusted_sorted = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    adjusted = np.empty_like(p)
    adjusted[order] = adjusted_sorted
    return adjusted


def _wilcoxon_p(reference: np.ndarray, other: np.ndarray) -> float:
    """Two-sided paired Wilcoxon signed-rank p-value; identical samples give p = 1."""
    differences = reference - other
    if np.all(differences == 0):
        return 1.0
    return float(stats.wilcoxon(reference, other, alternative="two-sided").pvalue)


def wilcoxon_bh(samples: Mapping[str, np.ndarray], reference: str,
                alpha: float = 0.05) -> dict[str, dict[str, float | bool]]:
    """Reference method vs each other method: paired two-sided Wilcoxon, BH-corrected over the comparisons.

    ``samples`` maps method name to per-case scores in the same case order. Returns, per
    other method, ``p_raw``, ``p_adjusted``, ``significant`` (p_adjusted < alpha) and
    ``median_difference`` (reference minus other).
    """
    if reference not in samples:
        raise KeyError(f"reference method {reference!r} not among {sorted(samples)}")
    base = np.asarray(samples[reference], dtype=np.float64)
    others = [name for name in samples if name != reference]
    raw = []
    for name in others:
        values = np.asarray(samples[name], dtype=np.float64)
        if values.shape != base.shape:
            raise ValueError(f"{name!r} has {values.shape} scores, {reference!r} has {base.shape}: not paired")
        if np.isnan(values).any() or np.isnan(base).any():
            raise ValueError("scores must not contain NaN")
        raw.append(_wilcoxon_p(base, values))
    adjusted = benjamini_hochberg(raw)
    return {
        name: {
            "p_raw": p,
            "p_adjusted": float(p_adj),
            "significant": bool(p_adj < alpha),
            "median_difference": float(np.median(base - np.asarray(samples[name], dtype=np.float64))),
        }
        for name, p, p_adj in zip(others, raw, adjusted)
    }
