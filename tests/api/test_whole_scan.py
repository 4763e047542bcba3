"""Whole-scan sessions over HTTP: clicks anywhere in the CT move the working window, the session keeps
every window, the border rule extends a mask cut by its window, and the original-space mask covers them all.

The networks are real MONAI UNets whose weights make a known output (every weight zero, the last
bias +-8: a sigmoid of about 1 or 0 everywhere), so each window's content is known exactly; the CT is
on a 1 mm grid aligned with the session lattice, so the original-space mask is the lattice's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from service.api.app import create_app
from service.engine.checkpoints import write_checkpoint
from service.engine.loading import load_engine
from service.engine.networks import INITIAL_CHANNELS, REFINEMENT_CHANNELS, Architecture, build_unet
from service.engine.worker import Worker
from service.imaging.grid import WorkingGrid, lattice_extent, preprocess, world_box
from service.imaging.nifti import write_nifti
from service.imaging.scan import Scan, encode_scan
from service.imaging.volume import Volume
from service.settings import Settings
from service.store.codec import encode_array
from service.store.contract import Extent, Job, OutcomeStatus, SessionRecord
from service.store.memory_backend import MemoryStore
from tests.api.test_sessions_http import decode_mask, nifti

ARCHITECTURE = Architecture(channels=(4, 8, 16), strides=(1, 2), num_res_units=1)
WINDOW = 32
CT_SHAPE = (32, 32, 160)  # x, y one window wide; z five windows long (1 mm voxels)
CT_AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
FIRST_CENTRE = (15.5, 15.5, 79.5)  # the first window: CT voxels (0..31, 0..31, 64..95)


def _constant(channels: int, logit: float) -> torch.nn.Module:
    unet = build_unet(channels, ARCHITECTURE)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.zero_()
        list(unet.parameters())[-1].fill_(logit)
    return unet


def _weights(directory: Path, initial: float, refinement: float, zero_click_passes: int = 0) -> Path:
    stages = {
        "initial": [_constant(INITIAL_CHANNELS, initial) for _ in range(5)],
        "refinement": [_constant(REFINEMENT_CHANNELS, refinement) for _ in range(5)],
    }
    write_checkpoint(directory, stages, architecture=ARCHITECTURE, grid_shape=(WINDOW,) * 3, spacing_mm=1.0,
                     zero_click_passes=zero_click_passes, description="constant test weights")
    return directory


@pytest.fixture(scope="module")
def scan_files() -> dict[str, tuple[str, bytes]]:
    rng = np.random.default_rng(3)
    ct = rng.normal(40, 20, CT_SHAPE).astype(np.int16)
    pet = rng.gamma(2.0, 0.5, CT_SHAPE).astype(np.float32)
    return {"ct": ("ct.nii.gz", write_nifti(ct, CT_AFFINE)), "pet": ("pt.nii.gz", write_nifti(pet, CT_AFFINE))}


@pytest.fixture(scope="module")
def all_tumour(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both stages say foreground everywhere."""
    return _weights(tmp_path_factory.mktemp("all-tumour"), 8.0, 8.0)


@pytest.fixture(scope="module")
def tumour_then_background(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The initial stage says foreground everywhere, the refinement background everywhere."""
    return _weights(tmp_path_factory.mktemp("tumour-then-background"), 8.0, -8.0)


def _client(weights: Path, border_passes: int) -> Iterator[TestClient]:
    settings = Settings(weights=weights, device="cpu", autocast="off", border_passes=border_passes,
                        max_upload_mb=16, max_image_mb=64)
    with TestClient(create_app(settings, load_engine(settings))) as client:
        yield client


@pytest.fixture(scope="module")
def tumour_client(all_tumour: Path) -> Iterator[TestClient]:
    yield from _client(all_tumour, border_passes=1)


@pytest.fixture(scope="module")
def moving_client(tumour_then_background: Path) -> Iterator[TestClient]:
    yield from _client(tumour_then_background, border_passes=0)


def _create(client: TestClient, files: dict[str, tuple[str, bytes]]) -> dict:
    created = client.post("/v1/sessions", files=files, data={"centre": ",".join(str(v) for v in FIRST_CENTRE)})
    assert created.status_code == 201, created.text
    return created.json()


def _original(client: TestClient, session_id: str) -> np.ndarray:
    return nifti(client.get(f"/v1/sessions/{session_id}/mask", params={"space": "original"})).get_fdata() > 0


def test_a_mask_reaching_its_window_border_gets_the_window_extended(
    tumour_client: TestClient, scan_files: dict[str, tuple[str, bytes]]
) -> None:
    body = _create(tumour_client, scan_files)
    assert body["extent"]["low"] == [0, 0, -64] and body["extent"]["high"] == [31, 31, 95]
    # a full mask reaches both z faces (the CT goes on there, not in x and y): one window more, half a window down,
    # under the first, which stays the one the answer shows
    assert body["window"] == {**body["grid"], "offset": [0, 0, 0], "windows": 2}
    original = _original(tumour_client, body["id"])
    expected = np.zeros(CT_SHAPE, dtype=bool)
    expected[:, :, 48:96] = True
    assert np.array_equal(original, expected)
    assert body["summary"]["voxels"] == int(expected.sum())
    assert body["summary"]["bbox_min"] == [0, 0, -16] and body["summary"]["bbox_max"] == [31, 31, 31]


def test_a_click_anywhere_in_the_ct_moves_the_window_and_the_session_keeps_both(
    moving_client: TestClient, scan_files: dict[str, tuple[str, bytes]]
) -> None:
    body = _create(moving_client, scan_files)
    sid = body["id"]
    assert body["window"]["windows"] == 1 and decode_mask(body["mask"]).all()
    # a foreground click 60 mm below the first window, where no window has been: answered, and honoured
    far = {"label": "foreground", "world_mm": [10.0, 20.0, 5.0]}
    passes = _passes()
    moved = moving_client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [far]})
    assert moved.status_code == 200, moved.text
    assert tuple(_passes() - passes) == (1, 1)  # the initial ensemble for the new window's memory, then the refinement
    result = moved.json()
    window = result["window"]
    assert window["offset"] == [0, 0, -64] and window["windows"] == 2  # z 0..31 mm, inside the CT
    assert window["origin_mm"] == [0.0, 0.0, 0.0]
    assert result["clicks"][0]["voxel"] == [10, 20, -59]
    mask = decode_mask(result["mask"])
    assert mask[10, 20, 5]  # the click's voxel, in the window's own indices
    original = _original(moving_client, sid)
    assert original[10, 20, 5]
    # the refinement said background everywhere in the new window but at the clicked voxel;
    # the first window (z 64..95) keeps its mask
    assert original[:, :, 64:96].all()
    assert int(original[:, :, :32].sum()) == int(mask.sum()) == 1  # the clicked voxel, which the guarantee sets
    assert not original[:, :, 32:64].any()
    assert result["summary"]["voxels"] == int(original.sum())
    # a probability and a working-space mask on the current window
    working = nifti(moving_client.get(f"/v1/sessions/{sid}/mask"))
    np.testing.assert_allclose(working.affine, np.asarray(window["affine"]))
    assert np.array_equal(working.get_fdata() > 0, mask)
    assert moving_client.get(f"/v1/sessions/{sid}").json()["window"] == window

    # back in the first window: refined there (memory: its stored probability), the far click is kept
    passes = _passes()
    back = moving_client.post(f"/v1/sessions/{sid}/clicks",
                              json={"clicks": [{"label": "background", "world_mm": [15.0, 15.0, 79.0]}]})
    assert back.status_code == 200, back.text
    assert tuple(_passes() - passes) == (0, 1)  # a window the session holds: one refinement pass
    assert back.json()["window"]["offset"] == [0, 0, 0] and back.json()["window"]["windows"] == 2
    original = _original(moving_client, sid)
    assert int(original.sum()) == int(original[:, :, :32].sum()) == 1 and original[10, 20, 5]

    # undo restores the two-window state of the first click exactly
    undone = moving_client.post(f"/v1/sessions/{sid}/undo")
    assert undone.status_code == 200 and undone.json()["window"] == window
    assert np.array_equal(_original(moving_client, sid)[:, :, 64:96], np.ones((32, 32, 32), dtype=bool))


@pytest.fixture(scope="module")
def still_client(all_tumour: Path) -> Iterator[TestClient]:
    yield from _client(all_tumour, border_passes=0)


def _click(client: TestClient, session_id: str, label: str, ct_z_mm: float) -> dict:
    answer = client.post(f"/v1/sessions/{session_id}/clicks",
                         json={"clicks": [{"label": label, "world_mm": [16.0, 16.0, ct_z_mm]}]})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_click_in_new_territory_adds_no_tumour_that_nobody_asked_for(
    still_client: TestClient, scan_files: dict[str, tuple[str, bytes]]
) -> None:
    # the networks say tumour everywhere; the first window (CT z 64..95) is all tumour
    sid = _create(still_client, scan_files)["id"]
    # a background click 59 mm below it: its new window (z 0..31) is all tumour to the networks, but a
    # background click only removes: none of it is added
    far = _click(still_client, sid, "background", 5.0)
    assert far["window"]["offset"] == [0, 0, -64] and not decode_mask(far["mask"]).any()
    original = _original(still_client, sid)
    assert original[:, :, 64:96].all() and not original[:, :, :64].any()
    assert far["summary"]["voxels"] == 32**3
    # a foreground click between the two asks for the tumour it is in: its new window (z 30..61) is added,
    # also where it overlaps the last window (z 30, 31)
    asked = _click(still_client, sid, "foreground", 45.0)
    assert asked["window"]["offset"] == [0, 0, -34] and decode_mask(asked["mask"]).all()
    original = _original(still_client, sid)
    assert original[:, :, 30:62].all() and original[:, :, 64:96].all()
    assert not original[:, :, :30].any() and not original[:, :, 62:64].any()  # z 62, 63: no window reaches

    # in a new session, a background click on the tumour near the first window's edge: its new window
    # (z 50..81) is all tumour to the networks, but nothing is added; the tumour loses the clicked voxel
    sid = _create(still_client, scan_files)["id"]
    near = _click(still_client, sid, "background", 65.0)
    assert near["window"]["offset"] == [0, 0, -14]
    assert int(decode_mask(near["mask"]).sum()) == 32 * 32 * 18 - 1  # z 64..81 of the window, the click aside
    assert int(_original(still_client, sid).sum()) == 32**3 - 1
    # a foreground click there asks for the tumour: the networks' tumour joins the session's
    grown = _click(still_client, sid, "foreground", 50.0)
    assert grown["window"]["offset"] == [0, 0, -29]
    assert int(_original(still_client, sid).sum()) == 32 * 32 * (96 - 35) - 1


def test_a_not_tumour_click_in_the_core_of_an_object_removes_it_and_a_tumour_click_asks_for_it_again(
    still_client: TestClient, scan_files: dict[str, tuple[str, bytes]]
) -> None:
    # the networks say tumour everywhere; the first window (CT z 64..95) is one object, all tumour
    sid = _create(still_client, scan_files)["id"]
    removed = _click(still_client, sid, "background", 80.0)  # in its middle
    assert removed["window"]["offset"] == [0, 0, 0] and not decode_mask(removed["mask"]).any()
    assert removed["summary"]["voxels"] == 0 and not _original(still_client, sid).any()
    asked = _click(still_client, sid, "foreground", 70.0)
    mask = decode_mask(asked["mask"])
    assert int(mask.sum()) == 32**3 - 1 and not mask[16, 16, 16]  # all of it but the "not tumour" voxel
    # an object holding a "tumour" click is not removed by a "not tumour" click inside it
    kept = _click(still_client, sid, "background", 85.0)
    assert int(decode_mask(kept["mask"]).sum()) == 32**3 - 2


def test_a_window_a_click_moves_to_keeps_the_session_mask_the_click_does_not_touch(moving_client: TestClient) -> None:
    # a CT a window and a half long in x; the first window (x 0..31) is all tumour (the initial stage)
    rng = np.random.default_rng(5)
    shape = (48, 32, 32)
    files = {"ct": ("ct.nii.gz", write_nifti(rng.normal(40, 20, shape).astype(np.int16), CT_AFFINE)),
             "pet": ("pt.nii.gz", write_nifti(rng.gamma(2.0, 0.5, shape).astype(np.float32), CT_AFFINE))}
    created = moving_client.post("/v1/sessions", files=files, data={"centre": "15.5,15.5,15.5"})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    # a background click at the CT's far end, where there is no tumour: its window (x 16..47, kept inside the
    # CT) overlaps the first one and the refinement says background all over it, but the click touches no
    # tumour, so the session's mask stays as it was
    moved = moving_client.post(f"/v1/sessions/{sid}/clicks",
                               json={"clicks": [{"label": "background", "world_mm": [46, 16, 16]}]})
    assert moved.status_code == 200, moved.text
    assert moved.json()["window"]["offset"] == [16, 0, 0]
    expected = np.zeros(shape, dtype=bool)
    expected[:32] = True
    assert np.array_equal(_original(moving_client, sid), expected)
    # a background click on the tumour in that window: the tumour it touches becomes what the refinement
    # says (background) in the window (x 16..47); beyond it (x 0..15) it stays
    on = moving_client.post(f"/v1/sessions/{sid}/clicks",
                            json={"clicks": [{"label": "background", "world_mm": [29, 16, 16]}]})
    assert on.status_code == 200, on.text
    assert on.json()["window"]["offset"] == [16, 0, 0]
    expected[16:] = False
    assert np.array_equal(_original(moving_client, sid), expected)


def _passes(kind: str = "refine") -> np.ndarray:
    """(initial, refinement) passes the engine ran for jobs of ``kind`` so far, from its Prometheus counter."""
    return np.array([REGISTRY.get_sample_value("icr_engine_passes_total", {"kind": kind, "stage": stage}) or 0.0
                     for stage in ("initial", "refinement")])


def test_the_checkpoints_zero_click_passes_make_every_first_mask_and_memory(
    tmp_path: Path, scan_files: dict[str, tuple[str, bytes]]
) -> None:
    # the initial stage says tumour everywhere, the refinement background everywhere; one zero-click pass
    weights = _weights(tmp_path / "settled", 8.0, -8.0, zero_click_passes=1)
    for client in _client(weights, border_passes=0):
        created_before = _passes("initial")
        body = _create(client, scan_files)
        assert tuple(_passes("initial") - created_before) == (1, 1)
        assert not decode_mask(body["mask"]).any()  # the first mask is the refinement's, not the initial ensemble's
        assert body["summary"]["volume_ml"] == 0
        # a click where no window has been: its memory is that window's first mask, made the same way
        passes = _passes()
        far = {"label": "background", "world_mm": [10.0, 20.0, 5.0]}
        moved = client.post(f"/v1/sessions/{body['id']}/clicks", json={"clicks": [far]})
        assert moved.status_code == 200, moved.text
        assert tuple(_passes() - passes) == (1, 2)
        assert not _original(client, body["id"]).any()


def test_a_click_or_centre_outside_the_ct_is_refused_with_its_extent(
    moving_client: TestClient, scan_files: dict[str, tuple[str, bytes]]
) -> None:
    body = _create(moving_client, scan_files)
    outside = moving_client.post(f"/v1/sessions/{body['id']}/clicks",
                                 json={"clicks": [{"label": "foreground", "world_mm": [10.0, 20.0, 170.0]}]})
    assert outside.status_code == 422
    assert "outside the CT, which spans x -0.5 to 31.5, y -0.5 to 31.5, z -0.5 to 159.5 mm" in outside.json()["detail"]
    assert moving_client.get(f"/v1/sessions/{body['id']}").json()["version"] == 0
    wrong_frame = moving_client.post("/v1/sessions", files=scan_files, data={"centre": "-15.5,-15.5,79.5"})
    assert wrong_frame.status_code == 422 and "lies outside the CT" in wrong_frame.json()["detail"]


def test_the_border_rule_right_after_creation_waits_for_the_scan_being_stored(all_tumour: Path) -> None:
    """The API stores the scan while the initial pass runs; an extension window needs it."""
    rng = np.random.default_rng(3)
    ct = Volume(rng.normal(40, 20, CT_SHAPE).astype(np.int16).astype(np.float32), CT_AFFINE)
    pet = Volume(rng.gamma(2.0, 0.5, CT_SHAPE).astype(np.float32), CT_AFFINE)
    grid = WorkingGrid.around(FIRST_CENTRE, (WINDOW,) * 3, 1.0)
    low, high = lattice_extent(ct, grid)
    world_low, world_high = world_box(ct)
    record = SessionRecord(
        id="s", owner=None, grid=grid.to_dict(), original_shape=CT_SHAPE, original_affine=tuple(map(tuple, CT_AFFINE)),
        created_at=time.time(),
        extent=Extent(tuple(low), tuple(high), tuple(world_low), tuple(world_high)).to_dict(),  # type: ignore[arg-type]
    )
    store = MemoryStore(session_ttl_s=600)
    store.create_session(record, encode_array(preprocess(ct, pet, grid).astype(np.float16)))
    worker = Worker(load_engine(Settings(weights=all_tumour, device="cpu", autocast="off")), store, store, border_passes=1)
    late = threading.Timer(0.5, store.store_scan, args=("s", encode_scan(Scan(ct, pet))))
    late.start()
    outcome = worker.process(Job(id="j", session_id="s", kind="initial", base_version=-1))
    late.join()
    assert outcome.status is OutcomeStatus.DONE
    assert [w.offset for w in store.get_version("s", 0).windows] == [(0, 0, -16), (0, 0, 0)]
