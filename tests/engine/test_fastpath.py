"""Fast paths against the exact path: local click maps, windowed refinement, device settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from service.engine import fastpath
from service.engine.checkpoints import load_checkpoint, write_checkpoint
from service.engine.clicks import check_reach, click_maps, reference_click_maps
from service.engine.ensemble import Engine, Ensemble
from service.engine.fastpath import (
    WindowPlan,
    autocast_dtype,
    cudnn_autotuning,
    inference,
)
from service.engine.loading import load_engine
from service.engine.networks import (
    INITIAL_CHANNELS,
    REFINEMENT_CHANNELS,
    Architecture,
    build_unet,
)
from service.science.dataset import find_cases, prepare_case
from service.science.metrics import dice
from service.settings import DEMO_WEIGHTS, Settings
from service.store.contract import Click

TINY = Architecture(channels=(4, 8, 16), strides=(1, 2), num_res_units=1)
CPU = torch.device("cpu")


def _random_clicks(rng: np.random.Generator, shape: tuple[int, int, int], n: int) -> list[Click]:
    labels = ("foreground", "background")
    return [Click(labels[int(rng.integers(2))], tuple(int(rng.integers(s)) for s in shape)) for _ in range(n)]  # type: ignore[misc]


# ------------------------------------------------------------------ click maps


@pytest.mark.parametrize("sigma", [3.0, 1.5, 5.0])
def test_click_maps_equal_monai_reference_click_maps(sigma: float) -> None:
    rng = np.random.default_rng(int(sigma * 10))
    shape = (40, 33, 27)
    for n in (1, 2, 5, 12):
        clicks = _random_clicks(rng, shape, n)
        np.testing.assert_allclose(click_maps(clicks, shape, sigma), reference_click_maps(clicks, shape, sigma), atol=1e-6)


def test_click_maps_at_borders_overlaps_and_repeats() -> None:
    shape = (24, 24, 24)
    clicks = [
        Click("foreground", (0, 0, 0)), Click("foreground", (23, 23, 23)), Click("foreground", (0, 23, 11)),
        Click("foreground", (5, 5, 5)), Click("foreground", (6, 5, 5)),  # overlapping balls add up
        Click("background", (12, 12, 12)), Click("background", (12, 12, 12)),  # a repeated voxel is one delta
    ]
    np.testing.assert_allclose(click_maps(clicks, shape, 3.0), reference_click_maps(clicks, shape, 3.0), atol=1e-6)


@pytest.mark.parametrize("sigma", [3.0, 1.5])
def test_max_overlap_click_maps_equal_monai_filtering_each_click_alone(sigma: float) -> None:
    rng = np.random.default_rng(int(sigma * 7))
    shape = (30, 26, 22)
    for n in (1, 3, 8):
        clicks = _random_clicks(rng, shape, n)
        np.testing.assert_allclose(click_maps(clicks, shape, sigma, "max"),
                                   reference_click_maps(clicks, shape, sigma, "max"), atol=1e-6)


def test_with_max_overlap_a_cluster_of_clicks_does_not_dim_a_lone_click() -> None:
    """DeepEdit's sum: three background clicks a voxel apart make the peak, and the lone
    background click scales down to about 0.35; with "max" every click peaks at 1,
    and one click's map is the same either way."""
    shape = (32, 32, 32)
    lone = Click("background", (25, 25, 25))
    cluster = [Click("background", (5, 5, 5)), Click("background", (6, 5, 5)), Click("background", (5, 6, 5))]
    summed = click_maps([*cluster, lone], shape, 3.0)[1]
    kept = click_maps([*cluster, lone], shape, 3.0, "max")[1]
    assert summed[lone.voxel] < 0.45 and summed[cluster[0].voxel] == pytest.approx(1.0)
    assert all(kept[c.voxel] == pytest.approx(1.0) for c in [*cluster, lone])
    np.testing.assert_allclose(click_maps([lone], shape, 3.0), click_maps([lone], shape, 3.0, "max"))
    with pytest.raises(ValueError, match="click overlap must be one of sum, max"):
        click_maps([lone], shape, 3.0, "mean")


@pytest.mark.parametrize("overlap", ["sum", "max"])
def test_click_maps_with_a_reach_equal_monai_filtering_at_both_sigmas(overlap: str) -> None:
    rng = np.random.default_rng(11)
    shape = (34, 28, 30)
    for reach in ({"foreground": 3.0}, {"foreground": 3.0, "background": 4.5}, {"background": 1.0}):
        for n in (1, 4, 10):
            clicks = _random_clicks(rng, shape, n)
            np.testing.assert_allclose(click_maps(clicks, shape, 1.5, overlap, reach),
                                       reference_click_maps(clicks, shape, 1.5, overlap, reach), atol=1e-6)


def test_a_reach_widens_a_signs_balls_and_keeps_their_peak_at_the_click() -> None:
    """A lone click with a reach peaks at 1 and falls as the mean of the two Gaussians (each peaking at 1);
    the sign without a reach keeps the narrow ball alone."""
    shape = (25, 25, 25)
    clicks = [Click("foreground", (12, 12, 12)), Click("background", (12, 12, 4))]
    maps = click_maps(clicks, shape, 1.5, "sum", {"foreground": 3.0})
    narrow = click_maps(clicks, shape, 1.5)
    for d in range(5):
        expected = (np.exp(-d * d / (2 * 1.5**2)) + np.exp(-d * d / (2 * 3.0**2))) / 2
        assert maps[0][12, 12, 12 + d] == pytest.approx(expected, abs=0.02)  # MONAI's erf kernel, not exp
    assert maps[0][12, 12, 12] == pytest.approx(1.0) and maps[0][12, 12, 16] > narrow[0][12, 12, 16] + 0.1
    np.testing.assert_array_equal(maps[1], narrow[1])
    for reach in ({"tumour": 3.0}, {"foreground": 0.0}, {"foreground": float("nan")}, {"foreground": "3"}):
        with pytest.raises(ValueError, match="reach"):
            check_reach(reach)  # type: ignore[arg-type]


def test_click_maps_cover_the_whole_volume_when_balls_do() -> None:
    """A ball wider than the volume: the minimum is no longer 0, and min-max scaling must match."""
    shape = (6, 7, 5)
    clicks = [Click("foreground", (2, 3, 1)), Click("background", (5, 6, 4)), Click("background", (0, 0, 0))]
    np.testing.assert_allclose(click_maps(clicks, shape, 3.0), reference_click_maps(clicks, shape, 3.0), atol=1e-6)
    assert not click_maps([], shape, 3.0).any()


# ------------------------------------------------------------------ window geometry


def test_window_keeps_a_centred_aligned_fixed_size_box_around_the_click() -> None:
    plan = WindowPlan(size=32, margin=8, align=8)
    window = plan.around([(50, 60, 70)], (144, 144, 144))
    assert window is not None
    for axis, box in enumerate(window.inputs):
        assert box.stop - box.start == 32 and box.start % 8 == 0
        kept = window.kept[axis]
        assert (kept.start, kept.stop) == (box.start + 8, box.stop - 8)
        assert kept.start <= (50, 60, 70)[axis] < kept.stop


def test_window_is_shifted_inwards_at_the_border_and_keeps_up_to_it() -> None:
    plan = WindowPlan(size=32, margin=8, align=8)
    window = plan.around([(0, 143, 70)], (144, 144, 144))
    assert window is not None
    assert (window.inputs[0].start, window.inputs[0].stop) == (0, 32)
    assert (window.kept[0].start, window.kept[0].stop) == (0, 24)  # no margin where the volume ends
    assert (window.inputs[1].start, window.inputs[1].stop) == (112, 144)
    assert (window.kept[1].start, window.kept[1].stop) == (120, 144)


def test_window_grows_to_cover_several_clicks() -> None:
    plan = WindowPlan(size=32, margin=8, align=8)
    clicks = [(40, 40, 40), (60, 45, 40)]
    window = plan.around(clicks, (144, 144, 144))
    assert window is not None
    for voxel in clicks:
        assert all(k.start <= v < k.stop for k, v in zip(window.kept, voxel))
    assert window.inputs[0].stop - window.inputs[0].start == 56  # 20 apart + 32, rounded up to 8


def test_no_window_when_it_would_hold_most_of_the_volume_or_there_is_no_click() -> None:
    plan = WindowPlan(size=64, margin=8, align=8)
    assert plan.around([(10, 10, 10)], (64, 64, 64)) is None
    assert plan.around([(5, 5, 5), (70, 70, 70)], (80, 80, 80)) is None
    assert plan.around([], (144, 144, 144)) is None
    assert WindowPlan(size=16, margin=2, align=8).around([(3, 3, 3)], (36, 36, 36)) is None  # 36 is off the lattice


def test_window_plan_rounds_up_and_refuses_windows_without_a_centre() -> None:
    assert WindowPlan(size=60, margin=8, align=8).size == 64
    with pytest.raises(ValueError, match="too small"):
        WindowPlan(size=32, margin=12, align=8)


# ------------------------------------------------------------------ windowed refinement


def _engine(members: list[torch.nn.Module], *, window: int | None, margin: int, align: int) -> Engine:
    engine = Engine.__new__(Engine)
    engine.checkpoint = type("C", (), {"click_encoding": (3.0, "sum"), "grid_shape": (32, 32, 32)})()  # type: ignore[assignment]
    engine.device = CPU
    engine.refinement = Ensemble(members, CPU)  # type: ignore[arg-type]
    engine.window_plan = None if window is None else WindowPlan(window, margin, align)
    return engine


def _inputs(shape: tuple[int, int, int] = (32, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return rng.normal(size=(2, *shape)).astype(np.float32), rng.random(shape).astype(np.float32)


def test_windowed_refinement_equals_the_exact_pass_for_a_network_that_sees_less_than_the_margin() -> None:
    """Norm-free networks whose receptive field fits in the margin: the kept centre is the exact result."""
    torch.manual_seed(1)
    local = torch.nn.Sequential(torch.nn.Conv3d(5, 4, 3, padding=1), torch.nn.PReLU(), torch.nn.Conv3d(4, 1, 3, padding=1))
    strided = UNet(spatial_dims=3, in_channels=5, out_channels=1, channels=(4, 8), strides=(2,), num_res_units=0, norm=None)
    images, previous = _inputs((48, 48, 48))
    clicks = [Click("foreground", (9, 20, 15))]
    for net, align in ((local.eval(), 1), (strided.eval(), 2)):
        exact = _engine([net], window=None, margin=8, align=align).refine(images, previous, clicks)
        windowed_engine = _engine([net], window=16 + 2 * 8, margin=8, align=align)
        windowed = windowed_engine.refine(images, previous, clicks)
        window = windowed_engine.window_plan.around([clicks[0].voxel], previous.shape)  # type: ignore[union-attr]
        assert window is not None
        np.testing.assert_allclose(windowed[window.kept], exact[window.kept], atol=1e-5)
        outside = np.ones(previous.shape, dtype=bool)
        outside[window.kept] = False
        np.testing.assert_array_equal(windowed[outside], previous[outside])  # the memory is kept elsewhere


def test_a_window_as_large_as_the_volume_is_the_exact_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stages = {
        "initial": [build_unet(INITIAL_CHANNELS, TINY) for _ in range(2)],
        "refinement": [build_unet(REFINEMENT_CHANNELS, TINY) for _ in range(2)],
    }
    write_checkpoint(tmp_path, stages, architecture=TINY, grid_shape=(32, 32, 32))
    exact = Engine(load_checkpoint(tmp_path), CPU)
    covering = Engine(load_checkpoint(tmp_path), CPU, refine_window=32, refine_margin=4)
    images, previous = _inputs()
    clicks = [Click("foreground", (16, 16, 16)), Click("background", (3, 30, 8))]
    np.testing.assert_array_equal(covering.refine(images, previous, clicks), exact.refine(images, previous, clicks))
    np.testing.assert_array_equal(covering.initial_probability(images), exact.initial_probability(images))


def test_the_window_follows_the_new_clicks_only() -> None:
    seen: list[tuple[int, ...]] = []

    class Shape(torch.nn.Module):
        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(batch.shape[2:]))
            return torch.zeros(batch.shape[0], 1, *batch.shape[2:])

    engine = _engine([Shape()], window=16, margin=4, align=2)
    images, previous = _inputs()
    clicks = [Click("foreground", (2, 2, 2)), Click("background", (29, 29, 29))]
    engine.refine(images, previous, clicks, new_clicks=1)
    engine.refine(images, previous, clicks)  # unknown: every click, here the whole volume
    assert seen == [(16, 16, 16), (32, 32, 32)]


# ------------------------------------------------------------------ settings and devices


def test_autocast_dtype_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    assert autocast_dtype("off", cuda) is None and autocast_dtype(None, CPU) is None
    assert autocast_dtype("float16", cuda) is torch.float16
    assert autocast_dtype("bfloat16", cuda) is torch.bfloat16
    assert autocast_dtype("bfloat16", CPU) is torch.bfloat16
    assert autocast_dtype("auto", cuda) is None  # CUDA stays exact unless asked
    monkeypatch.setattr(fastpath, "cpu_has_bfloat16", lambda: True)
    assert autocast_dtype("auto", CPU) is torch.bfloat16
    monkeypatch.setattr(fastpath, "cpu_has_bfloat16", lambda: False)
    assert autocast_dtype("auto", CPU) is None  # bfloat16 without the instructions is many times slower
    with pytest.raises(ValueError, match="float16 autocast needs CUDA"):
        autocast_dtype("float16", CPU)
    with pytest.raises(ValueError, match="unknown autocast"):
        autocast_dtype("int8", CPU)


def test_cpu_bfloat16_rewrite_computes_the_same_function() -> None:
    torch.manual_seed(3)
    net = UNet(3, 5, 1, channels=(4, 8, 16), strides=(1, 2), num_res_units=2).eval()
    affine = torch.nn.InstanceNorm3d(4, affine=True)
    torch.nn.init.normal_(affine.weight)
    torch.nn.init.normal_(affine.bias)
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.InstanceNorm3d, torch.nn.ConvTranspose3d))]
    assert any(isinstance(m, torch.nn.ConvTranspose3d) and m.stride == (1, 1, 1) for m in layers)
    rewritten = fastpath.for_cpu_bfloat16(net)
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in rewritten.modules())
    assert not any(isinstance(m, torch.nn.ConvTranspose3d) and m.stride == (1, 1, 1) for m in rewritten.modules())
    assert [m for m in net.modules() if isinstance(m, (torch.nn.InstanceNorm3d, torch.nn.ConvTranspose3d))] == layers
    x = torch.randn(1, 5, 24, 24, 24)
    with torch.inference_mode():
        expected = net(x)
        assert rewritten(x.contiguous(memory_format=torch.channels_last_3d)).is_contiguous(
            memory_format=torch.channels_last_3d)
        np.testing.assert_allclose(rewritten.to(memory_format=torch.contiguous_format)(x), expected, atol=1e-5)
        y = torch.randn(2, 4, 6, 6, 6)
        norm = fastpath.for_cpu_bfloat16(affine)
        assert isinstance(norm, fastpath.ChannelNorm)
        np.testing.assert_allclose(norm(y), affine(y), atol=1e-5)


@pytest.mark.slow  # the shipped demo networks at their full 64^3 grid, three float32 passes
def test_bfloat16_on_cpu_stays_within_its_stated_error(phantom_data: Path) -> None:
    """One trained demo member per stage on a phantom: bfloat16 (channels-last) against float32.

    Stated tolerance (docs/performance.md): probabilities within 0.02, masks Dice >= 0.99.
    """
    checkpoint = load_checkpoint(DEMO_WEIGHTS)
    case = prepare_case(find_cases(phantom_data)[0], checkpoint.grid_shape, checkpoint.spacing_mm)
    truth = np.argwhere(case.truth)
    click = Click("foreground", tuple(int(v) for v in truth[len(truth) // 2]))  # type: ignore[arg-type]
    guidance = click_maps([click], case.truth.shape, checkpoint.click_sigma_voxels)
    previous = Ensemble(checkpoint.stages["initial"][:1], CPU).probability(case.images)
    inputs = {"initial": case.images, "refinement": np.concatenate([case.images, previous[None], guidance], axis=0)}
    for stage, stage_inputs in inputs.items():
        exact = Ensemble(checkpoint.stages[stage][:1], CPU)
        fast = Ensemble(checkpoint.stages[stage][:1], CPU, torch.bfloat16)
        assert fast.memory_format is torch.channels_last_3d and exact.memory_format is torch.contiguous_format
        # the initial stage's exact answer is the refinement's memory, computed above
        reference = previous if stage == "initial" else exact.probability(stage_inputs)
        lowered = fast.probability(stage_inputs)
        assert lowered.dtype == np.float32
        assert 0 < np.abs(lowered - reference).max() <= 0.02  # it does compute in bfloat16, and stays close
        assert dice(lowered > 0.5, reference > 0.5) >= 0.99
        assert np.count_nonzero(reference > 0.5) > 1000  # a real mask, not an empty one


def test_device_settings_are_scoped_to_the_pass() -> None:
    before = torch.backends.cudnn.benchmark
    with cudnn_autotuning(not before):
        assert torch.backends.cudnn.benchmark is (not before)
    assert torch.backends.cudnn.benchmark is before
    with inference(CPU):
        assert torch.is_inference_mode_enabled()
    assert not torch.is_inference_mode_enabled()


def test_settings_turn_the_window_on_and_refuse_one_that_cannot_work(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("ICR_REFINE_WINDOW", "ICR_REFINE_MARGIN", "ICR_AUTOCAST"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().refine_window is None
    monkeypatch.setenv("ICR_WEIGHTS", str(tiny_weights))
    monkeypatch.setenv("ICR_DEVICE", "cpu")
    monkeypatch.setenv("ICR_AUTOCAST", "float16")
    with pytest.raises(RuntimeError, match="float16 autocast needs CUDA"):
        load_engine(Settings())
    monkeypatch.setenv("ICR_AUTOCAST", "bfloat16")
    assert load_engine(Settings()).precision == "bfloat16"
    monkeypatch.setenv("ICR_AUTOCAST", "off")
    assert load_engine(Settings()).window_plan is None
    monkeypatch.setenv("ICR_REFINE_WINDOW", "24")
    monkeypatch.setenv("ICR_REFINE_MARGIN", "4")
    engine = load_engine(Settings())
    assert engine.window_plan is not None and (engine.window_plan.size, engine.window_plan.margin) == (24, 4)
    assert engine.precision == "float32"
    monkeypatch.setenv("ICR_REFINE_MARGIN", "12")
    with pytest.raises(RuntimeError, match="too small"):
        load_engine(Settings())
