"""Hostile and broken input: a 4xx problem+json naming the problem, and no session changed."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from tests.api.conftest import Service

SECRET_NAME = "Doe-Jane-1961-private.nii.gz"
SECRET_HEADER = "SECRET-HEADER-TEXT"


def _nifti_bytes(array: np.ndarray, affine: np.ndarray, description: str = "") -> bytes:
    image = nib.Nifti1Image(array, np.eye(4))
    image.set_qform(None, code=0)
    with np.errstate(over="ignore"):  # float32 srows: 1e307 becomes inf, as in a hostile file
        image.set_sform(affine, code=1)  # the sform holds any affine, a singular one too
    if description:
        image.header["descrip"] = description.encode()
    return gzip.compress(image.to_bytes())


def _gzip_bomb(decompressed_mb: int) -> bytes:
    """A valid gzip stream of zeros, built in chunks so the test never holds it expanded."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    parts = [compressor.compress(chunk) for _ in range(decompressed_mb)]
    return b"".join(parts) + compressor.flush()


def _bad_uploads(files: dict[str, Path]) -> dict[str, tuple[dict[str, bytes], int, str]]:
    ct = files["ct"].read_bytes()
    pet = files["pet"].read_bytes()
    affine = nib.load(files["ct"]).affine
    ct_array = np.asarray(nib.load(files["ct"]).dataobj).astype(np.float32)
    with_nan = ct_array.copy()
    with_nan[3, 4, 5] = np.nan
    singular = affine.copy()
    singular[:3, 2] = 0
    far_away = affine.copy()
    far_away[:3, 3] += 5000.0
    huge_spacing = np.diag([1e30, 1e30, 1e30, 1.0])
    far_origin = affine.copy()
    far_origin[:3, 3] = 1e30
    overflowing = np.diag([1e307, 1e307, 1e307, 1.0])
    no_transform = nib.Nifti1Image(ct_array, None)
    no_transform.set_qform(None, code=0)
    no_transform.set_sform(None, code=0)
    zero_pixdim = bytearray(no_transform.to_bytes())
    zero_pixdim[80:92] = np.zeros(3, "<f4").tobytes()  # pixdim[1:4] of the NIfTI-1 header
    extreme = np.full((6, 6, 6), -3.0e38, np.float32)
    extreme[2:4, 2:4, 2:4] = 3.0e38
    corrupt = bytearray(ct)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = bytes(64)
    return {
        "not nifti": ({"ct": b"this is not an image" * 50, "pet": pet}, 422, "ct: not a NIfTI"),
        "truncated gzip": ({"ct": ct, "pet": pet[: len(pet) // 2]}, 422, "pet:"),
        "corrupt gzip": ({"ct": bytes(corrupt), "pet": pet}, 422, "ct: gzip"),
        "gzip bomb": ({"ct": _gzip_bomb(64), "pet": pet}, 422, "over the limit"),
        "4d image": ({"ct": _nifti_bytes(np.zeros((8, 8, 8, 3), np.float32), affine), "pet": pet}, 422, "4D"),
        "2d image": ({"ct": _nifti_bytes(np.zeros((8, 8), np.float32), affine), "pet": pet}, 422, "ct:"),
        "nan voxels": ({"ct": _nifti_bytes(with_nan, affine), "pet": pet}, 422, "NaN"),
        "inf voxels": ({"ct": ct, "pet": _nifti_bytes(np.full((6, 6, 6), np.inf, np.float32), np.eye(4))}, 422, "pet:"),
        "singular affine": ({"ct": _nifti_bytes(ct_array, singular), "pet": pet}, 422, "affine"),
        "no overlap": ({"ct": _nifti_bytes(ct_array, far_away), "pet": pet}, 422, "do not overlap"),
        "over upload limit": ({"ct": np.random.default_rng(0).bytes(3 * 2**20), "pet": pet}, 413, "limit"),
        "huge spacing": ({"ct": _nifti_bytes(ct_array, huge_spacing), "pet": pet}, 422, "spacing"),
        "far origin": ({"ct": _nifti_bytes(ct_array, far_origin), "pet": _nifti_bytes(ct_array, far_origin)},
                       422, "from the world origin"),
        "affine 1e307": ({"ct": _nifti_bytes(ct_array, overflowing), "pet": _nifti_bytes(ct_array, overflowing)},
                         422, "affine"),
        "zero pixdim": ({"ct": gzip.compress(bytes(zero_pixdim)), "pet": pet}, 422, "pixdim"),
        "overflowing pet": ({"ct": ct, "pet": _nifti_bytes(extreme, np.diag([8.0, 8.0, 8.0, 1.0]))}, 422, "extreme"),
    }


BAD_UPLOAD_IDS = [
    "not nifti", "truncated gzip", "corrupt gzip", "gzip bomb", "4d image", "2d image", "nan voxels",
    "inf voxels", "singular affine", "no overlap", "over upload limit", "huge spacing", "far origin", "affine 1e307",
    "zero pixdim", "overflowing pet",
]


def _problem(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert words in body["detail"], body["detail"]


@pytest.mark.parametrize("case", BAD_UPLOAD_IDS)
def test_bad_upload_is_refused(service: Service, ct_pet_files: dict[str, Path], case: str) -> None:
    uploads, status, words = _bad_uploads(ct_pet_files)[case]
    client = service.client()
    response = client.post(
        "/v1/sessions",
        files={role: (SECRET_NAME, payload) for role, payload in uploads.items()},
    )
    _problem(response, status, words)


def test_missing_file_and_bad_centre(service: Service, ct_pet_files: dict[str, Path]) -> None:
    client = service.client()
    only_ct = client.post("/v1/sessions", files={"ct": ("ct.nii.gz", ct_pet_files["ct"].read_bytes())})
    _problem(only_ct, 422, "pet")
    files = {role: (f"{role}.nii.gz", path.read_bytes()) for role, path in ct_pet_files.items()}
    _problem(client.post("/v1/sessions", files=files, data={"centre": "1,2"}), 422, "centre")
    _problem(client.post("/v1/sessions", files=files, data={"centre": "1,nan,2"}), 422, "centre")
    # a centre outside the CT (for example LPS taken for RAS, or a typo) is refused with the CT's extent
    far = client.post("/v1/sessions", files=files, data={"centre": "10000,10000,10000"})
    _problem(far, 422, "lies outside the CT, which spans x")
    assert far.json()["type"] == "urn:icr:problem:invalid-centre"


def test_bad_clicks_leave_the_session_untouched(service: Service, ct_pet_files: dict[str, Path]) -> None:
    client = service.client()
    files = {role: (f"{role}.nii.gz", path.read_bytes()) for role, path in ct_pet_files.items()}
    created = client.post("/v1/sessions", files=files).json()
    sid = created["id"]
    url = f"/v1/sessions/{sid}/clicks"
    beyond = [created["extent"]["high"][0] + 1, *created["extent"]["low"][1:]]
    before = [created["extent"]["low"][0] - 1, *created["extent"]["low"][1:]]
    _problem(client.post(url, json={"clicks": [{"label": "foreground", "voxel": beyond}]}), 422, "clicks[0]")
    _problem(client.post(url, json={"clicks": [{"label": "foreground", "voxel": before}]}), 422, "outside the CT")
    _problem(
        client.post(url, json={"clicks": [{"label": "background", "voxel": [1, 1, 1]},
                                          {"label": "foreground", "world_mm": [900.0, 0.0, 0.0]}]}),
        422, "clicks[1] at world_mm [900.0, 0.0, 0.0] lies outside the CT, which spans x ",
    )
    _problem(client.post(url, json={"clicks": [{"label": "tumour", "voxel": [1, 1, 1]}]}), 422, "label")
    _problem(client.post(url, json={"clicks": [{"label": "foreground"}]}), 422, "exactly one")
    _problem(client.post(url, json={"clicks": [{"label": "foreground", "voxel": [1, 1, 1], "world_mm": [0, 0, 0]}]}),
             422, "exactly one")
    _problem(client.post(url, json={"clicks": []}), 422, "clicks")
    _problem(client.post(url, content=b'{"clicks": [', headers={"content-type": "application/json"}), 422, "JSON")
    _problem(client.post(url, json={"clicks": [{"label": "foreground", "voxel": [1.5, 1, 1]}]}), 422, "voxel")
    huge = b'{"clicks": [' + b'{"label": "foreground", "voxel": [1, 1, 1]},' * 20000 + b"]}"
    _problem(client.post(url, content=huge, headers={"content-type": "application/json"}), 413, "limit")
    state = client.get(f"/v1/sessions/{sid}").json()
    assert state["version"] == 0 and state["clicks"] == []
    mask = client.get(f"/v1/sessions/{sid}/mask")
    assert mask.status_code == 200


def test_logs_hold_no_file_names_or_header_text(service: Service, ct_pet_files: dict[str, Path]) -> None:
    client = service.client()
    ct = nib.load(ct_pet_files["ct"])
    labelled = _nifti_bytes(np.asarray(ct.dataobj).astype(np.float32), ct.affine, SECRET_HEADER)
    client.post("/v1/sessions", files={"ct": (SECRET_NAME, labelled), "pet": (SECRET_NAME, ct_pet_files["pet"].read_bytes())})
    client.post("/v1/sessions", files={"ct": (SECRET_NAME, b"garbage " + SECRET_HEADER.encode()), "pet": (SECRET_NAME, b"x")})
    text = service.log_text()
    assert "session" in text  # the log is being written
    assert SECRET_NAME not in text
    assert SECRET_HEADER not in text
