"""Click encoding: MONAI's DeepGrow/DeepEdit guidance signal.

Each sign (foreground, background) gets one channel: 1 at every click voxel, then
MONAI's GaussianFilter (sigma in working-grid voxels, truncated at 4 sigma, erf
kernel, zero padding) and per-channel min-max scaling to [0, 1]; a sign without
clicks stays 0. The default sigma is DeepEdit's (3 voxels = 3 mm on the 1 mm working
grid); the checkpoint manifest records the sigma a model was trained with.

Where the balls of two clicks of one sign overlap, DeepEdit adds them (``overlap``
"sum"), and the scaling then divides every click of that sign by the highest sum: a
cluster of clicks dims every other click of its sign (three clicks within a voxel or two
of each other leave a lone click at about 0.35). "max" takes the larger ball instead, so
every click peaks at 1 however many others there are; a single click's map is the same
either way. The checkpoint manifest records which a model uses (``click_overlap``).

A sign may also carry a *reach*: a second, wider sigma (``click_reach_sigma_voxels`` in the
manifest, per sign). Each click of that sign then adds the mean of two Gaussians scaled to
peak 1, the narrow one (``sigma``) marking the clicked voxel and the wide one the region
its correction reaches; the min-max scaling follows as before, so a lone click still peaks
at 1. A single Gaussian of sigma 3 voxels on a 2 mm grid marks a ball about 14 mm across
about as much as the clicked voxel, and a narrow one marks the voxel but not the region
around it (measured: ``docs/results/interaction-probes.md``, "A click's reach").

:func:`click_maps` computes exactly that without filtering the whole volume: the
filter of a one-voxel delta is the outer product of MONAI's 1-D kernel, so each click
adds a small ball (milliseconds instead of about 0.7 s on a 144^3 grid).
:func:`reference_click_maps` runs MONAI's filter itself, as a plain inference server
would; the two agree to 1e-6 (tested), and the benchmark's baseline uses the latter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
import torch
from monai.networks.layers import GaussianFilter
from monai.networks.layers.convutils import gaussian_1d

from service.store.contract import Click

DEFAULT_SIGMA_VOXELS = 3.0
SIGNS = ("foreground", "background")
CLICK_OVERLAPS = ("sum", "max")  # how overlapping click balls of one sign combine; "sum" is DeepEdit's
GAUSSIAN_TRUNCATION = 4.0  # MONAI GaussianFilter's default, in sigmas
# The click maps' sigma, overlap and reach (per sign): the last three arguments of click_maps, as a
# checkpoint or a training configuration gives them.
ClickEncoding = tuple[float, str, Mapping[str, float]]


def click_kernel(sigma: float) -> np.ndarray:
    """MONAI's 1-D Gaussian kernel for ``sigma`` voxels, as its GaussianFilter builds it."""
    return gaussian_1d(torch.tensor(float(sigma)), truncated=GAUSSIAN_TRUNCATION, approx="erf").numpy()


@lru_cache(maxsize=16)
def ball_kernels(sigma: float, reach_sigma: float | None = None) -> tuple[np.ndarray, ...]:
    """The 1-D kernels whose outer products, summed, make one click's ball: MONAI's kernel for ``sigma``
    alone, or with a ``reach_sigma`` both kernels scaled so that each ball peaks at 1/2 (zero-padded to
    one length). Cached (a checkpoint has one or two), so shared by every request: read-only."""
    if reach_sigma is None:
        kernels = [click_kernel(sigma)]
    else:
        kernels = [click_kernel(s) for s in (sigma, reach_sigma)]
        size = max(k.size for k in kernels)
        kernels = [np.pad(k / k.max(), (size - k.size) // 2) * 0.5 ** (1 / 3) for k in kernels]
    for kernel in kernels:
        kernel.flags.writeable = False
    return tuple(kernels)


def _add_ball(signal: np.ndarray, voxel: Sequence[int], kernels: Sequence[np.ndarray], overlap: str) -> None:
    """Add (or, with ``overlap`` "max", take the maximum with) the sum of the kernels' outer products
    centred on ``voxel``, clipped to the volume (zero padding); the kernels have one odd length."""
    tail = kernels[0].size // 2
    target: list[slice] = []
    cut: list[slice] = []
    for centre, size in zip(voxel, signal.shape):
        low, high = max(centre - tail, 0), min(centre + tail + 1, size)
        target.append(slice(low, high))
        cut.append(slice(low - centre + tail, high - centre + tail))
    ball = sum(k[cut[0]][:, None, None] * k[cut[1]][None, :, None] * k[cut[2]][None, None, :] for k in kernels)
    region = signal[tuple(target)]
    if overlap == "max":
        np.maximum(region, ball, out=region)
    else:
        region += ball


def _check_overlap(overlap: str) -> None:
    if overlap not in CLICK_OVERLAPS:
        raise ValueError(f"click overlap must be one of {', '.join(CLICK_OVERLAPS)}, not {overlap!r}")


def check_reach(reach: object) -> None:
    """ValueError unless ``reach`` maps click signs to sigmas > 0."""
    if not isinstance(reach, Mapping):
        raise ValueError(f"a click reach maps click signs to sigmas, got {reach!r}")
    for sign, value in reach.items():
        if sign not in SIGNS:
            raise ValueError(f"a click reach names a sign, one of {', '.join(SIGNS)}, not {sign!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:  # also refuses nan
            raise ValueError(f"the {sign} clicks' reach sigma must be a number > 0, got {value!r}")


def click_maps(
    clicks: Sequence[Click], shape: Sequence[int], sigma: float = DEFAULT_SIGMA_VOXELS, overlap: str = "sum",
    reach: Mapping[str, float] | None = None,
) -> np.ndarray:
    """(2, *shape) float32: positive-click map, negative-click map; ``reach`` gives a sign its reach sigma."""
    _check_overlap(overlap)
    reach = reach or {}
    out = np.zeros((len(SIGNS), *shape), dtype=np.float32)
    for channel, sign in enumerate(SIGNS):
        voxels = {tuple(int(v) for v in c.voxel) for c in clicks if c.label == sign}  # a repeated voxel is one delta
        if not voxels:
            continue
        kernels = ball_kernels(sigma, reach.get(sign))
        signal = out[channel]
        for voxel in sorted(voxels):
            _add_ball(signal, voxel, kernels, overlap)
        low, high = float(signal.min()), float(signal.max())
        signal -= low
        signal /= high - low
    return out


def reference_click_maps(
    clicks: Sequence[Click], shape: Sequence[int], sigma: float = DEFAULT_SIGMA_VOXELS, overlap: str = "sum",
    reach: Mapping[str, float] | None = None,
) -> np.ndarray:
    """The same maps through MONAI's GaussianFilter over the whole volume (with ``overlap`` "max",
    once per click, keeping the maximum; with a reach, once per sigma, each scaled to peak 1/2)."""
    _check_overlap(overlap)
    reach = reach or {}
    out = np.zeros((2, *shape), dtype=np.float32)
    with torch.no_grad():
        for channel, sign in enumerate(SIGNS):
            voxels = sorted({tuple(int(v) for v in c.voxel) for c in clicks if c.label == sign})
            if not voxels:
                continue
            deltas = torch.zeros((len(voxels) if overlap == "max" else 1, 1, *shape), dtype=torch.float32)
            for index, voxel in enumerate(voxels):
                deltas[index if overlap == "max" else 0, 0][voxel] = 1.0
            sigmas = [sigma] if sign not in reach else [sigma, reach[sign]]
            scales = [1.0] if sign not in reach else [0.5 / float(click_kernel(s).max()) ** 3 for s in sigmas]
            smoothed = sum(scale * GaussianFilter(3, sigma=s)(deltas) for s, scale in zip(sigmas, scales))
            signal = smoothed.amax(dim=0)[0].numpy()
            low, high = float(signal.min()), float(signal.max())
            out[channel] = (signal - low) / (high - low)
    return out


def click_balls(clicks: Sequence[Click], shape: Sequence[int], radius_voxels: float) -> np.ndarray:
    """Bool mask of the voxels of a volume of ``shape`` within ``radius_voxels`` of any click (clicks
    outside the volume too)."""
    balls = np.zeros(tuple(int(n) for n in shape), dtype=bool)
    reach = int(np.ceil(radius_voxels))
    for click in clicks:
        low = [max(int(c) - reach, 0) for c in click.voxel]
        high = [min(int(c) + reach + 1, int(n)) for c, n in zip(click.voxel, shape)]
        if any(h <= lo for lo, h in zip(low, high)):
            continue
        box = tuple(slice(lo, h) for lo, h in zip(low, high))
        axes = np.ogrid[box]
        distance2 = sum((axis - int(c)) ** 2 for axis, c in zip(axes, click.voxel))
        balls[box] |= distance2 <= radius_voxels**2
    return balls


def new_clicks_of(clicks: Sequence[Click], new_clicks: int | None) -> Sequence[Click]:
    """The trailing ``new_clicks`` of ``clicks`` (the ones a pass's memory does not reflect yet); all of
    them when ``new_clicks`` is None or out of range."""
    return clicks if new_clicks is None or not 0 < new_clicks <= len(clicks) else clicks[-new_clicks:]
