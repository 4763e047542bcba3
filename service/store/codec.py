"""Byte formats for arrays kept in the store and sent to clients.

Stored arrays (never pickle) are one self-describing blob:

    b"ICR1" | uint32 LE header length | header JSON {"dtype", "shape", "codec"} | payload

``codec`` names how the payload was made from the C-order raw buffer:

- ``zstd``: the raw buffer compressed with Zstandard (level 3);
- ``u8-zstd``: a probability in [0, 1] quantised to uint8 (``round(p * 255)``)
  then compressed; decoding gives ``q / 255`` as float32, so the error is at most
  1/510 and ``decoded > 0.5`` equals ``p >= 0.5``: the mask is kept exactly.

Masks travel to clients as ``packbits-zlib``: ``numpy.packbits`` (big bit order) of
the C-order flattened uint8 0/1 mask, compressed with zlib, base64 in JSON. The README
shows the few lines of numpy that decode it.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib

import numpy as np
import zstandard

MAGIC = b"ICR1"
PROBABILITY_SCALE = 255


class CodecError(ValueError):
    """A stored blob is not in the format this module writes."""


def _pack(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + payload


def _unpack(blob: bytes) -> tuple[dict, bytes]:
    if blob[:4] != MAGIC:
        raise CodecError("not an ICR1 array blob")
    (size,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8 : 8 + size])
    return header, blob[8 + size :]


def encode_array(array: np.ndarray) -> bytes:
    """Losslessly compress an array of any numeric dtype."""
    contiguous = np.ascontiguousarray(array)
    payload = zstandard.ZstdCompressor(level=3).compress(contiguous.tobytes())
    header = {"dtype": contiguous.dtype.str, "shape": list(contiguous.shape), "codec": "zstd"}
    return _pack(header, payload)


def encode_probability(probability: np.ndarray) -> bytes:
    """Quantise a probability volume to uint8 and compress it."""
    quantised = np.rint(np.clip(probability, 0.0, 1.0) * PROBABILITY_SCALE).astype(np.uint8)
    payload = zstandard.ZstdCompressor(level=3).compress(np.ascontiguousarray(quantised).tobytes())
    header = {"dtype": "|u1", "shape": list(quantised.shape), "codec": "u8-zstd"}
    return _pack(header, payload)


def decode_array(blob: bytes) -> np.ndarray:
    """Decode a blob made by :func:`encode_array` or :func:`encode_probability`."""
    header, payload = _unpack(blob)
    raw = zstandard.ZstdDecompressor().decompress(payload)
    array = np.frombuffer(raw, dtype=np.dtype(header["dtype"])).reshape(header["shape"])
    if header["codec"] == "u8-zstd":
        return array.astype(np.float32) / np.float32(PROBABILITY_SCALE)
    if header["codec"] != "zstd":
        raise CodecError(f"unknown codec {header['codec']!r}")
    return array.copy()


def encode_mask(mask: np.ndarray) -> dict:
    """The wire form of a binary mask: shape, encoding and base64 payload."""
    packed = np.packbits(np.ascontiguousarray(mask, dtype=bool).ravel())
    return {
        "encoding": "packbits-zlib",
        "shape": list(mask.shape),
        "order": "C",
        "data": base64.b64encode(zlib.compress(packed.tobytes(), 6)).decode("ascii"),
    }


def decode_mask(wire: dict) -> np.ndarray:
    """Inverse of :func:`encode_mask` (what a client does)."""
    shape = tuple(wire["shape"])
    packed = np.frombuffer(zlib.decompress(base64.b64decode(wire["data"])), dtype=np.uint8)
    return np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)
