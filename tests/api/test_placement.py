"""With no centre, the service finds the tumour on a whole-body PET/CT and says where and why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.engine.loading import load_engine
from service.imaging.nifti import write_nifti
from service.science.phantoms import PhantomCase
from service.science.wholebody import make_whole_body_case
from service.settings import Settings


@pytest.fixture(scope="module")
def whole_body() -> PhantomCase:
    return make_whole_body_case(11, scale=2.0)


def _tumour_centre(case: PhantomCase) -> np.ndarray:
    voxels = np.argwhere(case.gtvt > 0).mean(axis=0)
    return np.asarray(voxels @ case.ct_affine[:3, :3].T + case.ct_affine[:3, 3])


@pytest.mark.slow  # a whole-body phantom through the whole service (tests/imaging/test_localise.py is the fast check)
def test_a_whole_body_upload_without_centre_gets_a_window_on_the_tumour(
    tiny_weights: Path, whole_body: PhantomCase
) -> None:
    engine = load_engine(Settings(weights=tiny_weights, device="cpu", torch_threads=1, autocast="off"))
    settings = Settings(device="cpu", max_upload_mb=64, max_image_mb=512)
    files = {
        "ct": ("ct.nii.gz", write_nifti(whole_body.ct.astype(np.int16), whole_body.ct_affine)),
        "pet": ("pt.nii.gz", write_nifti(whole_body.pet.astype(np.float32), whole_body.pet_affine)),
    }
    with TestClient(create_app(settings, engine)) as client:
        created = client.post("/v1/sessions", files=files)
        assert created.status_code == 201, created.text
        body = created.json()
        placement = body["placement"]
        assert placement["candidates"] and "head-and-neck band" in placement["reason"]
        grid = body["grid"]
        low = np.asarray(grid["origin_mm"])
        high = low + grid["spacing_mm"] * (np.asarray(grid["shape"]) - 1)
        tumour = _tumour_centre(whole_body)
        assert np.all(tumour >= low) and np.all(tumour <= high), (tumour, low, high)
        assert client.get(f"/v1/sessions/{body['id']}").json()["placement"] == placement

        given = client.post("/v1/sessions", files=files, data={"centre": ",".join(str(v) for v in tumour)})
        assert given.status_code == 201
        assert given.json()["placement"]["reason"] == "the centre given with the request"
