"""DSC, HD95 (against hand values and MONAI), NoC/PoF, the Wilcoxon + BH test, clicks honoured, local DSC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage, stats

from service.science.metrics import (
    ball,
    benjamini_hochberg,
    clicks_honoured,
    dice,
    hd95,
    local_dice,
    noc_summary,
    number_of_clicks,
    wilcoxon_bh,
)
from service.store.contract import Click


def test_dice_hand_computed() -> None:
    pred = np.zeros((4, 4, 4), dtype=bool)
    truth = np.zeros_like(pred)
    pred[0, 0, 0:4] = True  # 4 voxels
    truth[0, 0, 1:4] = True
    truth[1, 0, 0:3] = True  # 6 voxels, 3 shared
    assert dice(pred, truth) == pytest.approx(2 * 3 / 10)
    assert dice(truth, truth) == 1.0
    assert dice(pred, np.zeros_like(pred)) == 0.0
    assert dice(np.zeros_like(pred), np.zeros_like(pred)) == 1.0


def _offset_cubes(axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Two 5-voxel cubes, the second shifted by 3 voxels along ``axis``."""
    a = np.zeros((12, 12, 12), dtype=bool)
    a[2:7, 2:7, 2:7] = True
    return a, np.roll(a, 3, axis=axis)


def test_hd95_offset_cubes_hand_computed() -> None:
    # Each 5^3 cube has 98 surface voxels. Shifted by 3 voxels of 2 mm, the directed
    # distances are: 6 mm x25, 4 mm x16, 2 mm x17, 1 mm x8 (the in-plane 1 mm spacing
    # reaches the side walls), 0 mm x32; both directions are mirror images.
    # Sorted, rank 0.95 * 97 = 92.15 falls among the 25 six-millimetre distances,
    # and the median (rank 48.5) among the 2 mm ones.
    first, second = _offset_cubes(axis=0)
    spacing = (2.0, 1.0, 1.0)
    assert hd95(first, second, spacing) == pytest.approx(6.0)
    assert hd95(first, second, spacing, percentile=50) == pytest.approx(2.0)
    first, second = _offset_cubes(axis=1)
    assert hd95(first, second, spacing) == pytest.approx(3.0)
    assert hd95(first, first, spacing) == 0.0


def test_hd95_empty_masks() -> None:
    first, _ = _offset_cubes(axis=0)
    empty = np.zeros_like(first)
    assert math.isinf(hd95(first, empty))
    assert math.isinf(hd95(empty, first))
    assert hd95(empty, empty) == 0.0


def _blob(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(size=shape), 2.5)
    return field > np.percentile(field, 88)


MONAI_EDGE_DEPRECATION = "ignore:.*always_return_as_numpy.*:FutureWarning"


@pytest.mark.filterwarnings(MONAI_EDGE_DEPRECATION)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_monai_on_random_blobs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred, truth = _blob(rng, (36, 32, 24)), _blob(rng, (36, 32, 24))
    spacing = (0.9, 1.3, 2.5)
    expected = compute_hausdorff_distance(
        torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None],
        include_background=True, percentile=95, directed=False, spacing=spacing,
    ).item()
    assert hd95(pred, truth, spacing) == pytest.approx(expected, abs=1e-3)


@pytest.mark.filterwarnings(MONAI_EDGE_DEPRECATION)
def test_hd95_mask_touching_the_border_matches_monai() -> None:
    rng = np.random.default_rng(5)
    pred = _blob(rng, (20, 20, 20))
    pred[0, :, :] = True
    truth = _blob(rng, (20, 20, 20))
    expected = compute_hausdorff_distance(
        torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None], include_background=True,
        percentile=95,
    ).item()
    assert hd95(pred, truth) == pytest.approx(expected, abs=1e-3)


def test_number_of_clicks_dsc_and_hd95() -> None:
    dsc_curve = [0.5, 0.7, 0.8, 0.9]
    assert number_of_clicks(dsc_curve, 0.75, higher_is_better=True) == 2
    assert number_of_clicks(dsc_curve, 0.85, higher_is_better=True) == 3
    assert number_of_clicks(dsc_curve, 0.5, higher_is_better=True) == 0
    assert number_of_clicks(dsc_curve, 0.95, higher_is_better=True) is None
    hd_curve = [8.0, 6.0, 5.0, 2.4]
    assert number_of_clicks(hd_curve, 5.0, higher_is_better=False) == 2
    assert number_of_clicks(hd_curve, 2.5, higher_is_better=False) == 3
    late = [0.1] * 21 + [0.9]  # reaches only at click 21
    assert number_of_clicks(late, 0.75, higher_is_better=True) is None
    assert number_of_clicks(late, 0.75, higher_is_better=True, max_clicks=21) == 21
    assert number_of_clicks([float("nan"), 0.8], 0.75, higher_is_better=True) == 1


def test_noc_summary_counts_failures_as_max_clicks() -> None:
    curves = [
        [0.6, 0.8, 0.9],  # 0.75 at 1, 0.85 at 2
        [0.5, 0.6, 0.7, 0.76, 0.86],  # 0.75 at 3, 0.85 at 4
        [0.2, 0.3, 0.4],  # never
    ]
    summary = noc_summary(curves, (0.75, 0.85), higher_is_better=True)
    assert summary[0.75]["noc_mean"] == pytest.approx((1 + 3 + 20) / 3)
    assert summary[0.85]["noc_mean"] == pytest.approx((2 + 4 + 20) / 3)
    assert summary[0.75]["noc_std"] == pytest.approx(np.std([1, 3, 20]))
    assert summary[0.75]["pof_percent"] == pytest.approx(100 / 3)
    assert summary[0.75]["failures"] == 1 and summary[0.75]["cases"] == 3
    hd = noc_summary([[6.0, 4.0, 2.0], [3.0, 3.0]], (5.0, 2.5), higher_is_better=False)
    assert hd[5.0] == pytest.approx({"noc_mean": 0.5, "noc_std": 0.5, "pof_percent": 0.0, "failures": 0.0,
                                     "cases": 2.0})
    assert hd[2.5]["noc_mean"] == pytest.approx((2 + 20) / 2) and hd[2.5]["pof_percent"] == 50.0


def test_benjamini_hochberg_by_hand() -> None:
    # sorted: 0.01, 0.03, 0.04, 0.20 -> x4/rank: 0.04, 0.06, 0.0533, 0.20 -> running min from the top
    adjusted = benjamini_hochberg([0.01, 0.04, 0.03, 0.20])
    np.testing.assert_allclose(adjusted, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.20])
    np.testing.assert_allclose(adjusted, stats.false_discovery_control([0.01, 0.04, 0.03, 0.20]))
    np.testing.assert_allclose(benjamini_hochberg([0.9, 0.8]), [0.9, 0.9])


def test_wilcoxon_bh_against_scipy_and_by_hand() -> None:
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.7, 0.9, 30)
    samples = {
        "2S-ICR": reference,
        "DeepGrow": reference - 0.05 + rng.normal(0, 0.01, 30),  # clearly worse
        "Same": reference.copy(),  # all-zero differences
        "Noise": reference + rng.normal(0, 0.02, 30),
    }
    result = wilcoxon_bh(samples, reference="2S-ICR")
    assert set(result) == {"DeepGrow", "Same", "Noise"}
    raw = {name: stats.wilcoxon(reference, samples[name]).pvalue for name in ("DeepGrow", "Noise")}
    raw["Same"] = 1.0
    for name, p in raw.items():
        assert result[name]["p_raw"] == pytest.approx(p)
    ordered = sorted(raw, key=raw.get)  # BH by hand: p_(i) * m / i, running minimum from the largest
    m = len(ordered)
    expected, running = {}, 1.0
    for rank in range(m, 0, -1):
        name = ordered[rank - 1]
        running = min(running, raw[name] * m / rank)
        expected[name] = running
    for name in raw:
        assert result[name]["p_adjusted"] == pytest.approx(expected[name])
        assert result[name]["p_adjusted"] >= result[name]["p_raw"]
    assert result["DeepGrow"]["significant"] is True
    assert result["Same"]["significant"] is False and result["Same"]["p_adjusted"] == 1.0
    assert result["DeepGrow"]["median_difference"] > 0


def test_wilcoxon_bh_rejects_unpaired_samples() -> None:
    with pytest.raises(ValueError):
        wilcoxon_bh({"a": np.ones(5), "b": np.ones(4)}, reference="a")
    with pytest.raises(KeyError):
        wilcoxon_bh({"a": np.ones(5)}, reference="z")


# ---------------------------------------------------------------- interaction measures


def test_clicks_honoured_by_hand() -> None:
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[1, 1, 1] = True
    clicks = [Click("foreground", (1, 1, 1)), Click("foreground", (0, 0, 0)),
              Click("background", (2, 2, 2)), Click("background", (1, 1, 1))]
    assert clicks_honoured(mask, clicks).tolist() == [True, False, True, False]
    assert clicks_honoured(mask.astype(np.float32) * 0.6, clicks[:1]).tolist() == [True]  # probabilities at 0.5
    assert clicks_honoured(mask, []).tolist() == []


def test_ball_counts_and_clipping() -> None:
    box, inside = ball((9, 9, 9), (4, 4, 4), 1.0)
    assert int(inside.sum()) == 7  # centre and its six face neighbours
    assert int(ball((9, 9, 9), (4, 4, 4), 1.5)[1].sum()) == 19  # + the twelve edge neighbours (sqrt 2)
    box, inside = ball((9, 9, 9), (0, 0, 0), 1.0)
    assert int(inside.sum()) == 4 and box == (slice(0, 2),) * 3


def test_local_dice_by_hand() -> None:
    pred = np.zeros((9, 9, 9), dtype=bool)
    truth = np.zeros((9, 9, 9), dtype=bool)
    for voxel in [(4, 4, 4), (4, 4, 5), (0, 0, 0)]:
        pred[voxel] = True
    for voxel in [(4, 4, 4), (3, 4, 4), (4, 4, 5), (8, 8, 8)]:
        truth[voxel] = True
    # inside the radius-1 ball: pred {c, (4,4,5)}, truth {c, (3,4,4), (4,4,5)} -> 2 * 2 / (2 + 3)
    assert local_dice(pred, truth, (4, 4, 4), 1.0) == pytest.approx(0.8)
    assert dice(pred, truth) == pytest.approx(4 / 7)  # the whole volume says something else
    assert local_dice(pred, truth, (8, 0, 0), 1.0) == 1.0  # nothing there in either mask
