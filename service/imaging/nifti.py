"""Reading and writing NIfTI-1/2 images, defensively: uploads are untrusted.

Every rejection raises :class:`ImageError` whose message starts with the image's
role ('ct'/'pet') and describes the problem in our own words; header contents and
file names never reach a message. Sizes are checked before anything large is
allocated, so a small upload cannot make the service decompress or allocate
more than ``max_decompressed_bytes`` of raw image data. The float32 volume that is
returned may need up to 4x that (e.g. for uint8 voxels); size the limit accordingly.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt

from service.imaging.volume import ImageError, Volume

GZIP_MAGIC = b"\x1f\x8b"
_GZIP_MIN_MEMBER_BYTES = 18  # 10-byte header + empty deflate block + 8-byte trailer
_NIFTI1_HEADER_BYTES = 348
_NIFTI2_HEADER_BYTES = 540
_NIFTI1_MAGIC_OFFSET = 344
_NIFTI1_SINGLE_FILE_MAGIC = b"n+1\x00"
_NIFTI2_SINGLE_FILE_MAGIC = b"n+2\x00"
_MIN_AFFINE_DETERMINANT = 1e-6
SPACING_RANGE_MM = (0.01, 100.0)  # a voxel edge outside this is no medical image
MAX_WORLD_MM = 1e5  # 100 m: an image placed farther from the origin is a broken header
_REAL_DTYPE_KINDS = frozenset("iuf")


def read_nifti(data: bytes, *, role: str, max_decompressed_bytes: int) -> Volume:
    """Parse an uploaded .nii or .nii.gz into a float32 3D :class:`Volume`."""
    raw = _decompressed(data, role=role, limit=max_decompressed_bytes)
    image = _parse_single_file_nifti(raw, role=role)
    _check_voxel_size(raw, image, role=role)
    shape = _volume_shape(image.header, role=role)
    _check_declared_size(image.header, available=len(raw), role=role, limit=max_decompressed_bytes)
    array = _voxels(image, shape, role=role)
    affine = _affine(image, role=role)
    return Volume(array=array, affine=affine)


def load_nifti_file(
    path: str | os.PathLike[str], *, role: str, max_decompressed_bytes: int = 2**31
) -> Volume:
    """Read a NIfTI file from disk with the same checks as an upload.

    Errors opening the file are left as ``OSError``: they concern our own storage,
    not the image.
    """
    return read_nifti(
        Path(path).read_bytes(), role=role, max_decompressed_bytes=max_decompressed_bytes
    )


def write_nifti(array: np.ndarray, affine: np.ndarray, *, dtype: npt.DTypeLike | None = None) -> bytes:
    """Encode an image as gzip-compressed NIfTI-1 bytes (.nii.gz).

    Both qform and sform are set to ``affine`` (code 1, scanner) so any viewer places
    the image where we do; the sform keeps the exact affine. ``dtype`` chooses the
    stored voxel type (e.g. ``np.uint8`` for masks); by default the array's own type
    is kept, with booleans stored as uint8 since NIfTI has no boolean type.
    """
    voxels = np.asarray(array)
    if dtype is not None:
        voxels = voxels.astype(dtype, copy=False)
    elif voxels.dtype == np.bool_:
        voxels = voxels.astype(np.uint8)
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(voxels, affine, dtype=voxels.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _decompressed(data: bytes, *, role: str, limit: int) -> bytes:
    if data[:2] == GZIP_MAGIC:
        return _gunzip(data, role=role, limit=limit)
    if len(data) > limit:
        raise ImageError(f"{role}: file is {len(data)} bytes, over the limit of {limit}")
    return bytes(data)


def _gunzip(data: bytes, *, role: str, limit: int) -> bytes:
    """Decompress a gzip stream, never producing more than ``limit`` bytes.

    The ISIZE trailer gives a cheap early refusal of honest large files; the
    streaming cap is what actually bounds memory, because the trailer can lie and
    only describes the last member of a multi-member stream.
    """
    if len(data) < _GZIP_MIN_MEMBER_BYTES:
        raise ImageError(f"{role}: gzip stream is truncated or corrupt")
    declared = int.from_bytes(data[-4:], "little")
    if declared > limit:
        raise ImageError(
            f"{role}: gzip trailer declares {declared} bytes when decompressed, over the limit "
            f"of {limit} (or the upload was cut short)"
        )
    chunks: list[bytes] = []
    produced = 0
    remaining = bytes(data)
    while remaining:
        member = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            chunk = member.decompress(remaining, limit - produced + 1)
        except zlib.error as exc:
            raise ImageError(f"{role}: gzip stream is truncated or corrupt") from exc
        produced += len(chunk)
        if produced > limit:
            raise ImageError(f"{role}: decompresses to more than the limit of {limit} bytes")
        if not member.eof:
            raise ImageError(f"{role}: gzip stream is truncated or corrupt")
        chunks.append(chunk)
        remaining = member.unused_data
        if remaining[:2] != GZIP_MAGIC and remaining.strip(b"\x00"):
            raise ImageError(f"{role}: gzip stream is truncated or corrupt")
        if remaining[:2] != GZIP_MAGIC:
            break  # zero padding after the last member, as some tools write
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # no second copy of a one-member stream


def _parse_single_file_nifti(raw: bytes, *, role: str) -> nib.Nifti1Image:
    """Recognise the format by its signature, then let nibabel parse the header.

    Checking the signature first keeps arbitrary bytes away from nibabel's parser
    (and its log output). The image data stays a lazy proxy on the bytes.
    """
    image_class = _nifti_class(raw)
    if image_class is None:
        raise ImageError(f"{role}: not a NIfTI-1/2 file")
    try:
        return image_class.from_bytes(raw)
    except Exception as exc:  # nibabel raises many types on malformed headers
        raise ImageError(f"{role}: not a NIfTI-1/2 file") from exc


def _nifti_class(raw: bytes) -> type[nib.Nifti1Image] | None:
    if len(raw) < _NIFTI1_HEADER_BYTES:
        return None
    sizeof_hdr = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
    if _NIFTI1_HEADER_BYTES in sizeof_hdr and (
        raw[_NIFTI1_MAGIC_OFFSET : _NIFTI1_MAGIC_OFFSET + 4] == _NIFTI1_SINGLE_FILE_MAGIC
    ):
        return nib.Nifti1Image
    if _NIFTI2_HEADER_BYTES in sizeof_hdr and raw[4:8] == _NIFTI2_SINGLE_FILE_MAGIC:
        return nib.Nifti2Image
    return None


def _check_voxel_size(raw: bytes, image: nib.Nifti1Image, *, role: str) -> None:
    """Refuse a zero voxel size where it gives the geometry (no sform): nibabel would
    silently read it as 1 mm. Read from the raw header, before nibabel's repair."""
    if image.header.get_sform(coded=True)[1] != 0:
        return
    order = "<" if int.from_bytes(raw[:4], "little") in (_NIFTI1_HEADER_BYTES, _NIFTI2_HEADER_BYTES) else ">"
    if isinstance(image, nib.Nifti2Image):
        pixdim = np.frombuffer(raw[104:168], dtype=f"{order}f8")
    else:
        pixdim = np.frombuffer(raw[76:108], dtype=f"{order}f4")
    if np.any(pixdim[1:4] == 0):
        raise ImageError(f"{role}: voxel size (pixdim) is zero and no sform gives the geometry")


def _volume_shape(header: nib.Nifti1Header, *, role: str) -> tuple[int, int, int]:
    """The 3D shape, allowing trailing singleton dimensions (e.g. a one-frame 4D file)."""
    shape = tuple(int(n) for n in header.get_data_shape())
    if any(n < 0 for n in shape):
        raise ImageError(f"{role}: image has a negative dimension")
    if any(n == 0 for n in shape) or not shape:
        raise ImageError(f"{role}: image is empty")
    effective = list(shape)
    while len(effective) > 3 and effective[-1] == 1:
        effective.pop()
    if len(effective) != 3:
        raise ImageError(
            f"{role}: image is {len(effective)}D; a 3D volume is required "
            "(a trailing dimension of size 1 is allowed)"
        )
    i, j, k = effective
    return i, j, k


def _check_declared_size(
    header: nib.Nifti1Header, *, available: int, role: str, limit: int
) -> None:
    """Refuse before reading voxels if the header promises more data than allowed or present."""
    dtype = header.get_data_dtype()
    if dtype.kind not in _REAL_DTYPE_KINDS or dtype.fields is not None:
        raise ImageError(f"{role}: voxel type is not a real number type")
    voxel_bytes = math.prod(int(n) for n in header.get_data_shape()) * dtype.itemsize
    if voxel_bytes > limit:
        raise ImageError(
            f"{role}: header declares {voxel_bytes} bytes of voxel data, over the limit of {limit}"
        )
    offset = int(header.get_data_offset())
    if offset < 0 or offset + voxel_bytes > available:
        raise ImageError(
            f"{role}: header declares {voxel_bytes} bytes of voxel data "
            f"but the file holds only {max(available - max(offset, 0), 0)}"
        )


def _voxels(image: nib.Nifti1Image, shape: tuple[int, int, int], *, role: str) -> np.ndarray:
    try:
        array = image.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as exc:  # nibabel/numpy errors on inconsistent headers
        raise ImageError(f"{role}: voxel data cannot be read") from exc
    array = np.ascontiguousarray(array.reshape(shape))
    non_finite = int(array.size - np.count_nonzero(np.isfinite(array)))
    if non_finite:
        raise ImageError(f"{role}: {non_finite} voxels are NaN or infinite")
    return array


def _affine(image: nib.Nifti1Image, *, role: str) -> np.ndarray:
    """nibabel's best affine (sform, else qform, else pixdim), checked to be a sane geometry:
    finite, invertible, voxel edges within ``SPACING_RANGE_MM``, placed within ``MAX_WORLD_MM``."""
    affine = np.asarray(image.affine, dtype=np.float64)
    if (
        affine.shape != (4, 4)
        or not np.all(np.isfinite(affine))
        or not abs(np.linalg.det(affine[:3, :3])) > _MIN_AFFINE_DETERMINANT
    ):
        raise ImageError(f"{role}: affine is singular or not finite")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    low, high = SPACING_RANGE_MM
    if not np.all((spacing >= low) & (spacing <= high)):
        raise ImageError(
            f"{role}: affine gives voxel spacing {[float(f'{v:.6g}') for v in spacing]} mm, outside {low}-{high} mm"
        )
    corners = np.array([[0, 0, 0], np.asarray(image.shape[:3]) - 1], dtype=np.float64)
    if np.abs(corners @ affine[:3, :3].T + affine[:3, 3]).max() > MAX_WORLD_MM:
        raise ImageError(f"{role}: image lies more than {MAX_WORLD_MM:g} mm from the world origin")
    return affine
