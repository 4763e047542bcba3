"""Stored-array and wire codecs."""

from __future__ import annotations

import numpy as np

from service.store.codec import (
    decode_array,
    decode_mask,
    encode_array,
    encode_mask,
    encode_probability,
)


def test_arrays_round_trip_losslessly() -> None:
    for array in (np.arange(60, dtype=np.float16).reshape(3, 4, 5), np.random.default_rng(0).normal(size=(2, 7, 7, 7))):
        decoded = decode_array(encode_array(array))
        assert decoded.dtype == array.dtype and decoded.shape == array.shape
        np.testing.assert_array_equal(decoded, array)


def test_probability_codec_error_bound_and_mask() -> None:
    rng = np.random.default_rng(1)
    probability = rng.random((20, 21, 22)).astype(np.float32)
    probability[0, 0, :3] = (0.0, 0.5, 1.0)
    decoded = decode_array(encode_probability(probability))
    assert decoded.dtype == np.float32
    assert np.abs(decoded - probability).max() <= 1 / 510 + 1e-7
    np.testing.assert_array_equal(decoded > 0.5, probability >= 0.5)


def test_sparse_probability_compresses_well() -> None:
    probability = np.zeros((144, 144, 144), np.float32)
    probability[60:80, 60:85, 55:75] = np.linspace(0.6, 1.0, 20)[:, None, None]
    assert len(encode_probability(probability)) < 20_000  # vs 12 MB raw float32


def test_mask_wire_format() -> None:
    mask = np.random.default_rng(2).random((9, 10, 11)) > 0.7
    wire = encode_mask(mask)
    assert wire["encoding"] == "packbits-zlib" and wire["shape"] == [9, 10, 11]
    np.testing.assert_array_equal(decode_mask(wire), mask)
