"""A session's scan: the CT and PET as uploaded, stored once so windows can go anywhere in them.

The scan is kept in the images' own geometry (never resampled at upload), so a
working window is resampled from the source wherever a click takes it and the
session costs no more than the upload. Byte format (no pickle):

    b"SCN1" | uint32 LE header length | header JSON | CT array blob | PET array blob

The header holds each image's voxel-to-world affine and its blob's length; the array
blobs are :func:`service.store.codec.encode_array` blobs (Zstandard). Each array is
kept compact: ``int16`` when all its values are whole numbers in that range (CT in HU
as scanners store it), else ``float16`` when it fits (relative error at most 2**-11,
below the noise of either modality), else ``float32``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from service.imaging.volume import Volume
from service.store.codec import CodecError, decode_array, encode_array

MAGIC = b"SCN1"
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class Scan:
    """The CT (HU) and PET (SUV) of a session, each on its own grid."""

    ct: Volume
    pet: Volume


def compact(array: np.ndarray) -> np.ndarray:
    """The smallest of int16 / float16 / float32 that keeps ``array`` (see the module doc)."""
    values = np.asarray(array)
    low, high = float(values.min()), float(values.max())
    if low >= -32768 and high <= 32767 and np.array_equal(values, np.round(values)):
        return values.astype(np.int16)
    if max(abs(low), abs(high)) < FLOAT16_MAX:
        return values.astype(np.float16)
    return values.astype(np.float32)


def encode_scan(scan: Scan) -> bytes:
    blobs = [encode_array(compact(volume.array)) for volume in (scan.ct, scan.pet)]
    header = {
        role: {"affine": volume.affine.tolist(), "bytes": len(blob)}
        for role, volume, blob in zip(("ct", "pet"), (scan.ct, scan.pet), blobs)
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(blobs)


def decode_scan(blob: bytes) -> Scan:
    if blob[:4] != MAGIC or len(blob) < 8:
        raise CodecError("not a scan blob")
    (length,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8 : 8 + length])
    at = 8 + length
    volumes = []
    for role in ("ct", "pet"):
        size = int(header[role]["bytes"])
        volumes.append(Volume(decode_array(blob[at : at + size]), np.asarray(header[role]["affine"])))
        at += size
    return Scan(ct=volumes[0], pet=volumes[1])
