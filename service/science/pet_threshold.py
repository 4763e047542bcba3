"""``pet-threshold``: the classical 40 % of SUVmax baseline, with clicks, and no weights.

It works on SUV, not on the networks' z-scored PET: :func:`with_suv` gives a prepared
case whose PET channel is the SUV resampled onto the same working grid (channel 0, the
normalised CT, is unused).

The rules (every distance in mm on the working grid; regions are 26-connected and
have their enclosed cavities, such as necrotic cores, filled):

- **Region at a seed.** SUVmax is the highest SUV inside a ball of ``LOCAL_MAX_RADIUS_MM``
  around the seed point; the region is the connected part of SUV >= 40 % of that SUVmax
  that holds the hottest voxel (or the seed point itself where it is at or above the
  threshold), never reaching further than ``GROWTH_RADIUS_MM`` from the point, so a
  faint local maximum cannot flood the body.
- **Initial mask** (0 clicks): the region at the working grid's centre.
- **Foreground click**: the region at the click is added to the mask, and the clicked voxel.
- **Background click** on a masked voxel: the connected component of the mask that holds
  it is removed if it holds no foreground click so far and not the initial region's
  hottest voxel; otherwise a local cut removes the component's voxels within
  ``CUT_RADIUS_MM`` of the click that are nearer to it than to every foreground click
  (and the clicked voxel). A background click outside the mask changes nothing.

Clicks are replayed in order from the initial mask on every pass (the result does not
depend on the previous probability), and at the end every clicked voxel gets its
click's label (a later click at the same voxel wins).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from service.imaging.grid import resample
from service.imaging.nifti import load_nifti_file
from service.science.dataset import Case, PreparedCase
from service.science.metrics import ball
from service.store.contract import Click

METHOD = "pet-threshold"
THRESHOLD_FRACTION = 0.4
LOCAL_MAX_RADIUS_MM = 15.0
GROWTH_RADIUS_MM = 40.0
CUT_RADIUS_MM = 10.0
SUV_CHANNEL = 1
_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)

Voxel = tuple[int, int, int]


def with_suv(case: Case, prepared: PreparedCase) -> PreparedCase:
    """``prepared`` with its PET channel replaced by the SUV on the same working grid."""
    suv = resample(load_nifti_file(case.pet, role="pet"), prepared.grid, order=1, fill=0.0)
    images = prepared.images.copy()
    images[SUV_CHANNEL] = suv
    return PreparedCase(prepared.id, images, prepared.truth, prepared.grid)


def _hottest(suv: np.ndarray, centre: Sequence[int], radius_voxels: float) -> Voxel:
    box, inside = ball(suv.shape, centre, radius_voxels)
    local = np.where(inside, suv[box], -np.inf)
    index = np.unravel_index(int(np.argmax(local)), local.shape)
    return (int(index[0] + box[0].start), int(index[1] + box[1].start), int(index[2] + box[2].start))


def _component(mask: np.ndarray, voxel: Sequence[int]) -> np.ndarray:
    """The connected component of ``mask`` holding ``voxel`` (empty if the voxel is not in the mask)."""
    labels, _ = ndimage.label(mask, structure=_CONNECTIVITY)
    label = labels[tuple(voxel)]
    return (labels == label) if label else np.zeros_like(mask)


@dataclass(frozen=True)
class PetThreshold:
    """The 40 % SUVmax baseline on a working grid of ``spacing_mm`` (see the module doc)."""

    spacing_mm: float

    def _voxels(self, mm: float) -> float:
        return mm / self.spacing_mm

    def region(self, suv: np.ndarray, point: Sequence[int]) -> tuple[np.ndarray, Voxel]:
        """The thresholded region at ``point`` and the hottest voxel it was thresholded from."""
        hottest = _hottest(suv, point, self._voxels(LOCAL_MAX_RADIUS_MM))
        region = np.zeros(suv.shape, dtype=bool)
        suv_max = float(suv[hottest])
        if suv_max <= 0:
            return region, hottest
        threshold = THRESHOLD_FRACTION * suv_max
        seed = tuple(point) if suv[tuple(point)] >= threshold else hottest
        box, inside = ball(suv.shape, seed, self._voxels(GROWTH_RADIUS_MM))
        local_seed = tuple(int(s) - b.start for s, b in zip(seed, box))
        grown = _component((suv[box] >= threshold) & inside, local_seed)
        region[box] = ndimage.binary_fill_holes(grown)
        return region, hottest

    def _initial(self, suv: np.ndarray) -> tuple[np.ndarray, Voxel]:
        return self.region(suv, tuple(n // 2 for n in suv.shape))

    def initial_probability(self, images: np.ndarray) -> np.ndarray:
        return self._initial(images[SUV_CHANNEL])[0].astype(np.float32)

    def _cut(self, mask: np.ndarray, click: Click, component: np.ndarray, anchors: Sequence[Voxel],
             protected: bool) -> None:
        if not protected:
            mask &= ~component
            return
        box, inside = ball(mask.shape, click.voxel, self._voxels(CUT_RADIUS_MM))
        axes = np.ogrid[box]
        to_click = sum((axis - c) ** 2 for axis, c in zip(axes, click.voxel))
        nearer = np.asarray(inside)
        for anchor in anchors:
            nearer = nearer & (to_click < sum((axis - a) ** 2 for axis, a in zip(axes, anchor)))
        mask[box] &= ~(component[box] & nearer)

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray:
        suv = images[SUV_CHANNEL]
        mask, seed = self._initial(suv)
        foreground: list[Voxel] = []
        for click in clicks:
            if click.label == "foreground":
                mask |= self.region(suv, click.voxel)[0]
                foreground.append(click.voxel)
            elif mask[click.voxel]:
                component = _component(mask, click.voxel)
                protected = bool(component[seed]) or any(component[voxel] for voxel in foreground)
                self._cut(mask, click, component, foreground, protected)
            mask[click.voxel] = click.label == "foreground"
        for click in clicks:
            mask[click.voxel] = click.label == "foreground"
        return mask.astype(np.float32)
