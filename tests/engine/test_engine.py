"""Click encoding, ensemble math, the memory input, and checkpoint verification."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.apps.deepgrow.transforms import AddGuidanceSignald

from service.engine.checkpoints import (
    CheckpointError,
    load_checkpoint,
    write_checkpoint,
)
from service.engine.clicks import click_balls, click_maps
from service.engine.ensemble import Engine, Ensemble
from service.engine.networks import (
    INITIAL_CHANNELS,
    REFINEMENT_CHANNELS,
    Architecture,
    build_unet,
)
from service.store.contract import Click

TINY = Architecture(channels=(4, 8, 16), strides=(1, 2), num_res_units=1)


def test_click_maps_are_monai_guidance_signals() -> None:
    clicks = [Click("foreground", (5, 6, 7)), Click("foreground", (12, 3, 9)), Click("background", (1, 14, 2))]
    ours = click_maps(clicks, (16, 16, 16), sigma=3.0)
    guidance = [[[5, 6, 7], [12, 3, 9]], [[1, 14, 2]]]
    monai = AddGuidanceSignald(image="image", guidance="guidance", sigma=3, number_intensity_ch=1)(
        {"image": np.zeros((1, 16, 16, 16), np.float32), "guidance": guidance}
    )["image"][1:]
    np.testing.assert_allclose(ours, monai, atol=1e-6)
    assert ours[0][5, 6, 7] == pytest.approx(1.0) and ours[1][1, 14, 2] == pytest.approx(1.0)
    assert ours.min() >= 0.0 and ours.max() <= 1.0


def test_a_sign_without_clicks_is_zero() -> None:
    maps = click_maps([Click("background", (3, 3, 3))], (8, 8, 8))
    assert not maps[0].any() and maps[1].max() == pytest.approx(1.0)
    assert not click_maps([], (8, 8, 8)).any()


def test_ensemble_probability_is_the_mean_of_member_sigmoids() -> None:
    torch.manual_seed(3)
    members = [build_unet(INITIAL_CHANNELS, TINY).eval() for _ in range(3)]
    inputs = np.random.default_rng(0).normal(size=(2, 12, 12, 12)).astype(np.float32)
    with torch.no_grad():
        expected = np.mean([torch.sigmoid(m(torch.from_numpy(inputs)[None]))[0, 0].numpy() for m in members], axis=0)
    np.testing.assert_allclose(Ensemble(members, torch.device("cpu")).probability(inputs), expected, atol=1e-6)


class _Probe(torch.nn.Module):
    """Records what it is given; answers logits 0 (probability 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.seen.append(batch.clone())
        return torch.zeros(batch.shape[0], 1, *batch.shape[2:])


def test_refinement_members_all_get_images_memory_and_every_click() -> None:
    probes = [_Probe(), _Probe()]
    engine = Engine.__new__(Engine)
    engine.checkpoint = type("C", (), {"click_encoding": (3.0, "sum"), "grid_shape": (8, 8, 8)})()
    engine.device = torch.device("cpu")
    engine.refinement = Ensemble(probes, engine.device)  # type: ignore[arg-type]
    images = np.random.default_rng(1).normal(size=(2, 8, 8, 8)).astype(np.float32)
    previous = np.random.default_rng(2).random((8, 8, 8)).astype(np.float32)
    clicks = [Click("foreground", (1, 2, 3)), Click("background", (6, 6, 6))]
    probability = engine.refine(images, previous, clicks)
    np.testing.assert_allclose(probability, 0.5)
    for probe in probes:
        (batch,) = probe.seen
        assert batch.shape == (1, REFINEMENT_CHANNELS, 8, 8, 8)
        np.testing.assert_allclose(batch[0, :2].numpy(), images)
        np.testing.assert_allclose(batch[0, 2].numpy(), previous)
        np.testing.assert_allclose(batch[0, 3:].numpy(), click_maps(clicks, (8, 8, 8)), atol=1e-6)


def _checkpoint(directory: Path) -> Path:
    torch.manual_seed(0)
    stages = {"initial": [build_unet(INITIAL_CHANNELS, TINY)], "refinement": [build_unet(REFINEMENT_CHANNELS, TINY)]}
    write_checkpoint(directory, stages, architecture=TINY, grid_shape=(16, 16, 16))
    return directory


def test_checkpoint_round_trip_keeps_weights(tmp_path: Path) -> None:
    loaded = load_checkpoint(_checkpoint(tmp_path))
    torch.manual_seed(0)
    original = build_unet(INITIAL_CHANNELS, TINY)
    for name, value in original.state_dict().items():
        torch.testing.assert_close(loaded.stages["initial"][0].state_dict()[name], value)
    assert loaded.grid_shape == (16, 16, 16) and loaded.method == "2s-icr"


def test_missing_corrupt_and_mismatched_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_checkpoint(tmp_path / "nowhere")
    directory = _checkpoint(tmp_path / "ok")
    member = directory / "refinement-0.pt"
    damaged = bytearray(member.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    member.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(directory)

    directory = _checkpoint(tmp_path / "wide")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["architecture"]["channels"] = [8, 16, 32]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(directory)

    (directory / "initial-0.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(directory)
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(directory)


def test_zero_click_passes_follow_the_initial_ensemble_and_live_in_the_manifest(tmp_path: Path) -> None:
    torch.manual_seed(0)
    initial, refinement = build_unet(INITIAL_CHANNELS, TINY).eval(), build_unet(REFINEMENT_CHANNELS, TINY).eval()
    stages = {"initial": [initial], "refinement": [refinement]}
    write_checkpoint(tmp_path / "two", stages, architecture=TINY, grid_shape=(16, 16, 16), zero_click_passes=2)
    loaded = load_checkpoint(tmp_path / "two")
    assert loaded.zero_click_passes == 2
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 16)).astype(np.float32)
    no_clicks = np.zeros((2, 16, 16, 16), np.float32)
    with torch.no_grad():
        expected = torch.sigmoid(initial(torch.from_numpy(images)[None]))[0, 0].numpy()
        for _ in range(2):
            inputs = np.concatenate([images, expected[None], no_clicks])
            expected = torch.sigmoid(refinement(torch.from_numpy(inputs)[None]))[0, 0].numpy()
    first = Engine(loaded, torch.device("cpu")).initial_pass(images)
    np.testing.assert_allclose(first.probability, expected, atol=1e-5)
    assert np.array_equal(first.votes, expected > 0.5)

    # absent, the paper's method: the initial ensemble alone
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    del manifest["zero_click_passes"]
    (tmp_path / "two" / "manifest.json").write_text(json.dumps(manifest))
    plain = load_checkpoint(tmp_path / "two")
    assert plain.zero_click_passes == 0
    np.testing.assert_allclose(Engine(plain, torch.device("cpu")).initial_probability(images),
                               torch.sigmoid(initial(torch.from_numpy(images)[None]))[0, 0].detach().numpy(), atol=1e-5)
    for bad in (-1, 5, 1.0, "1", None):
        (tmp_path / "two" / "manifest.json").write_text(json.dumps({**manifest, "zero_click_passes": bad}))
        with pytest.raises(CheckpointError, match="zero_click_passes must be an integer 0-4"):
            load_checkpoint(tmp_path / "two")
    with pytest.raises(ValueError, match="zero_click_passes"):
        write_checkpoint(tmp_path / "unet", {"initial": [initial]}, method="unet", architecture=TINY,
                         grid_shape=(16, 16, 16), zero_click_passes=1)
    assert not (tmp_path / "unet").exists()


def test_the_manifests_click_overlap_is_what_the_refinement_sees(tmp_path: Path) -> None:
    torch.manual_seed(0)
    initial, refinement = build_unet(INITIAL_CHANNELS, TINY).eval(), build_unet(REFINEMENT_CHANNELS, TINY).eval()
    stages = {"initial": [initial], "refinement": [refinement]}
    write_checkpoint(tmp_path / "max", stages, architecture=TINY, grid_shape=(16, 16, 16), click_overlap="max")
    loaded = load_checkpoint(tmp_path / "max")
    assert loaded.click_overlap == "max"
    images = np.random.default_rng(1).normal(size=(2, 16, 16, 16)).astype(np.float32)
    previous = np.full((16, 16, 16), 0.3, np.float32)
    clicks = (Click("foreground", (3, 3, 3)), Click("foreground", (4, 3, 3)), Click("foreground", (12, 12, 12)))

    def expected(overlap: str) -> np.ndarray:
        inputs = np.concatenate([images, previous[None], click_maps(clicks, (16, 16, 16), 3.0, overlap)])
        with torch.no_grad():
            return torch.sigmoid(refinement(torch.from_numpy(inputs)[None]))[0, 0].numpy()

    refined = Engine(loaded, torch.device("cpu")).refine(images, previous, clicks)
    np.testing.assert_allclose(refined, expected("max"), atol=1e-5)
    assert np.abs(expected("max") - expected("sum")).max() > 1e-3  # the two encodings differ for these clicks

    manifest = json.loads((tmp_path / "max" / "manifest.json").read_text())
    del manifest["click_overlap"]  # absent: DeepEdit's sum, as every checkpoint written before the field
    (tmp_path / "max" / "manifest.json").write_text(json.dumps(manifest))
    np.testing.assert_allclose(Engine(load_checkpoint(tmp_path / "max"), torch.device("cpu")).refine(
        images, previous, clicks), expected("sum"), atol=1e-5)
    (tmp_path / "max" / "manifest.json").write_text(json.dumps({**manifest, "click_overlap": "mean"}))
    with pytest.raises(CheckpointError, match="click_overlap must be one of sum, max"):
        load_checkpoint(tmp_path / "max")
    with pytest.raises(ValueError, match="click_overlap"):
        write_checkpoint(tmp_path / "bad", stages, architecture=TINY, grid_shape=(16, 16, 16), click_overlap="mean")


def test_the_manifests_click_reach_is_what_the_refinement_sees_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    refinement = build_unet(REFINEMENT_CHANNELS, TINY).eval()
    stages = {"initial": [build_unet(INITIAL_CHANNELS, TINY).eval()], "refinement": [refinement]}
    reach = {"foreground": 3.0}
    write_checkpoint(tmp_path / "reach", stages, architecture=TINY, grid_shape=(16, 16, 16), click_sigma_voxels=1.5,
                     click_reach_sigma_voxels=reach)
    loaded = load_checkpoint(tmp_path / "reach")
    assert loaded.click_encoding == (1.5, "sum", reach)
    images = np.random.default_rng(2).normal(size=(2, 16, 16, 16)).astype(np.float32)
    previous = np.full((16, 16, 16), 0.3, np.float32)
    clicks = (Click("foreground", (5, 6, 7)), Click("background", (11, 11, 11)))

    def expected(with_reach: dict[str, float]) -> np.ndarray:
        inputs = np.concatenate([images, previous[None], click_maps(clicks, (16, 16, 16), 1.5, "sum", with_reach)])
        with torch.no_grad():
            return torch.sigmoid(refinement(torch.from_numpy(inputs)[None]))[0, 0].numpy()

    np.testing.assert_allclose(Engine(loaded, torch.device("cpu")).refine(images, previous, clicks), expected(reach),
                               atol=1e-5)
    assert np.abs(expected(reach) - expected({})).max() > 1e-3  # the reach changes what the network sees

    manifest = json.loads((tmp_path / "reach" / "manifest.json").read_text())
    assert manifest["click_reach_sigma_voxels"] == reach
    write_checkpoint(tmp_path / "plain", stages, architecture=TINY, grid_shape=(16, 16, 16))
    assert "click_reach_sigma_voxels" not in json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert load_checkpoint(tmp_path / "plain").click_reach_sigma_voxels == {}  # absent: no reach, as before the field
    for bad in ({"tumour": 3.0}, {"foreground": 0}, {"background": "wide"}, [3.0]):
        (tmp_path / "reach" / "manifest.json").write_text(json.dumps({**manifest, "click_reach_sigma_voxels": bad}))
        with pytest.raises(CheckpointError, match="click_reach_sigma_voxels"):
            load_checkpoint(tmp_path / "reach")
    with pytest.raises(ValueError, match="reach"):
        write_checkpoint(tmp_path / "bad", stages, architecture=TINY, grid_shape=(16, 16, 16),
                         click_reach_sigma_voxels={"foreground": -1.0})
    assert not (tmp_path / "bad").exists()


def test_a_click_sigma_that_is_not_a_positive_number_is_refused_on_writing_and_loading(tmp_path: Path) -> None:
    stages = {"initial": [build_unet(INITIAL_CHANNELS, TINY)], "refinement": [build_unet(REFINEMENT_CHANNELS, TINY)]}
    write_checkpoint(tmp_path / "ok", stages, architecture=TINY, grid_shape=(16, 16, 16), click_sigma_voxels=1.5)
    assert load_checkpoint(tmp_path / "ok").click_sigma_voxels == 1.5
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    for bad in (0, -1.5, "nan"):
        (tmp_path / "ok" / "manifest.json").write_text(json.dumps({**manifest, "click_sigma_voxels": bad}))
        with pytest.raises(CheckpointError, match="click_sigma_voxels must be a number > 0"):
            load_checkpoint(tmp_path / "ok")
        with pytest.raises(ValueError, match="click_sigma_voxels"):
            write_checkpoint(tmp_path / "bad", stages, architecture=TINY, grid_shape=(16, 16, 16),
                             click_sigma_voxels=float(bad))
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # starts icr serve
def test_service_refuses_to_start_on_bad_weights(tmp_path: Path) -> None:
    env = {"ICR_WEIGHTS": str(tmp_path / "absent"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", "1"], check=False, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "cannot start" in result.stderr and "no manifest.json" in result.stderr


def test_click_balls_cover_the_voxels_near_each_click() -> None:
    balls = click_balls([Click("foreground", (4, 4, 4))], (9, 9, 9), 1.5)
    assert balls.sum() == 1 + 6 + 12 and balls[4, 4, 4] and not balls[5, 5, 5]  # distances 0, 1 and sqrt(2)
    corner = click_balls([Click("background", (0, 0, 0)), Click("foreground", (8, 8, 8))], (9, 9, 9), 1.0)
    assert corner.sum() == 2 * 4  # each ball cut by the volume's faces
    assert click_balls([Click("background", (2, 3, 4))], (6, 6, 6), 0.0).sum() == 1  # radius 0: the clicked voxel
    # clicks outside the volume: the part of their ball inside it, nothing where the ball does not reach
    outside = click_balls([Click("background", (-2, 4, 4)), Click("foreground", (-30, 4, 4))], (9, 9, 9), 2.0)
    assert outside.sum() == 1 and outside[0, 4, 4]
