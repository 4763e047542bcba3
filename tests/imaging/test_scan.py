"""The session's scan: the CT and PET kept as uploaded, compactly and exactly enough."""

from __future__ import annotations

import numpy as np
import pytest

from service.imaging.scan import Scan, compact, decode_scan, encode_scan
from service.imaging.volume import Volume
from service.store.codec import CodecError

AFFINE = np.array([[-0.98, 0, 0, 120.5], [0, -0.98, 0, 80.0], [0, 0, 3.0, -600.0], [0, 0, 0, 1]])


def test_whole_hu_stay_exact_as_int16_and_suv_within_float16_precision() -> None:
    rng = np.random.default_rng(0)
    ct = Volume(rng.integers(-1024, 3000, (20, 18, 9)).astype(np.float32), AFFINE)
    pet = Volume(rng.gamma(2.0, 1.5, (7, 6, 5)).astype(np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
    blob = encode_scan(Scan(ct, pet))
    back = decode_scan(blob)
    assert np.array_equal(back.ct.array, ct.array)
    np.testing.assert_allclose(back.pet.array, pet.array, rtol=2.0**-11)
    np.testing.assert_array_equal(back.ct.affine, AFFINE)
    np.testing.assert_array_equal(back.pet.affine, pet.affine)
    assert len(blob) < ct.array.size * 2 + pet.array.size * 2 + 1000  # no float32 copies


def test_each_array_takes_the_smallest_type_that_keeps_it() -> None:
    assert compact(np.array([-1024.0, 0.0, 3071.0])).dtype == np.int16
    assert compact(np.array([0.5, 12.25])).dtype == np.float16
    assert compact(np.array([1.0, 70000.0])).dtype == np.float32  # whole, but beyond int16
    assert compact(np.array([0.5, 70000.5])).dtype == np.float32


def test_a_blob_that_is_not_a_scan_is_refused() -> None:
    with pytest.raises(CodecError):
        decode_scan(b"ICR1 not a scan")
