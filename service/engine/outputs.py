"""What the worker stores with a version: its windows' probabilities, its mask and its summary.

The mask is taken from the stored (quantised) probability, so the mask the API answers
with and the probability kept as the next pass's memory agree voxel for voxel.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.store.codec import decode_array, encode_mask, encode_probability


def stored_probability(probability: np.ndarray) -> tuple[bytes, np.ndarray]:
    """(blob, probability as stored): the quantised blob of a window and what decoding it gives."""
    blob = encode_probability(probability)
    return blob, decode_array(blob)


def mask_blob(mask: np.ndarray) -> bytes:
    """The packed mask's wire form, as the API answers with it."""
    return json.dumps(encode_mask(mask)).encode()


def mask_summary(mask: np.ndarray, spacing_mm: float, offset: Sequence[int] = (0, 0, 0)) -> dict[str, Any]:
    """Voxel count, volume in ml and the inclusive bounding box (lattice voxels: ``offset`` is the
    lattice index of ``mask``'s first voxel; None when empty)."""
    voxels = int(mask.sum())
    if voxels == 0:
        return {"voxels": 0, "volume_ml": 0.0, "bbox_min": None, "bbox_max": None}
    where = np.argwhere(mask) + np.asarray(offset, dtype=int)
    return {
        "voxels": voxels,
        "volume_ml": round(voxels * spacing_mm**3 / 1000.0, 4),
        "bbox_min": [int(v) for v in where.min(axis=0)],
        "bbox_max": [int(v) for v in where.max(axis=0)],
    }
