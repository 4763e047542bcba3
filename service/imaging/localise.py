"""Finding the primary head-and-neck tumour in a PET-CT when no centre is given.

The method (documented with its limits in docs/localisation.md):

1. CT and PET are resampled onto one coarse analysis grid (4 mm, axis-aligned with
   world RAS) over the region both images cover.
2. The anatomy is read from the CT: the body (HU > -400, holes filled slice by slice),
   its cross-section area along z (head, the narrow neck, the shoulders below it) and the
   pharyngeal airway (air inside the body, near the midline, above the shoulders).
3. The head-and-neck search band runs from the shoulders up to the top of the airway.
   Physiological uptake outside it (heart, liver, kidneys, bowel, bladder) never enters;
   the brain, the large hot region whose mass lies above the band, is removed where it
   reaches down into it.
4. Candidates are local maxima of the smoothed SUV inside the band; each is measured
   (peak SUV, volume and mean SUV of its 50 %-of-peak region, distance to the airway) and
   scored: uptake times size, times a prior that primary oropharyngeal tumours abut the
   airway while neck nodes lie lateral to it. An optional ``scorer`` (for example the
   initial ensemble's confidence in a window placed at the candidate) multiplies in.
5. The best candidate's centre is the answer, with every candidate's score and the reason.

Pure numpy/scipy: the engine passes a scorer callable rather than this module importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from service.imaging.grid import CT_FILL_HU, WorkingGrid, resample, world_box
from service.imaging.volume import ImageError, Volume

ANALYSIS_SPACING_MM = 4.0
BODY_HU = -400.0
AIR_HU = -400.0
HOT_SUV = 2.0  # a local maximum below this is background, not a candidate
BRAIN_SUV = 3.0
PEAK_FRACTION = 0.5  # a candidate's region: connected voxels above this fraction of its peak
SHOULDER_AREA_RATIO = 1.8  # the shoulders: the first slice below the neck this much wider
AIRWAY_MAX_OFFSET_MM = 40.0  # the airway is looked for this close to the body's midline
AIRWAY_CONTACT_MM = 12.0  # closer than this to the airway costs nothing
AIRWAY_DECAY_MM = 20.0
LEVEL_FREE_MM = 70.0  # the oropharynx lies within this depth below the airway's top
LEVEL_DECAY_MM = 60.0
MAX_CANDIDATES = 12
COVER_MARGIN = 0.3  # a window "covers" a candidate within (1 - this) of its half-edge
COVERED_CANDIDATES = 6
CONTENDER_RATIO = 0.4

Scorer = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class Candidate:
    """One PET hotspot in the search band, as measured and scored."""

    centre_mm: tuple[float, float, float]
    peak_suv: float
    volume_ml: float
    mean_suv: float
    airway_distance_mm: float | None
    depth_below_airway_top_mm: float | None
    uptake_score: float
    position_score: float
    ensemble_score: float | None
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class SearchBand:
    """The head-and-neck band along world z where candidates are looked for."""

    low_z_mm: float
    high_z_mm: float
    neck_z_mm: float | None
    shoulder_z_mm: float | None
    airway_top_z_mm: float | None
    brain_bottom_z_mm: float | None
    excluded: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Localisation:
    """Where the working window goes, and why."""

    centre_mm: tuple[float, float, float]
    reason: str
    band: SearchBand
    candidates: tuple[Candidate, ...]  # best first
    covered: tuple[int, ...] = ()  # indices into candidates that the window was placed to hold

    def to_dict(self) -> dict[str, Any]:
        return {"centre_mm": list(self.centre_mm), "reason": self.reason, "band": self.band.to_dict(),
                "candidates": [c.to_dict() for c in self.candidates], "covered": list(self.covered)}


@dataclass(frozen=True)
class _Anatomy:
    """What the CT tells about the patient, on the analysis grid."""

    body: np.ndarray  # bool, filled
    airway_centres: dict[int, tuple[float, float]]  # z index -> world (x, y) of the airway
    neck_index: int | None
    shoulder_index: int | None
    airway_top_index: int | None


def analysis_grid(ct: Volume, pet: Volume, spacing_mm: float = ANALYSIS_SPACING_MM) -> WorkingGrid:
    """An axis-aligned grid over the world box both images cover."""
    ct_low, ct_high = world_box(ct)
    pet_low, pet_high = world_box(pet)
    low, high = np.maximum(ct_low, pet_low), np.minimum(ct_high, pet_high)
    if np.any(high <= low):
        raise ImageError("ct and pet do not overlap")
    shape = tuple(int(n) for n in np.floor((high - low) / spacing_mm).astype(int) + 1)
    return WorkingGrid(shape=shape, spacing_mm=spacing_mm, origin_mm=tuple(low))  # type: ignore[arg-type]


def _z_mm(grid: WorkingGrid, index: float) -> float:
    return float(grid.origin_mm[2] + grid.spacing_mm * index)


def _read_anatomy(hu: np.ndarray, grid: WorkingGrid) -> _Anatomy:
    slice_fill = np.zeros((3, 3, 3), dtype=bool)
    slice_fill[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    body = ndimage.binary_fill_holes(hu > BODY_HU, structure=slice_fill)
    labels, count = ndimage.label(body)
    if count > 1:  # the patient, not the couch or a stray blob
        sizes = ndimage.sum_labels(body, labels, index=np.arange(1, count + 1))
        body = labels == (int(np.argmax(sizes)) + 1)
    voxel_area = grid.spacing_mm**2
    area = ndimage.uniform_filter1d(body.sum(axis=(0, 1)).astype(np.float64) * voxel_area, size=3)
    occupied = np.flatnonzero(area > 2000.0)
    if occupied.size == 0:
        return _Anatomy(body, {}, None, None, None)
    top = int(occupied[-1])
    head_reach = max(1, round(150.0 / grid.spacing_mm))
    head = top - head_reach + int(np.argmax(area[max(0, top - head_reach): top + 1]))
    head = max(head, top - head_reach)
    neck_reach = round(250.0 / grid.spacing_mm)
    below_head = area[max(0, head - neck_reach): head + 1]
    neck = max(0, head - neck_reach) + int(np.argmin(below_head))
    wider = np.flatnonzero(area[: neck + 1] > SHOULDER_AREA_RATIO * area[neck])
    shoulder = int(wider[-1]) if wider.size else None
    airway_centres: dict[int, tuple[float, float]] = {}
    low = shoulder if shoulder is not None else 0
    axes = [grid.origin_mm[a] + grid.spacing_mm * np.arange(grid.shape[a]) for a in (0, 1)]
    for k in range(low, top + 1):
        inside = body[:, :, k]
        if not inside.any():
            continue
        ii, jj = np.nonzero(inside)
        mid_x, mid_y = axes[0][ii].mean(), axes[1][jj].mean()
        air = inside & (hu[:, :, k] < AIR_HU)
        ai, aj = np.nonzero(air)
        near = np.hypot(axes[0][ai] - mid_x, axes[1][aj] - mid_y) <= AIRWAY_MAX_OFFSET_MM
        if np.count_nonzero(near) >= 2:
            airway_centres[k] = (float(axes[0][ai[near]].mean()), float(axes[1][aj[near]].mean()))
    airway_top = _airway_top(airway_centres, neck)
    return _Anatomy(body, airway_centres, neck, shoulder, airway_top)


def _airway_top(airway_centres: dict[int, tuple[float, float]], neck: int) -> int | None:
    """The top of the air column that runs through the neck (the nasopharynx), if there is one."""
    if neck not in airway_centres:
        near = [k for k in airway_centres if abs(k - neck) <= 3]
        if not near:
            return max(airway_centres) if airway_centres else None
        neck = near[0]
    top = neck
    while top + 1 in airway_centres or top + 2 in airway_centres:
        top += 1 if top + 1 in airway_centres else 2
    return top


def _brain(suv: np.ndarray, body: np.ndarray, band_top: int) -> np.ndarray | None:
    """Hot regions whose mass lies above the band (the brain); None when there is none."""
    hot, count = ndimage.label((suv > BRAIN_SUV) & body)
    if count == 0:
        return None
    z_centroids = np.asarray(ndimage.center_of_mass(hot > 0, hot, index=np.arange(1, count + 1)))[:, 2]
    above = np.flatnonzero(z_centroids > band_top) + 1
    reaching = [label for label in above if np.any(hot[:, :, : band_top + 1] == label)]
    if not reaching:
        return None
    return np.isin(hot, reaching)


def _position_score(airway_distance: float | None, depth: float | None) -> float:
    score = 1.0
    if airway_distance is not None:
        score *= math.exp(-max(0.0, airway_distance - AIRWAY_CONTACT_MM) / AIRWAY_DECAY_MM)
    if depth is not None:
        score *= math.exp(-max(0.0, depth - LEVEL_FREE_MM) / LEVEL_DECAY_MM)
    return score


def _nearest_airway(anatomy: _Anatomy, k: int) -> tuple[float, float] | None:
    if not anatomy.airway_centres:
        return None
    nearest = min(anatomy.airway_centres, key=lambda level: abs(level - k))
    return anatomy.airway_centres[nearest]


def _candidates(suv: np.ndarray, search: np.ndarray, grid: WorkingGrid, anatomy: _Anatomy,
                scorer: Scorer | None) -> list[Candidate]:
    masked = np.where(search, suv, 0.0)
    peaks = (masked == ndimage.maximum_filter(masked, size=5)) & (masked > HOT_SUV)
    order = np.argsort(masked[peaks])[::-1]
    positions = np.argwhere(peaks)[order]
    voxel_ml = grid.spacing_mm**3 / 1000.0
    taken = np.zeros(suv.shape, dtype=bool)
    found: list[Candidate] = []
    for peak_index in positions:
        if len(found) == MAX_CANDIDATES:
            break
        index = tuple(int(v) for v in peak_index)
        if taken[index]:
            continue  # a secondary maximum of a region already measured
        peak = float(suv[index])
        regions, _ = ndimage.label((suv >= PEAK_FRACTION * peak) & search)
        region = regions == regions[index]
        taken |= region
        volume = float(region.sum() * voxel_ml)
        mean = float(suv[region].mean())
        centre = grid.voxel_to_world(np.asarray(ndimage.center_of_mass(region)))
        airway = _nearest_airway(anatomy, index[2])
        distance = None if airway is None else float(np.hypot(centre[0] - airway[0], centre[1] - airway[1]))
        depth = None
        if anatomy.airway_top_index is not None:
            depth = _z_mm(grid, anatomy.airway_top_index) - float(centre[2])
        uptake = mean * math.sqrt(peak) * max(volume, 0.5) ** (1.0 / 3.0)
        position = _position_score(distance, depth)
        ensemble = None if scorer is None else float(scorer(centre))
        score = uptake * position * (1.0 if ensemble is None else ensemble)
        found.append(Candidate(centre_mm=tuple(round(float(v), 1) for v in centre),  # type: ignore[arg-type]
                               peak_suv=round(peak, 2), volume_ml=round(volume, 2), mean_suv=round(mean, 2),
                               airway_distance_mm=None if distance is None else round(distance, 1),
                               depth_below_airway_top_mm=None if depth is None else round(depth, 1),
                               uptake_score=round(uptake, 3), position_score=round(position, 3),
                               ensemble_score=ensemble, score=score))
    return sorted(found, key=lambda c: c.score, reverse=True)


def _band(grid: WorkingGrid, anatomy: _Anatomy, suv: np.ndarray) -> tuple[SearchBand, np.ndarray]:
    """The band (and the voxels in it where candidates may lie)."""
    nz = grid.shape[2]
    low = anatomy.shoulder_index if anatomy.shoulder_index is not None else 0
    excluded = []
    if anatomy.shoulder_index is not None:
        excluded.append("below the shoulders (heart, liver, kidneys, bowel, bladder)")
    top = nz - 1
    if anatomy.airway_top_index is not None:
        top = min(nz - 1, anatomy.airway_top_index + round(15.0 / grid.spacing_mm))
        excluded.append("above the airway's top (brain)")
    search = anatomy.body.copy()
    search[:, :, :low] = False
    search[:, :, top + 1:] = False
    brain = _brain(suv, anatomy.body, top)
    brain_bottom = None
    if brain is not None:
        search &= ~ndimage.binary_dilation(brain, iterations=2)
        brain_bottom = _z_mm(grid, float(np.flatnonzero(brain.any(axis=(0, 1)))[0]))
        excluded.append("the brain")
    band = SearchBand(
        low_z_mm=round(_z_mm(grid, low), 1), high_z_mm=round(_z_mm(grid, top), 1),
        neck_z_mm=None if anatomy.neck_index is None else round(_z_mm(grid, anatomy.neck_index), 1),
        shoulder_z_mm=None if anatomy.shoulder_index is None else round(_z_mm(grid, anatomy.shoulder_index), 1),
        airway_top_z_mm=None if anatomy.airway_top_index is None else round(_z_mm(grid, anatomy.airway_top_index), 1),
        brain_bottom_z_mm=None if brain_bottom is None else round(brain_bottom, 1),
        excluded=tuple(excluded),
    )
    return band, search


def _placement(candidates: list[Candidate], window_mm: float | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """The window centre: on the best candidate; or, given the window's edge, when the best
    lies away from the airway (node-like) and a contender nearer the airway (primary-like)
    scores at least CONTENDER_RATIO of it and fits one window with it, midway between the two."""
    best = np.asarray(candidates[0].centre_mm, dtype=np.float64)
    if window_mm is None:
        return best, (0,)
    reach = window_mm / 2 * (1.0 - COVER_MARGIN)
    for index, contender in enumerate(candidates[1:COVERED_CANDIDATES], start=1):
        if contender.score < CONTENDER_RATIO * candidates[0].score:
            break  # sorted by score: no later one qualifies
        if contender.position_score <= candidates[0].position_score:
            continue
        other = np.asarray(contender.centre_mm, dtype=np.float64)
        if np.any(np.abs(other - best) > 2 * reach):
            continue
        return (best + other) / 2, (0, index)
    return best, (0,)


def localise_tumour(ct: Volume, pet: Volume, *, scorer: Scorer | None = None, window_mm: float | None = None,
                    spacing_mm: float = ANALYSIS_SPACING_MM) -> Localisation:
    """The likely centre (world RAS mm) of the primary tumour, with the candidates and the reason.

    ``scorer(centre_mm) -> float`` (>= 0), when given, multiplies each candidate's score:
    the engine can pass the initial ensemble's confidence in a window placed there.
    ``window_mm``, the working window's edge, lets the centre move off the best candidate
    so that one window holds it and other strong candidates near it.
    """
    grid = analysis_grid(ct, pet, spacing_mm)
    hu = resample(ct, grid, order=1, fill=CT_FILL_HU)
    suv = ndimage.gaussian_filter(resample(pet, grid, order=1, fill=0.0), sigma=1.0)
    anatomy = _read_anatomy(hu, grid)
    band, search = _band(grid, anatomy, suv)
    candidates = _candidates(suv, search, grid, anatomy, scorer)
    if candidates:
        best = candidates[0]
        point, covered = _placement(candidates, window_mm)
        reason = (f"highest-scoring of {len(candidates)} PET hotspot(s) in the head-and-neck band "
                  f"z {band.low_z_mm:.0f} to {band.high_z_mm:.0f} mm: peak SUV {best.peak_suv:.1f}, "
                  f"{best.volume_ml:.1f} ml")
        if best.airway_distance_mm is not None:
            reason += f", {best.airway_distance_mm:.0f} mm from the airway"
        if len(covered) > 1 or covered[0] != 0:
            reason += f"; window placed to hold candidates {', '.join(str(i + 1) for i in covered)}"
        if band.excluded:
            reason += f"; excluded: {', '.join(band.excluded)}"
        centre = tuple(round(float(v), 1) for v in point)
        return Localisation(centre, reason, band, tuple(candidates), covered)  # type: ignore[arg-type]
    fallback = _fallback_centre(grid, anatomy, band)
    return Localisation(fallback, "no PET hotspot above SUV "
                        f"{HOT_SUV:.1f} in the head-and-neck band; window placed on the airway at the band's middle",
                        band, ())


def _fallback_centre(grid: WorkingGrid, anatomy: _Anatomy, band: SearchBand) -> tuple[float, float, float]:
    z_index = round(((band.low_z_mm + band.high_z_mm) / 2 - grid.origin_mm[2]) / grid.spacing_mm)
    airway = _nearest_airway(anatomy, z_index)
    if airway is None:
        middle = grid.voxel_to_world((np.asarray(grid.shape) - 1) / 2.0)
        airway = (float(middle[0]), float(middle[1]))
    return (round(airway[0], 1), round(airway[1], 1), round(_z_mm(grid, z_index), 1))
