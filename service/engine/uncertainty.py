"""Where the ensemble is unsure: the members' disagreement per version, and a suggested click.

Every pass runs five members; the service keeps, per version, the number of members
whose sigmoid exceeds 0.5 at each working-grid voxel (``votes``, uint8 0..N). A voxel
is *uncertain* where the members split (0 < votes < N).

The **suggested click** goes into the largest connected (face-connected) uncertain
region: at its voxel deepest inside the region (largest Euclidean distance to the
region's border, the first in C order on ties), the same rule the click simulator uses
for error regions. Its label is the side the ensemble's mask does *not* take there
(``background`` where the mean probability is above 0.5, else ``foreground``): the
suggestion asks the user to confirm that the members' minority is right where they
are least agreed. A user who knows better clicks elsewhere; ``icr evaluate-suggestions``
measures what accepting it blindly does.

The byte format kept with a version (one blob)::

    b"ICRU" | uint32 LE summary length | summary JSON | votes as a codec array blob

so that the summary (members, uncertain_ml, suggested click) is read without
decompressing the volume.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from service.engine.guarantee import honour_clicks
from service.store.codec import CodecError, decode_array, encode_array
from service.store.contract import Click, ClickLabel

MAGIC = b"ICRU"


@dataclass(frozen=True)
class Uncertainty:
    """The summary of a version's disagreement."""

    members: int
    uncertain_voxels: int
    uncertain_ml: float
    suggested_click: Click | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "members": self.members,
            "uncertain_voxels": self.uncertain_voxels,
            "uncertain_ml": self.uncertain_ml,
            "suggested_click": None if self.suggested_click is None else self.suggested_click.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Uncertainty:
        click = data["suggested_click"]
        return cls(
            members=int(data["members"]),
            uncertain_voxels=int(data["uncertain_voxels"]),
            uncertain_ml=float(data["uncertain_ml"]),
            suggested_click=None if click is None else Click.from_dict(click),
        )


def votes_after_clicks(votes: np.ndarray, members: int, clicks: Sequence[Click], radius_voxels: float) -> np.ndarray:
    """The votes where the click guarantee set the mask: all members agree at every clicked voxel."""
    agreed = honour_clicks(votes.astype(np.float32) / members, clicks, radius_voxels)
    return np.rint(agreed * members).astype(np.uint8)


def votes_for_mask(votes: np.ndarray, members: int, drawn: np.ndarray, returned: np.ndarray) -> np.ndarray:
    """The votes where the service returns another mask than the networks ``drawn``: all members agree
    with the ``returned`` mask there (service.engine.locality keeps the session's mask away from the clicks)."""
    return np.where(drawn != returned, np.where(returned, members, 0), votes).astype(np.uint8)


def uncertain(votes: np.ndarray, members: int) -> np.ndarray:
    return (votes > 0) & (votes < members)


def suggested_click(votes: np.ndarray, members: int, probability: np.ndarray) -> Click | None:
    """The click into the largest uncertain region (the module doc gives the rule); None if all agree."""
    regions, count = ndimage.label(uncertain(votes, members))
    if count == 0:
        return None
    sizes = np.bincount(regions.ravel())[1:]
    largest = regions == int(np.argmax(sizes)) + 1
    box = ndimage.find_objects(largest.astype(np.uint8))[0]
    depth = ndimage.distance_transform_edt(np.pad(largest[box], 1))[1:-1, 1:-1, 1:-1]
    local = np.unravel_index(int(np.argmax(depth)), depth.shape)
    i, j, k = (int(b.start) + int(v) for b, v in zip(box, local))
    label: ClickLabel = "background" if probability[i, j, k] > 0.5 else "foreground"
    return Click(label=label, voxel=(i, j, k))


def summarise(votes: np.ndarray, members: int, probability: np.ndarray, spacing_mm: float) -> Uncertainty:
    voxels = int(uncertain(votes, members).sum())
    return Uncertainty(
        members=members,
        uncertain_voxels=voxels,
        uncertain_ml=round(voxels * spacing_mm**3 / 1000.0, 4),
        suggested_click=suggested_click(votes, members, probability),
    )


def encode_uncertainty(votes: np.ndarray, summary: Uncertainty) -> bytes:
    head = json.dumps(summary.to_dict(), separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + encode_array(votes.astype(np.uint8))


def _split(blob: bytes) -> tuple[Uncertainty, bytes]:
    if blob[:4] != MAGIC:
        raise CodecError("not an ICRU uncertainty blob")
    (size,) = struct.unpack("<I", blob[4:8])
    return Uncertainty.from_dict(json.loads(blob[8 : 8 + size])), blob[8 + size :]


def decode_summary(blob: bytes) -> Uncertainty:
    return _split(blob)[0]


def decode_votes(blob: bytes) -> np.ndarray:
    return decode_array(_split(blob)[1])
