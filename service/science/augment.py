"""The paper's training augmentations, as MONAI dictionary transforms.

Spatial (CT, PET and GTVt together, each with probability 0.5): affine with
rotations up to 45 degrees about every axis, scaling and shearing in [-0.1, 0.1],
translation up to 32 mm (given in voxels of the working grid), and mirroring along
each axis. CT only (each with probability 0.25): gamma contrast in [0.5, 1.5],
intensity shift of 0.1, Gaussian noise with sd 0.1, Gaussian smoothing.
"""

from __future__ import annotations

import math

import numpy as np
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandShiftIntensityd,
)

KEYS = ("ct", "pet", "label")
TRANSLATION_MM = 32.0


def training_transforms(spacing_mm: float, patch_shape: tuple[int, int, int] | None) -> Compose:
    translate = TRANSLATION_MM / spacing_mm
    steps: list = [
        RandAffined(
            keys=KEYS,
            prob=0.5,
            rotate_range=(math.pi / 4,) * 3,
            scale_range=(0.1,) * 3,
            shear_range=(0.1,) * 6,
            translate_range=(translate,) * 3,
            mode=("bilinear", "bilinear", "nearest"),
            padding_mode="zeros",
        ),
        *(RandFlipd(keys=KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)),
        RandAdjustContrastd(keys="ct", prob=0.25, gamma=(0.5, 1.5)),
        RandShiftIntensityd(keys="ct", prob=0.25, offsets=0.1),
        RandGaussianNoised(keys="ct", prob=0.25, std=0.1),
        RandGaussianSmoothd(keys="ct", prob=0.25),
    ]
    if patch_shape is not None:
        # two of three patches hold tumour, as MONAI's positive/negative sampling does
        steps.append(RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=patch_shape, pos=2, neg=1))
    return Compose(steps)


def augmented_sample(
    transforms: Compose, images: np.ndarray, truth: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(2, ...) images and a bool truth, augmented with a seeded draw."""
    transforms.set_random_state(seed=seed)
    sample = {"ct": images[0:1], "pet": images[1:2], "label": truth[None].astype(np.float32)}
    out = transforms(sample)
    if isinstance(out, list):
        out = out[0]
    stacked = np.concatenate([np.asarray(out["ct"]), np.asarray(out["pet"])], axis=0).astype(np.float32)
    return stacked, np.asarray(out["label"])[0] > 0.5
