"""Reading NIfTI uploads: faithful for good files, a clear ImageError for hostile ones."""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from service.imaging.nifti import load_nifti_file, read_nifti, write_nifti
from service.imaging.volume import ImageError, Volume

LIMIT = 10 * 2**20

# 0.98 x 0.98 x 3 mm, x and y flipped as DICOM LPS stored in RAS, with an origin offset.
SCANNER_AFFINE = np.array(
    [
        [-0.98, 0.0, 0.0, 250.0],
        [0.0, -0.98, 0.0, 230.0],
        [0.0, 0.0, 3.0, -600.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def ramp(shape: tuple[int, ...] = (6, 7, 8)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) - 100.0


def nii_bytes(array: np.ndarray, affine: np.ndarray = SCANNER_AFFINE) -> bytes:
    return nib.Nifti1Image(array, affine).to_bytes()


def with_header(raw: bytes, **fields: object) -> bytes:
    """The same NIfTI-1 bytes with some header fields overwritten."""
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    for name, value in fields.items():
        header[name] = value
    block = header.binaryblock
    return block + raw[len(block) :]


def zero_bomb(decompressed_bytes: int) -> bytes:
    """A gzip stream of zeros, built chunk by chunk so the test never holds it expanded."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(2**20)
    parts = [compressor.compress(chunk) for _ in range(decompressed_bytes // len(chunk))]
    parts.append(compressor.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """200 MiB of zeros as a gzip stream of a few hundred KiB."""
    return zero_bomb(200 * 2**20)


def rejection(data: bytes, role: str = "ct", limit: int = LIMIT) -> str:
    with pytest.raises(ImageError) as caught:
        read_nifti(data, role=role, max_decompressed_bytes=limit)
    message = str(caught.value)
    assert message.startswith(f"{role}: ")
    return message


# --- faithful reading -----------------------------------------------------------------


def test_gzip_round_trip_preserves_voxels_and_affine() -> None:
    array = ramp()
    volume = read_nifti(write_nifti(array, SCANNER_AFFINE), role="ct", max_decompressed_bytes=LIMIT)
    assert isinstance(volume, Volume)
    assert volume.array.dtype == np.float32 and volume.shape == array.shape
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, SCANNER_AFFINE, atol=1e-4)


def test_written_file_is_gzip_with_requested_dtype_and_scanner_codes() -> None:
    mask = np.zeros((5, 5, 5), dtype=np.float32)
    mask[1:3, 2, 2] = 1
    data = write_nifti(mask, SCANNER_AFFINE, dtype=np.uint8)
    assert data[:2] == b"\x1f\x8b"
    image = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    assert image.get_data_dtype() == np.uint8
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.get_qform(), SCANNER_AFFINE, atol=1e-4)
    np.testing.assert_allclose(image.get_sform(), SCANNER_AFFINE, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(image.dataobj), mask.astype(np.uint8))


def test_boolean_masks_are_stored_as_uint8() -> None:
    data = write_nifti(np.ones((2, 2, 2), dtype=bool), np.eye(4))
    assert nib.Nifti1Image.from_bytes(gzip.decompress(data)).get_data_dtype() == np.uint8


def test_uncompressed_nifti1_and_nifti2_are_read() -> None:
    array = ramp()
    for raw in (nii_bytes(array), nib.Nifti2Image(array, SCANNER_AFFINE).to_bytes()):
        volume = read_nifti(raw, role="pet", max_decompressed_bytes=LIMIT)
        np.testing.assert_array_equal(volume.array, array)
        np.testing.assert_allclose(volume.affine, SCANNER_AFFINE, atol=1e-4)


def test_integer_voxels_are_scaled_to_float32() -> None:
    image = nib.Nifti1Image(np.full((3, 3, 3), 10, dtype=np.int16), SCANNER_AFFINE)
    image.header.set_slope_inter(2.0, -1024.0)
    volume = read_nifti(image.to_bytes(), role="ct", max_decompressed_bytes=LIMIT)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, np.full((3, 3, 3), -1004.0))


def test_trailing_singleton_dimension_is_dropped() -> None:
    volume = read_nifti(nii_bytes(ramp((4, 5, 6, 1))), role="ct", max_decompressed_bytes=LIMIT)
    assert volume.shape == (4, 5, 6)


def test_single_slice_volume_is_three_dimensional() -> None:
    volume = read_nifti(nii_bytes(ramp((4, 5, 1))), role="ct", max_decompressed_bytes=LIMIT)
    assert volume.shape == (4, 5, 1)


def test_multi_member_gzip_is_read_under_the_same_limit() -> None:
    raw = nii_bytes(ramp())
    split = len(raw) // 2
    data = gzip.compress(raw[:split]) + gzip.compress(raw[split:])
    np.testing.assert_array_equal(
        read_nifti(data, role="ct", max_decompressed_bytes=LIMIT).array, ramp()
    )
    assert "limit" in rejection(data, limit=len(raw) - 1)


def test_zero_padding_after_gzip_is_tolerated_but_other_trailing_bytes_are_not() -> None:
    data = write_nifti(ramp(), SCANNER_AFFINE)
    padded = read_nifti(data + bytes(16), role="ct", max_decompressed_bytes=LIMIT)
    np.testing.assert_array_equal(padded.array, ramp())
    assert rejection(data + b"junk", limit=2**32) == "ct: gzip stream is truncated or corrupt"


def test_load_nifti_file_reads_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "patient-name.nii.gz"
    path.write_bytes(write_nifti(ramp(), SCANNER_AFFINE))
    np.testing.assert_array_equal(load_nifti_file(path, role="ct").array, ramp())


def test_messages_never_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "patient-name.nii.gz"
    path.write_bytes(b"\x1f\x8b" + bytes(40))
    with pytest.raises(ImageError) as caught:
        load_nifti_file(path, role="pet")
    assert "patient" not in str(caught.value) and str(caught.value).startswith("pet: ")


# --- hostile or broken uploads --------------------------------------------------------


def test_random_bytes_are_not_nifti() -> None:
    noise = np.random.default_rng(0).bytes(4096)
    assert rejection(noise, role="pet") == "pet: not a NIfTI-1/2 file"
    assert rejection(b"") == "ct: not a NIfTI-1/2 file"


def test_gzip_of_something_else_is_not_nifti() -> None:
    assert rejection(gzip.compress(b"hello" * 100)) == "ct: not a NIfTI-1/2 file"


def test_header_text_is_not_echoed() -> None:
    raw = with_header(nii_bytes(ramp()), descrip=b"SECRET-PATIENT", datatype=1234)
    message = rejection(raw)
    assert "SECRET" not in message and "1234" not in message


def test_truncated_gzip_is_rejected() -> None:
    data = write_nifti(ramp((20, 20, 20)), SCANNER_AFFINE)
    # A cut stream ends in arbitrary bytes where the size trailer should be; with a
    # limit above any 32-bit size only the streaming decompressor can notice the cut.
    message = rejection(data[: len(data) // 2], role="pet", limit=2**32)
    assert message == "pet: gzip stream is truncated or corrupt"


def test_corrupt_gzip_payload_is_rejected() -> None:
    data = bytearray(write_nifti(np.random.default_rng(1).random((20, 20, 20)), SCANNER_AFFINE))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    assert "gzip stream is truncated or corrupt" in rejection(bytes(data))


def test_gzip_bomb_is_refused_from_its_trailer_before_decompressing(
    bomb: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(bomb) < 2**20

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("decompression started")

    monkeypatch.setattr(zlib, "decompressobj", forbidden)
    message = rejection(bomb)
    assert f"declares {200 * 2**20} bytes when decompressed, over the limit of {LIMIT}" in message


def test_gzip_bomb_with_lying_trailer_is_stopped_by_the_streaming_cap(bomb: bytes) -> None:
    liar = bomb[:-4] + (1000).to_bytes(4, "little")
    assert "decompresses to more than the limit" in rejection(liar)


def test_uncompressed_upload_over_the_limit_is_rejected() -> None:
    raw = nii_bytes(ramp((20, 20, 20)))
    assert "over the limit" in rejection(raw, limit=len(raw) - 1)


@pytest.mark.parametrize(
    ("shape", "described"),
    [((6, 6, 6, 2), "4D"), ((6, 6, 1, 5), "4D"), ((6, 6, 6, 2, 1), "4D"), ((6, 6), "2D")],
)
def test_only_three_dimensional_images_are_accepted(shape: tuple[int, ...], described: str) -> None:
    message = rejection(nii_bytes(ramp(shape)))
    assert message == (
        f"ct: image is {described}; a 3D volume is required "
        "(a trailing dimension of size 1 is allowed)"
    )


def test_zero_sized_image_is_empty() -> None:
    raw = with_header(nii_bytes(ramp()), dim=[3, 6, 0, 8, 1, 1, 1, 1])
    assert rejection(raw) == "ct: image is empty"


def test_nan_voxels_are_counted() -> None:
    array = ramp()
    array.flat[:12] = np.nan
    assert rejection(nii_bytes(array), role="pet") == "pet: 12 voxels are NaN or infinite"


def test_infinite_voxels_are_counted() -> None:
    array = ramp()
    array[0, 0, :3] = np.inf
    array[1, 1, 1] = -np.inf
    assert rejection(nii_bytes(array)) == "ct: 4 voxels are NaN or infinite"


def test_singular_affine_is_rejected() -> None:
    raw = with_header(nii_bytes(ramp()), qform_code=0, sform_code=1, srow_y=[0, 0, 0, 5])
    assert rejection(raw) == "ct: affine is singular or not finite"


def test_non_finite_affine_is_rejected() -> None:
    raw = with_header(nii_bytes(ramp()), qform_code=0, sform_code=1, srow_x=[np.nan, 0, 0, 0])
    assert rejection(raw, role="pet") == "pet: affine is singular or not finite"


def test_header_declaring_a_huge_image_is_refused_before_reading() -> None:
    raw = with_header(nii_bytes(ramp()), dim=[3, 30000, 30000, 30000, 1, 1, 1, 1])
    message = rejection(raw, limit=2**31)
    assert f"declares {30000**3 * 4} bytes of voxel data, over the limit" in message


def test_header_declaring_more_data_than_present_is_refused() -> None:
    raw = with_header(nii_bytes(ramp()), dim=[3, 60, 70, 80, 1, 1, 1, 1])
    assert "but the file holds only" in rejection(raw)
