"""The error-driven simulated user of :mod:`service.science.simulator`, over HTTP.

An answer's ``mask`` lies on its ``window`` (whole-scan sessions move the window with the
clicks, docs/whole-scan.md); the user compares it with the ground truth resampled onto
that window and clicks into the larger error, sending the click as a session-lattice
``voxel`` (the window's ``offset`` plus the voxel in the window).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.imaging.grid import WorkingGrid, resample
from service.imaging.volume import Volume
from service.science.simulator import next_click
from service.store.codec import decode_mask

ClickKey = tuple[str, tuple[int, int, int]]


@dataclass
class SimulatedUser:
    gtvt: Volume  # the ground truth, 0/1, on its own grid
    _truths: dict[tuple[float, ...], np.ndarray] = field(default_factory=dict)

    def truth_on(self, window: dict[str, Any]) -> np.ndarray:
        grid = WorkingGrid(tuple(window["shape"]), window["spacing_mm"], tuple(window["origin_mm"]))
        if grid.origin_mm not in self._truths:
            self._truths[grid.origin_mm] = resample(self.gtvt, grid, order=1, fill=0.0) > 0.5
        return self._truths[grid.origin_mm]

    def next_click(self, answer: dict[str, Any], rng: np.random.Generator, *, always: bool = False) -> ClickKey | None:
        """The click correcting ``answer``'s mask (lattice voxel); None when it is right, unless
        ``always``: then a random voxel of the window with its true label."""
        window = answer["window"]
        truth = self.truth_on(window)
        simulated = next_click(decode_mask(answer["mask"]), truth, rng)
        if simulated is not None:
            label, local = simulated.label, simulated.voxel
        elif always:
            local = tuple(int(rng.integers(0, n)) for n in truth.shape)  # type: ignore[assignment]
            label = "foreground" if truth[local] else "background"
        else:
            return None
        i, j, k = (int(v) + int(o) for v, o in zip(local, window["offset"]))
        return label, (i, j, k)
