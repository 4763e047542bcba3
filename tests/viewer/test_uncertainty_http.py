"""The ensemble's disagreement over HTTP, and the viewer's files, from the app in process."""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def client(tiny_weights: Path) -> Iterator[TestClient]:
    settings = Settings(weights=tiny_weights, device="cpu", redis_url=None, api_keys=None)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _votes(response_content: bytes) -> np.ndarray:
    image = nib.Nifti1Image.from_bytes(gzip.decompress(response_content))
    return np.asarray(image.dataobj)


def test_every_version_has_its_disagreement_and_a_suggestion_inside_it(
    client: TestClient, ct_pet_files: dict[str, Path]
) -> None:
    files = {role: (path.name, path.read_bytes()) for role, path in (("ct", ct_pet_files["ct"]), ("pet", ct_pet_files["pet"]))}
    created = client.post("/v1/sessions", files=files)
    assert created.status_code == 201, created.text
    session = created.json()
    summary = session["uncertainty"]
    assert summary["members"] == 5

    answer = client.get(f"/v1/sessions/{session['id']}/uncertainty")
    assert answer.status_code == 200
    votes = _votes(answer.content)
    assert votes.shape == tuple(session["grid"]["shape"]) and votes.max() <= 5
    split = (votes > 0) & (votes < 5)
    assert int(split.sum()) == summary["uncertain_voxels"]
    assert summary["uncertain_ml"] == pytest.approx(split.sum() * session["grid"]["spacing_mm"] ** 3 / 1000)
    click = summary["suggested_click"]
    if split.any():
        assert split[tuple(click["voxel"])], "the suggestion is not where the members disagree"
        affine = np.asarray(session["grid"]["affine"])
        np.testing.assert_allclose(click["world_mm"], affine[:3, :3] @ click["voxel"] + affine[:3, 3])
    else:
        assert click is None

    clicked = client.post(
        f"/v1/sessions/{session['id']}/clicks",
        json={"clicks": [{"label": click["label"], "voxel": click["voxel"]}] if click else
              [{"label": "foreground", "voxel": [16, 16, 16]}]},
        headers={"If-Match": '"0"'},
    )
    assert clicked.status_code == 200, clicked.text
    after = _votes(client.get(f"/v1/sessions/{session['id']}/uncertainty").content)
    voxel = tuple(clicked.json()["clicks"][0]["voxel"])
    assert after[voxel] in (0, 5), "the members count as agreed where the user clicked"

    undone = client.post(f"/v1/sessions/{session['id']}/undo")
    assert undone.json()["uncertainty"] == summary  # the undo restores version 0's disagreement too
    np.testing.assert_array_equal(_votes(client.get(f"/v1/sessions/{session['id']}/uncertainty").content), votes)


def test_uncertainty_of_an_unknown_session_is_a_problem(client: TestClient) -> None:
    answer = client.get("/v1/sessions/no-such-session/uncertainty")
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("application/problem+json")


def test_the_viewer_page_and_everything_it_loads_come_from_the_service(client: TestClient) -> None:
    page = client.get("/viewer", follow_redirects=True)
    assert page.status_code == 200 and "data-testid=\"view\"" in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(not re.match(r"^(https?:)?//", asset) for asset in assets), assets
    modules = [client.get(f"/viewer/{name}") for name in ("viewer.js", "api.js", "volumes.js", "cache.js")]
    imports = {name for module in modules for name in re.findall(r'from "\./([^"]+)"', module.text)}
    assert "vendor/niivue/niivue.js" in imports
    for name in imports | {"viewer.css", "vendor/niivue/LICENSE"}:
        answer = client.get(f"/viewer/{name}")
        assert answer.status_code == 200, name
    bundle = client.get("/viewer/vendor/niivue/niivue.js")
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert b"class Niivue" in bundle.content or b"Niivue" in bundle.content[-4000:]
