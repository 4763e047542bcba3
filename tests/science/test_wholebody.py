"""Whole-body (vertex-to-thigh) phantoms: layout, physical ranges, uptake, tumour site, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from service.science.dataset import find_cases
from service.science.phantoms import PhantomCase, case_seed
from service.science.wholebody import (
    HEIGHT_RANGE_MM,
    LOBULATION,
    make_whole_body_case,
    sample_whole_body,
    write_whole_body_cases,
)

SCALE = 3.0  # ~3 mm CT pixels, 12 mm PET voxels: seconds per case


@pytest.fixture(scope="module")
def case() -> PhantomCase:
    return make_whole_body_case(case_seed(7, 0), scale=SCALE)


def _value_at(volume: np.ndarray, affine: np.ndarray, point_mm: tuple[float, float, float]) -> float:
    index = np.rint(np.linalg.solve(affine[:3, :3], np.asarray(point_mm) - affine[:3, 3])).astype(int)
    return float(volume[tuple(index)])


def _organs(case: PhantomCase, name: str) -> list:
    return [o for o in case.anatomy.organs if o.name == name]


def test_cases_are_written_in_the_hecktor_layout(tmp_path) -> None:
    ids = write_whole_body_cases(tmp_path, 1, seed=3, scale=4.0)
    assert ids == ["wholebody_s3_000"]
    assert {p.name for p in tmp_path.iterdir()} == {f"{ids[0]}_ct.nii.gz", f"{ids[0]}_pt.nii.gz",
                                                    f"{ids[0]}_gtvt.nii.gz"}
    assert [c.id for c in find_cases(tmp_path)] == ids


def test_the_scan_runs_from_the_vertex_to_the_thighs_on_scanner_grids(case: PhantomCase) -> None:
    ct_spacing = np.abs(np.diag(case.ct_affine)[:3])
    assert ct_spacing[0] == pytest.approx(0.98 * SCALE)
    assert 2.0 * SCALE <= ct_spacing[2] <= 3.0 * SCALE
    assert np.abs(np.diag(case.pet_affine)[:3]) == pytest.approx([4.0 * SCALE] * 3)
    height = case.ct.shape[2] * ct_spacing[2]
    assert HEIGHT_RANGE_MM[0] - ct_spacing[2] <= height <= HEIGHT_RANGE_MM[1] + ct_spacing[2]
    top_z = case.ct_affine[2, 3] + case.ct_affine[2, 2] * (case.ct.shape[2] - 1)
    assert top_z > case.anatomy.brain.centre[2] + case.anatomy.brain.semi_axes[2]  # the whole head is in


def test_ct_is_in_hu_and_pet_in_suv(case: PhantomCase) -> None:
    assert case.ct.dtype == np.int16 and case.pet.dtype == np.float32
    assert case.ct.min() >= -1024 and case.ct.max() <= 3071
    assert np.median(case.ct[0]) < -900  # air beside the body
    assert case.pet.min() >= 0.0
    assert 0.5 < float(np.median(case.pet[case.pet > 0.3])) < 2.0  # most of the body is background uptake
    assert case.gtvt.dtype == np.uint8 and set(np.unique(case.gtvt)) == {0, 1}


def test_physiological_uptake_lies_where_the_organs_are(case: PhantomCase) -> None:
    pet, affine = case.pet, case.pet_affine
    brain = _value_at(pet, affine, case.anatomy.brain.centre)
    liver = _value_at(pet, affine, _organs(case, "liver")[0].shape.centre)
    bladder = _value_at(pet, affine, _organs(case, "bladder")[0].shape.centre)
    lung = _value_at(pet, affine, _organs(case, "lung")[0].shape.centre)
    assert brain > 4.0
    assert 1.2 < liver < 4.0
    assert bladder > 2 * liver
    assert lung < liver
    lung_hu = _value_at(case.ct, case.ct_affine, _organs(case, "lung")[0].shape.centre)
    assert lung_hu < -600


def test_the_tumour_sits_in_the_oropharynx(case: PhantomCase) -> None:
    where = np.argwhere(case.gtvt > 0)
    assert where.size > 0
    centre = case.ct_affine[:3, :3] @ where.mean(axis=0) + case.ct_affine[:3, 3]
    anatomy = case.anatomy
    assert abs(centre[0]) < anatomy.body.neck_semi_axes[0]
    assert anatomy.mandible.centre_z - 40 < centre[2] < anatomy.airway.z_range[1] + 20  # between hyoid and nasopharynx
    assert centre[2] > anatomy.body.shoulder_z + 60


def test_tumour_volumes_span_one_to_two_hundred_ml() -> None:
    volumes = []
    for seed in range(60):
        main = sample_whole_body(np.random.default_rng(seed)).anatomy.tumour.lobes[0]
        volumes.append(4 / 3 * np.pi * np.prod(main.semi_axes) * LOBULATION / 1000)
    assert 0.7 < min(volumes) < 3.0
    assert 100.0 < max(volumes) < 260.0


def test_the_same_seed_gives_the_same_case_and_another_seed_another() -> None:
    first = make_whole_body_case(11, scale=5.0)
    again = make_whole_body_case(11, scale=5.0)
    other = make_whole_body_case(12, scale=5.0)
    assert np.array_equal(first.ct, again.ct) and np.array_equal(first.pet, again.pet)
    assert np.array_equal(first.gtvt, again.gtvt)
    assert first.ct.shape != other.ct.shape or not np.array_equal(first.ct, other.ct)


def test_scale_must_be_positive() -> None:
    with pytest.raises(ValueError, match="scale"):
        make_whole_body_case(1, scale=0.0)
