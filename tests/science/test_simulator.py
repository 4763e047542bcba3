"""Click simulator: error-type choice, click placement, determinism, MONAI parity."""

from __future__ import annotations

import numpy as np
import pytest
from monai.apps.deepgrow.transforms import AddRandomGuidanced

from service.imaging.grid import normalise_ct
from service.science.simulator import ClickRule, body_mask, next_click, no_op_click
from service.store.contract import Click

RULES = [ClickRule.DEEPGROW, ClickRule.LINEAR]


def _cube(shape: tuple[int, int, int], low: tuple[int, int, int], size: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in low)] = True
    return mask


@pytest.mark.parametrize("rule", RULES)
def test_missed_tumour_gets_foreground_click_inside_the_miss(rule: ClickRule) -> None:
    truth = _cube((20, 20, 20), (4, 4, 4), 10)
    prediction = _cube((20, 20, 20), (4, 4, 4), 5)
    for seed in range(10):
        click = next_click(prediction, truth, np.random.default_rng(seed), rule)
        assert click is not None and click.label == "foreground"
        assert truth[click.voxel] and not prediction[click.voxel]


@pytest.mark.parametrize("rule", RULES)
def test_spurious_prediction_gets_background_click_inside_it(rule: ClickRule) -> None:
    truth = _cube((20, 20, 20), (2, 2, 2), 4)
    prediction = truth | _cube((20, 20, 20), (10, 10, 10), 6)
    for seed in range(10):
        click = next_click(prediction, truth, np.random.default_rng(seed), rule)
        assert click is not None and click.label == "background"
        assert prediction[click.voxel] and not truth[click.voxel]


@pytest.mark.parametrize("rule", RULES)
def test_larger_error_type_is_corrected_as_monai_does(rule: ClickRule) -> None:
    truth = _cube((24, 24, 24), (2, 2, 2), 6)  # 216 voxels, all missed
    spurious = _cube((24, 24, 24), (14, 14, 14), 5)  # 125 voxels
    click = next_click(spurious, truth, np.random.default_rng(0), rule)
    assert click == Click("foreground", click.voxel)
    click = next_click(spurious | _cube((24, 24, 24), (12, 12, 12), 8), truth, np.random.default_rng(0), rule)
    assert click is not None and click.label == "background"


def test_tie_between_error_types_goes_to_foreground() -> None:
    truth = _cube((16, 16, 16), (1, 1, 1), 3)
    prediction = _cube((16, 16, 16), (10, 10, 10), 3)
    click = next_click(prediction, truth, np.random.default_rng(1))
    assert click is not None and click.label == "foreground"


@pytest.mark.parametrize("rule", RULES)
def test_perfect_prediction_needs_no_click(rule: ClickRule) -> None:
    truth = _cube((10, 10, 10), (2, 2, 2), 5)
    assert next_click(truth.copy(), truth, np.random.default_rng(0), rule) is None
    empty = np.zeros((10, 10, 10), dtype=bool)
    assert next_click(empty, empty, np.random.default_rng(0), rule) is None


@pytest.mark.parametrize("rule", RULES)
def test_same_seed_same_click_different_seeds_vary(rule: ClickRule) -> None:
    truth = _cube((30, 30, 30), (3, 3, 3), 20)
    prediction = _cube((30, 30, 30), (3, 3, 3), 8)
    first = next_click(prediction, truth, np.random.default_rng(42), rule)
    again = next_click(prediction, truth, np.random.default_rng(42), rule)
    assert first == again
    clicks = {next_click(prediction, truth, np.random.default_rng(seed), rule) for seed in range(20)}
    assert len(clicks) > 5


def test_exponential_rule_clicks_deeper_than_linear_rule() -> None:
    truth = _cube((24, 24, 24), (2, 2, 2), 20)
    prediction = np.zeros_like(truth)
    centre = np.array([11.5, 11.5, 11.5])

    def mean_offset(rule: ClickRule) -> float:
        rng = np.random.default_rng(7)
        voxels = [next_click(prediction, truth, rng, rule).voxel for _ in range(200)]  # type: ignore[union-attr]
        return float(np.mean(np.abs(np.asarray(voxels) - centre).max(axis=1)))

    assert mean_offset(ClickRule.DEEPGROW) < mean_offset(ClickRule.LINEAR) - 1.0


class _CapturingChoice:
    """Stands in for a random generator and records the click distribution it is given."""

    def __init__(self) -> None:
        self.p: np.ndarray | None = None

    def choice(self, a, size=None, p=None):
        self.p = np.asarray(p, dtype=np.float64)
        options = np.arange(a) if np.isscalar(a) else np.asarray(a)
        return options[:1] if size is not None else int(options[0])


@pytest.mark.parametrize("rule", RULES)
def test_click_distribution_matches_monai_and_paper_formulas(rule: ClickRule) -> None:
    rng = np.random.default_rng(3)
    truth = np.zeros((18, 16, 14), dtype=bool)
    truth[0:9, 3:15, 2:14] = True  # touches the volume border
    truth[12:17, 1:6, 6:11] = True
    truth &= rng.random(truth.shape) > 0.05
    prediction = np.zeros_like(truth)

    ours = _CapturingChoice()
    next_click(prediction, truth, ours, rule)  # type: ignore[arg-type]

    monai = AddRandomGuidanced()
    monai.R = _CapturingChoice()  # type: ignore[assignment]
    monai.find_guidance(truth[None].astype(np.float32))
    expected = monai.R.p
    if rule is ClickRule.LINEAR:
        from scipy.ndimage import distance_transform_cdt

        distances = distance_transform_cdt(truth)[truth].astype(np.float64)
        expected = distances / distances.sum()
    assert ours.p is not None and expected is not None
    np.testing.assert_allclose(ours.p, expected, rtol=1e-9, atol=1e-15)


def test_large_volume_click_is_valid() -> None:
    truth = np.zeros((144, 144, 144), dtype=bool)
    truth[40:100, 50:110, 30:90] = True
    prediction = np.zeros_like(truth)
    prediction[45:100, 50:110, 30:90] = True
    click = next_click(prediction, truth, np.random.default_rng(0))
    assert click is not None and click.label == "foreground" and 40 <= click.voxel[0] < 45


def test_probability_maps_are_thresholded_and_shapes_checked() -> None:
    truth = _cube((8, 8, 8), (2, 2, 2), 4).astype(np.float32)
    assert next_click(truth * 0.9, truth, np.random.default_rng(0)) is None
    with pytest.raises(ValueError):
        next_click(np.zeros((8, 8, 7)), truth, np.random.default_rng(0))


# ------------------------------------------------------------------- no-op click


def test_no_op_click_is_the_nearest_body_voxel_at_30_mm() -> None:
    shape = (30, 3, 3)
    mask = np.zeros(shape, dtype=bool)
    mask[:3] = True  # x = 0..2, the whole cross-section
    truth = mask.copy()
    body = np.ones(shape, dtype=bool)
    body[25:] = False
    # 2 mm voxels: 30 mm = 15 voxels from x = 2, so x = 17; every (y, z) there ties, C order takes (0, 0)
    assert no_op_click(mask, truth, body, 2.0) == Click("background", (17, 0, 0))
    assert no_op_click(mask, truth, body, 1.5) == Click("background", (22, 0, 0))  # 20 voxels from x = 2
    body[:20] = False
    assert no_op_click(mask, truth, body, 2.0) == Click("background", (20, 0, 0))
    body[:] = False
    assert no_op_click(mask, truth, body, 2.0) is None


def test_no_op_click_keeps_away_from_the_truth_too() -> None:
    shape = (30, 3, 3)
    mask = np.zeros(shape, dtype=bool)
    truth = np.zeros(shape, dtype=bool)
    truth[5] = True  # the mask missed everything: the click must not land on the missed tumour's side either
    click = no_op_click(mask, truth, np.ones(shape, dtype=bool), 2.0)
    assert click == Click("background", (20, 0, 0))
    assert no_op_click(mask, mask, np.ones(shape, dtype=bool), 2.0) == Click("background", (0, 0, 0))


def test_body_mask_is_tissue_above_minus_180_hu() -> None:
    hu = np.array([-1000.0, -200.0, -185.0, -175.0, 0.0, 1000.0])
    assert body_mask(normalise_ct(hu)).tolist() == [False, False, False, True, True, True]
