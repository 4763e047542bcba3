"""The ``pet-threshold`` baseline: the 40 % SUVmax region and its click rules, on blobs and on a phantom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from service.imaging.grid import WorkingGrid
from service.science.dataset import PreparedCase, find_cases, load_prepared
from service.science.evaluation import interaction_curve
from service.science.metrics import dice
from service.science.pet_threshold import (
    SUV_CHANNEL,
    THRESHOLD_FRACTION,
    PetThreshold,
    with_suv,
)
from service.store.contract import Click

SHAPE = (40, 40, 40)


def _ball(centre: tuple[int, int, int], radius: float) -> np.ndarray:
    ijk = np.indices(SHAPE, dtype=np.float64)
    return sum((ijk[a] - centre[a]) ** 2 for a in range(3)) <= radius**2


@pytest.fixture
def images() -> np.ndarray:
    """SUV 1 background; a hot lesion (SUV 10) at the centre with a necrotic core (SUV 1); a second lesion (SUV 6)."""
    suv = np.ones(SHAPE, dtype=np.float32)
    suv[_ball((20, 20, 20), 5)] = 10.0
    suv[_ball((20, 20, 20), 2)] = 1.0
    suv[_ball((20, 20, 32), 3)] = 6.0
    images = np.zeros((2, *SHAPE), dtype=np.float32)
    images[SUV_CHANNEL] = suv
    return images


def test_initial_mask_is_the_central_lesion_with_its_core_filled(images: np.ndarray) -> None:
    mask = PetThreshold(spacing_mm=2.0).initial_probability(images) > 0.5
    np.testing.assert_array_equal(mask, _ball((20, 20, 20), 5))  # 40 % of 10 = 4: not the background, not lesion 2


def test_a_foreground_click_adds_the_clicked_region(images: np.ndarray) -> None:
    method = PetThreshold(spacing_mm=2.0)
    initial = method.initial_probability(images)
    mask = method.refine(images, initial, [Click("foreground", (20, 20, 32))]) > 0.5
    np.testing.assert_array_equal(mask, _ball((20, 20, 20), 5) | _ball((20, 20, 32), 3))


def test_a_background_click_removes_an_unclaimed_component(images: np.ndarray) -> None:
    method = PetThreshold(spacing_mm=2.0)
    clicks = [Click("foreground", (20, 20, 32)), Click("background", (20, 20, 31))]
    claimed = method.refine(images, method.initial_probability(images), clicks) > 0.5
    assert claimed[20, 20, 32] and not claimed[20, 20, 31]  # the component holds a foreground click: a local cut
    assert claimed[20, 20, 34]  # nearer to the foreground click than to the background one: kept
    outside = method.refine(images, method.initial_probability(images), [Click("background", (20, 20, 10))]) > 0.5
    np.testing.assert_array_equal(outside, _ball((20, 20, 20), 5))  # a click outside the mask changes nothing


def test_a_background_click_in_the_central_lesion_cuts_locally(images: np.ndarray) -> None:
    method = PetThreshold(spacing_mm=2.0)
    mask = method.refine(images, method.initial_probability(images), [Click("background", (20, 20, 24))]) > 0.5
    lesion = _ball((20, 20, 20), 5)
    removed = lesion & ~mask
    assert removed[20, 20, 24] and mask[20, 20, 16]  # the far side stays
    assert removed.sum() < lesion.sum()
    cut = _ball((20, 20, 24), 10.0 / 2.0)
    assert not (removed & ~cut).any()  # nothing beyond 10 mm of the click


def test_every_click_keeps_its_label_even_when_a_later_region_covers_it(images: np.ndarray) -> None:
    method = PetThreshold(spacing_mm=2.0)
    clicks = [Click("background", (20, 20, 33)), Click("foreground", (20, 20, 32))]
    mask = method.refine(images, method.initial_probability(images), clicks) > 0.5
    assert not mask[20, 20, 33] and mask[20, 20, 32]


@pytest.fixture(scope="module")
def phantom(phantom_data: Path) -> PreparedCase:
    case = find_cases(phantom_data)[0]
    return with_suv(case, load_prepared(case, (48, 48, 48), 2.0))


def test_with_suv_puts_suv_on_the_same_grid(phantom: PreparedCase) -> None:
    suv = phantom.images[SUV_CHANNEL]
    assert suv.min() >= 0.0 and suv.max() > 3.0  # SUV, not a z-score
    assert isinstance(phantom.grid, WorkingGrid) and suv.shape == phantom.truth.shape


def test_on_a_phantom_the_threshold_finds_the_tumour_and_clicks_are_kept(phantom: PreparedCase) -> None:
    method = PetThreshold(spacing_mm=phantom.grid.spacing_mm)
    initial = method.initial_probability(phantom.images) > 0.5
    suv = phantom.images[SUV_CHANNEL]
    assert initial.any()
    above = suv >= THRESHOLD_FRACTION * suv[initial].max()
    assert not (initial & ~ndimage.binary_fill_holes(above)).any()  # at or above 40 %, or a cavity inside that
    assert dice(initial, phantom.truth) > 0.3
    curve = interaction_curve(method, phantom, np.random.default_rng(0), max_clicks=6)
    made = len(curve.clicks)
    assert made > 0
    assert curve.foreground_honoured[made] + curve.background_honoured[made] == made  # the rule keeps every click
    assert curve.dsc[-1] >= curve.dsc[0]
