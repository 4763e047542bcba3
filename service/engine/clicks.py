"""Click encoding: MONAI's DeepGrow/DeepEdit guidance signal.

Each sign (foreground, background) gets one channel: 1 at every click voxel, then
MONAI's GaussianFilter (sigma in working-grid voxels, truncated at 4 sigma, zero
padding) and per-channel min-max scaling to [0, 1]; a sign without clicks stays 0.
The default sigma is DeepEdit's (3 voxels = 3 mm on the 1 mm working grid); the
checkpoint manifest records the sigma a model was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.layers import GaussianFilter

from service.store.contract import Click

DEFAULT_SIGMA_VOXELS = 3.0
SIGNS = ("foreground", "background")


def click_maps(clicks: Sequence[Click], shape: Sequence[int], sigma: float = DEFAULT_SIGMA_VOXELS) -> np.ndarray:
    """(2, *shape) float32: positive-click map, negative-click map."""
    maps = torch.zeros((2, 1, *shape), dtype=torch.float32)
    for click in clicks:
        maps[SIGNS.index(click.label), 0][tuple(click.voxel)] = 1.0
    smooth = GaussianFilter(3, sigma=sigma)
    out = np.zeros((2, *shape), dtype=np.float32)
    with torch.no_grad():
        for channel in range(2):
            if maps[channel].max() <= 0:
                continue
            signal = smooth(maps[channel : channel + 1])[0, 0].numpy()
            low, high = float(signal.min()), float(signal.max())
            out[channel] = (signal - low) / (high - low)
    return out
