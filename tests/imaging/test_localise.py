"""Finding the primary tumour with no centre given, on whole-body and head-and-neck phantoms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.imaging.localise import localise_tumour
from service.imaging.volume import Volume
from service.science.phantoms import PhantomCase, case_seed, make_case
from service.science.wholebody import make_whole_body_case

WINDOW_MM = 128.0  # the demo checkpoint's 64 voxels x 2 mm


def _volumes(case: PhantomCase) -> tuple[Volume, Volume]:
    return Volume(case.ct.astype(np.float32), case.ct_affine), Volume(case.pet, case.pet_affine)


def _tumour_centre(case: PhantomCase) -> np.ndarray:
    return case.ct_affine[:3, :3] @ np.argwhere(case.gtvt > 0).mean(axis=0) + case.ct_affine[:3, 3]


@pytest.fixture(scope="module")
def whole_body() -> PhantomCase:
    return make_whole_body_case(case_seed(7, 1), scale=2.0)


def test_the_window_placed_on_a_whole_body_scan_holds_the_tumour(whole_body: PhantomCase) -> None:
    found = localise_tumour(*_volumes(whole_body), window_mm=WINDOW_MM)
    offset = _tumour_centre(whole_body) - np.asarray(found.centre_mm)
    assert np.all(np.abs(offset) <= WINDOW_MM / 2), (found.centre_mm, found.reason)
    assert found.candidates and "head-and-neck band" in found.reason


def test_physiological_uptake_below_the_neck_is_never_a_candidate(whole_body: PhantomCase) -> None:
    found = localise_tumour(*_volumes(whole_body))
    anatomy = whole_body.anatomy
    assert found.band.shoulder_z_mm is not None
    assert abs(found.band.shoulder_z_mm - anatomy.body.shoulder_z) < 40
    heart_z = next(o.shape.centre[2] for o in anatomy.organs if o.name == "myocardium")
    brain_bottom = anatomy.brain.centre[2] - anatomy.brain.semi_axes[2]
    assert found.band.low_z_mm > heart_z and found.band.high_z_mm < brain_bottom + 10
    for candidate in found.candidates:
        assert found.band.low_z_mm <= candidate.centre_mm[2] <= found.band.high_z_mm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_head_and_neck_crop_without_brain_or_bladder_still_finds_the_tumour(seed: int) -> None:
    case = make_case(case_seed(5, seed), ct_spacing=(1.96, 1.96, 3.0), pet_spacing=(4.0, 4.0, 4.0))
    found = localise_tumour(*_volumes(case), window_mm=WINDOW_MM)
    assert np.linalg.norm(_tumour_centre(case) - np.asarray(found.centre_mm)) < 30.0, found.reason


def test_a_scorer_decides_between_candidates() -> None:
    case = make_case(case_seed(5, 0), ct_spacing=(1.96, 1.96, 3.0), pet_spacing=(4.0, 4.0, 4.0))
    ct, pet = _volumes(case)
    plain = localise_tumour(ct, pet)
    assert len(plain.candidates) >= 2
    favourite = np.asarray(plain.candidates[-1].centre_mm)

    def scorer(centre_mm: np.ndarray) -> float:  # stands in for the initial ensemble's confidence
        return 1.0 if np.linalg.norm(np.asarray(centre_mm) - favourite) < 1.0 else 0.0

    steered = localise_tumour(ct, pet, scorer=scorer)
    assert np.allclose(steered.centre_mm, favourite, atol=0.2)
    assert steered.candidates[0].ensemble_score == 1.0


def test_the_answer_says_where_and_why_in_json(whole_body: PhantomCase) -> None:
    found = localise_tumour(*_volumes(whole_body), window_mm=WINDOW_MM)
    payload = json.loads(json.dumps(found.to_dict()))
    assert len(payload["centre_mm"]) == 3
    assert payload["candidates"][0]["score"] >= payload["candidates"][-1]["score"]
    assert {"peak_suv", "volume_ml", "airway_distance_mm", "centre_mm"} <= set(payload["candidates"][0])
    assert payload["band"]["low_z_mm"] < payload["band"]["high_z_mm"]


def test_a_pet_without_hotspots_falls_back_to_the_airway() -> None:
    case = make_case(case_seed(5, 1), ct_spacing=(1.96, 1.96, 3.0), pet_spacing=(4.0, 4.0, 4.0))
    ct, pet = _volumes(case)
    flat = Volume(np.minimum(pet.array, 1.0), pet.affine)
    found = localise_tumour(ct, flat)
    assert found.candidates == ()
    assert "no PET hotspot" in found.reason
    assert abs(found.centre_mm[0] - case.anatomy.airway.centre_x(np.asarray(0.0))) < 20


def test_images_that_do_not_overlap_are_refused() -> None:
    case = make_case(case_seed(5, 2), ct_spacing=(3.0, 3.0, 3.0), pet_spacing=(6.0, 6.0, 6.0))
    ct, pet = _volumes(case)
    moved = pet.affine.copy()
    moved[2, 3] += 5000.0
    with pytest.raises(ValueError, match="overlap"):
        localise_tumour(ct, Volume(pet.array, moved))
