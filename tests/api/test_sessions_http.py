"""The HTTP contract, end to end, in both modes (embedded; Redis + worker)."""

from __future__ import annotations

import base64
import gzip
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch

from service.engine.fastpath import autocast_dtype, precision_name
from tests.api.conftest import API_KEYS, Service


def create(client: httpx.Client, files: dict[str, Path], **data: str) -> httpx.Response:
    return client.post(
        "/v1/sessions",
        files={"ct": ("ct.nii.gz", files["ct"].read_bytes()), "pet": ("pet.nii.gz", files["pet"].read_bytes())},
        data=data,
    )


def decode_mask(wire: dict) -> np.ndarray:
    """What the README tells a client to do."""
    packed = np.frombuffer(zlib.decompress(base64.b64decode(wire["data"])), dtype=np.uint8)
    return np.unpackbits(packed, count=int(np.prod(wire["shape"]))).reshape(wire["shape"]).astype(bool)


def nifti(response: httpx.Response) -> nib.Nifti1Image:
    assert response.status_code == 200, response.text
    return nib.Nifti1Image.from_bytes(gzip.decompress(response.content))


@pytest.fixture
def session(service: Service, ct_pet_files: dict[str, Path]) -> tuple[Service, httpx.Client, dict]:
    client = service.client()
    response = create(client, ct_pet_files)
    assert response.status_code == 201, response.text
    return service, client, response.json()


def test_create_returns_initial_mask_and_geometry(session: tuple[Service, httpx.Client, dict]) -> None:
    _, client, body = session
    assert body["version"] == 0
    assert len(body["id"]) >= 32  # 192 random bits, url-safe base64
    assert body["grid"]["shape"] == [32, 32, 32]
    assert body["grid"]["spacing_mm"] == 1.0
    assert body["original"]["shape"] == [48, 44, 20]
    mask = decode_mask(body["mask"])
    assert mask.shape == (32, 32, 32)
    assert body["window"]["offset"] == [0, 0, 0] and body["window"]["affine"] == body["grid"]["affine"]
    # the summary covers every window of the session (the border rule may have added one)
    if body["window"]["windows"] == 1:
        assert body["summary"]["voxels"] == int(mask.sum())
    else:
        assert body["summary"]["voxels"] >= int(mask.sum())
    assert body["summary"]["volume_ml"] == pytest.approx(body["summary"]["voxels"] / 1000, abs=1e-3)
    state = client.get(f"/v1/sessions/{body['id']}").json()
    assert state["version"] == 0 and state["clicks"] == []


def test_default_centre_is_the_overlap_centre_and_centre_is_honoured(
    service: Service, ct_pet_files: dict[str, Path]
) -> None:
    client = service.client()
    default = create(client, ct_pet_files).json()["grid"]
    centred = create(client, ct_pet_files, centre="10,-5,3").json()["grid"]
    middle = np.asarray(centred["origin_mm"]) + 15.5 * centred["spacing_mm"]
    np.testing.assert_allclose(middle, [10, -5, 3], atol=1e-6)
    assert default["origin_mm"] != centred["origin_mm"]


def test_click_refines_and_undo_restores_exactly(session: tuple[Service, httpx.Client, dict]) -> None:
    _, client, body = session
    sid = body["id"]
    before = nifti(client.get(f"/v1/sessions/{sid}/probability")).get_fdata()
    first = client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [{"label": "foreground", "voxel": [16, 16, 16]}]})
    assert first.status_code == 200, first.text
    assert first.json()["version"] == 1
    assert first.json()["clicks"][0]["voxel"] == [16, 16, 16]
    world = first.json()["clicks"][0]["world_mm"]
    second = client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [{"label": "background", "world_mm": world}]})
    assert second.json()["version"] == 2
    assert [c["label"] for c in second.json()["clicks"]] == ["foreground", "background"]
    assert second.json()["clicks"][1]["voxel"] == [16, 16, 16]
    after_two = nifti(client.get(f"/v1/sessions/{sid}/probability")).get_fdata()
    assert not np.array_equal(after_two, before)

    undone = client.post(f"/v1/sessions/{sid}/undo")
    assert undone.status_code == 200
    assert undone.json()["version"] == 3
    assert [c["label"] for c in undone.json()["clicks"]] == ["foreground"]
    assert undone.json()["mask"] == first.json()["mask"]
    undone_again = client.post(f"/v1/sessions/{sid}/undo").json()
    assert undone_again["clicks"] == [] and undone_again["mask"] == body["mask"]
    np.testing.assert_array_equal(nifti(client.get(f"/v1/sessions/{sid}/probability")).get_fdata(), before)
    nothing_left = client.post(f"/v1/sessions/{sid}/undo")
    assert nothing_left.status_code == 409
    assert nothing_left.headers["content-type"] == "application/problem+json"


def test_idempotent_retry_is_applied_once(session: tuple[Service, httpx.Client, dict]) -> None:
    _, client, body = session
    sid = body["id"]
    request = {"clicks": [{"label": "foreground", "voxel": [10, 12, 14]}]}
    headers = {"Idempotency-Key": "click-0001"}
    with ThreadPoolExecutor(2) as pool:  # a retry racing the original
        answers = list(pool.map(lambda _: client.post(f"/v1/sessions/{sid}/clicks", json=request, headers=headers), range(2)))
    assert [a.status_code for a in answers] == [200, 200]
    assert {a.json()["version"] for a in answers} == {1}
    again = client.post(f"/v1/sessions/{sid}/clicks", json=request, headers=headers)
    assert again.json()["version"] == 1 and again.json()["mask"] == answers[0].json()["mask"]
    state = client.get(f"/v1/sessions/{sid}").json()
    assert state["version"] == 1 and len(state["clicks"]) == 1


def test_if_match(session: tuple[Service, httpx.Client, dict]) -> None:
    _, client, body = session
    sid = body["id"]
    click = {"clicks": [{"label": "background", "voxel": [1, 2, 3]}]}
    ok = client.post(f"/v1/sessions/{sid}/clicks", json=click, headers={"If-Match": '"0"'})
    assert ok.status_code == 200 and ok.headers["ETag"] == '"1"'
    stale = client.post(f"/v1/sessions/{sid}/clicks", json=click, headers={"If-Match": '"0"'})
    assert stale.status_code == 412
    assert "version 1" in stale.json()["detail"]
    assert client.get(f"/v1/sessions/{sid}").json()["version"] == 1


def test_mask_in_original_space_has_the_ct_geometry(
    session: tuple[Service, httpx.Client, dict], ct_pet_files: dict[str, Path]
) -> None:
    _, client, body = session
    sid = body["id"]
    ct = nib.load(ct_pet_files["ct"])
    original = nifti(client.get(f"/v1/sessions/{sid}/mask", params={"space": "original"}))
    assert original.shape == ct.shape
    np.testing.assert_allclose(original.affine, ct.affine, atol=1e-5)
    assert original.get_data_dtype() == np.uint8
    assert set(np.unique(original.get_fdata())) <= {0.0, 1.0}
    working = nifti(client.get(f"/v1/sessions/{sid}/mask"))
    assert working.shape == (32, 32, 32)
    np.testing.assert_allclose(working.affine, np.asarray(body["window"]["affine"]), atol=1e-5)
    assert np.array_equal(working.get_fdata() > 0, decode_mask(body["mask"]))


def test_delete_then_gone(session: tuple[Service, httpx.Client, dict]) -> None:
    _, client, body = session
    sid = body["id"]
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    for response in (
        client.get(f"/v1/sessions/{sid}"),
        client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [{"label": "foreground", "voxel": [1, 1, 1]}]}),
        client.get(f"/v1/sessions/{sid}/mask"),
        client.delete(f"/v1/sessions/{sid}"),
    ):
        assert response.status_code == 410
        assert response.headers["content-type"] == "application/problem+json"


def test_unknown_session_is_404(service: Service) -> None:
    response = service.client().get("/v1/sessions/not-a-session")
    assert response.status_code == 404
    assert response.json()["type"] == "urn:icr:problem:session-not-found"


def test_api_keys_guard_sessions(keyed_service: Service, ct_pet_files: dict[str, Path]) -> None:
    owner = keyed_service.client()
    sid = create(owner, ct_pet_files).json()["id"]
    anonymous = keyed_service.client({})
    assert anonymous.get(f"/v1/sessions/{sid}").status_code == 401
    assert create(anonymous, ct_pet_files).status_code == 401
    wrong = keyed_service.client({"Authorization": "Bearer nope"})
    assert wrong.get(f"/v1/sessions/{sid}").status_code == 401
    other = keyed_service.client({"Authorization": f"Bearer {API_KEYS[1]}"})
    for response in (
        other.get(f"/v1/sessions/{sid}"),
        other.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [{"label": "foreground", "voxel": [1, 1, 1]}]}),
        other.get(f"/v1/sessions/{sid}/mask"),
        other.delete(f"/v1/sessions/{sid}"),
    ):
        assert response.status_code == 404
    assert owner.get(f"/v1/sessions/{sid}").json()["version"] == 0


def test_health_and_openapi(service: Service) -> None:
    client = service.client()
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["workers"] >= 1 and ready["store"] == "ok"
    # the default precision: bfloat16 on CPUs with bfloat16 instructions, float32 elsewhere
    assert ready["precision"] == [precision_name(autocast_dtype("auto", torch.device("cpu")))]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/sessions", "/v1/sessions/{session_id}/clicks", "/v1/sessions/{session_id}/undo"} <= set(paths)
