"""What the worker stores with a version: its blobs and its mask summary.

The mask is taken from the stored (quantised) probability, so the mask the API answers
with and the probability kept as the next pass's memory agree voxel for voxel.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from service.store.codec import decode_array, encode_mask, encode_probability
from service.store.contract import BLOB_MASK, BLOB_PROBABILITY


def mask_summary(mask: np.ndarray, spacing_mm: float) -> dict[str, Any]:
    """Voxel count, volume in ml and the inclusive bounding box (None when empty)."""
    voxels = int(mask.sum())
    if voxels == 0:
        return {"voxels": 0, "volume_ml": 0.0, "bbox_min": None, "bbox_max": None}
    where = np.argwhere(mask)
    return {
        "voxels": voxels,
        "volume_ml": round(voxels * spacing_mm**3 / 1000.0, 4),
        "bbox_min": [int(v) for v in where.min(axis=0)],
        "bbox_max": [int(v) for v in where.max(axis=0)],
    }


def version_blobs(probability: np.ndarray, spacing_mm: float) -> tuple[dict[str, bytes], dict[str, Any]]:
    """(blobs, summary) of a version whose probability is ``probability``."""
    stored = encode_probability(probability)
    mask = decode_array(stored) > 0.5
    blobs = {BLOB_PROBABILITY: stored, BLOB_MASK: json.dumps(encode_mask(mask)).encode()}
    return blobs, mask_summary(mask, spacing_mm)
