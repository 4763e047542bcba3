"""The working grid and resampling: images meet in world space, never by array index."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from service.imaging.grid import (
    CT_FILL_HU,
    WorkingGrid,
    normalise_ct,
    normalise_pet,
    overlap_centre,
    preprocess,
    resample,
    to_volume_grid,
)
from service.imaging.volume import ImageError, Volume

# 0.98 x 0.98 x 3 mm, x and y flipped as DICOM LPS stored in RAS, with an origin offset.
CT_AFFINE = np.array(
    [
        [-0.98, 0.0, 0.0, 250.0],
        [0.0, -0.98, 0.0, 230.0],
        [0.0, 0.0, 3.0, -600.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
CT_SHAPE = (120, 120, 40)
LESION_MM = np.array([190.0, 170.0, -540.0])
LESION_HALF_WIDTH_MM = 6.0


def voxel_centres_mm(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World coordinates (*shape, 3) of every voxel centre."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def world_centroid(weights: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroid of an array, in world mm."""
    centres = voxel_centres_mm(weights.shape, affine)
    return (centres * weights[..., None]).sum(axis=(0, 1, 2)) / weights.sum()


def ct_with_lesion(shape: tuple[int, int, int] = CT_SHAPE, affine: np.ndarray = CT_AFFINE) -> Volume:
    """Soft tissue at 40 HU with a 400 HU cube around LESION_MM."""
    inside = np.all(
        np.abs(voxel_centres_mm(shape, affine) - LESION_MM) <= LESION_HALF_WIDTH_MM, axis=-1
    )
    return Volume(array=np.where(inside, 400.0, 40.0), affine=affine)


# --- WorkingGrid ----------------------------------------------------------------------


def test_grid_affine_is_isotropic_and_axis_aligned() -> None:
    grid = WorkingGrid(shape=(4, 5, 6), spacing_mm=1.5, origin_mm=(1.0, -2.0, 3.0))
    expected = np.diag([1.5, 1.5, 1.5, 1.0])
    expected[:3, 3] = (1.0, -2.0, 3.0)
    np.testing.assert_array_equal(grid.affine, expected)


@pytest.mark.parametrize("shape", [(144, 144, 144), (9, 10, 11)])
def test_around_puts_the_centre_mid_grid(shape: tuple[int, int, int]) -> None:
    centre = np.array([12.5, -40.0, 300.25])
    grid = WorkingGrid.around(centre, shape, 1.0)
    np.testing.assert_allclose(grid.world_to_voxel(centre), (np.array(shape) - 1) / 2)
    np.testing.assert_allclose(grid.voxel_to_world((np.array(shape) - 1) / 2), centre)


def test_world_and_voxel_conversions_are_inverse() -> None:
    grid = WorkingGrid.around((10.0, 20.0, 30.0), (16, 16, 16), 2.0)
    points = np.random.default_rng(0).uniform(-50, 50, size=(7, 3))
    np.testing.assert_allclose(grid.voxel_to_world(grid.world_to_voxel(points)), points)
    assert grid.world_to_voxel(points[0]).shape == (3,)
    np.testing.assert_allclose(grid.world_to_voxel(grid.voxel_to_world(points[0])), points[0])


def test_contains_voxel_is_half_open() -> None:
    grid = WorkingGrid(shape=(4, 5, 6), spacing_mm=1.0, origin_mm=(0.0, 0.0, 0.0))
    assert grid.contains_voxel((0, 0, 0))
    assert grid.contains_voxel(np.array([3, 4, 5]))
    assert not grid.contains_voxel((4, 0, 0))
    assert not grid.contains_voxel((0, -1, 0))
    assert not grid.contains_voxel((0, 0, 6))


def test_grid_survives_json() -> None:
    grid = WorkingGrid.around((1.25, -3.5, 700.0), (144, 144, 144), 1.0)
    assert WorkingGrid.from_dict(json.loads(json.dumps(grid.to_dict()))) == grid


@pytest.mark.parametrize(
    "description",
    [
        {"shape": [4, 4], "spacing_mm": 1.0, "origin_mm": [0, 0, 0]},
        {"shape": [4, 4, 4], "spacing_mm": 0.0, "origin_mm": [0, 0, 0]},
        {"shape": [4, 4, 4], "origin_mm": [0, 0, 0]},
    ],
)
def test_malformed_grid_descriptions_are_rejected(description: dict) -> None:
    with pytest.raises(ValueError):
        WorkingGrid.from_dict(description)


# --- overlap --------------------------------------------------------------------------


def box_volume(shape: tuple[int, int, int], spacing: float, origin: tuple[float, ...]) -> Volume:
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = origin
    return Volume(array=np.zeros(shape), affine=affine)


def test_overlap_centre_is_the_middle_of_the_shared_box() -> None:
    ct = box_volume((10, 10, 10), 2.0, (0.0, 0.0, 0.0))  # covers -1 .. 19 mm
    pet = box_volume((5, 5, 5), 4.0, (10.0, 10.0, 10.0))  # covers 8 .. 28 mm
    np.testing.assert_allclose(overlap_centre(ct, pet), [13.5, 13.5, 13.5])


def test_overlap_centre_handles_flipped_axes() -> None:
    ct = Volume(array=np.zeros(CT_SHAPE), affine=CT_AFFINE)
    centre = overlap_centre(ct, ct)
    np.testing.assert_allclose(centre, ct.world_corners().mean(axis=0))


def test_disjoint_images_do_not_overlap() -> None:
    ct = box_volume((10, 10, 10), 2.0, (0.0, 0.0, 0.0))
    pet = box_volume((5, 5, 5), 4.0, (0.0, 0.0, 100.0))
    with pytest.raises(ImageError, match="^ct and pet do not overlap$"):
        overlap_centre(ct, pet)


# --- resampling -----------------------------------------------------------------------


def test_resampled_lesion_stays_at_its_world_position() -> None:
    ct = ct_with_lesion()
    cube_voxels = ct.array > 200
    actual_centroid = world_centroid(cube_voxels.astype(float), CT_AFFINE)
    grid = WorkingGrid.around(LESION_MM + (4.0, -3.0, 7.0), (48, 48, 48), 1.0)

    working = resample(ct, grid)

    assert working.dtype == np.float32 and working.shape == grid.shape
    lesion = np.clip(working - 40.0, 0.0, None)
    centroid = world_centroid(lesion, grid.affine)
    np.testing.assert_allclose(centroid, actual_centroid, atol=0.5)
    np.testing.assert_allclose(centroid, LESION_MM, atol=1.0)


def test_resampling_follows_the_affine_not_the_array_layout() -> None:
    ct = ct_with_lesion()
    # The same image stored with axes reversed and permuted (z, y, x), and x unflipped.
    reordered = ct.array[::-1].transpose(2, 1, 0)
    affine = np.zeros((4, 4))
    affine[:3, 0] = CT_AFFINE[:3, 2]
    affine[:3, 1] = CT_AFFINE[:3, 1]
    affine[:3, 2] = -CT_AFFINE[:3, 0]
    affine[:3, 3] = CT_AFFINE[:3, 3] + CT_AFFINE[:3, 0] * (CT_SHAPE[0] - 1)
    affine[3, 3] = 1.0
    same_image = Volume(array=reordered, affine=affine)
    grid = WorkingGrid.around(LESION_MM + (5.0, -3.0, 8.0), (32, 32, 32), 1.0)
    np.testing.assert_allclose(resample(same_image, grid), resample(ct, grid), atol=1e-3)


def test_grid_points_outside_the_image_get_the_fill_value() -> None:
    ct = ct_with_lesion()
    corner = ct.world_corners().max(axis=0)
    grid = WorkingGrid.around(corner, (10, 10, 10), 1.0)
    working = resample(ct, grid, fill=CT_FILL_HU)
    assert working[-1, -1, -1] == CT_FILL_HU
    assert working[0, 0, 0] == pytest.approx(40.0)


def test_working_grid_blob_maps_back_onto_the_ct_grid() -> None:
    grid = WorkingGrid.around(LESION_MM + (-5.0, 8.0, 2.0), (40, 40, 40), 1.0)
    blob_voxel = grid.world_to_voxel(LESION_MM)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1)
    probability = np.exp(-np.sum((index - blob_voxel) ** 2, axis=-1) / (2 * 3.0**2))

    on_ct = to_volume_grid([(probability, grid)], CT_SHAPE, CT_AFFINE)

    assert on_ct.dtype == np.float32 and on_ct.shape == CT_SHAPE
    np.testing.assert_allclose(world_centroid(on_ct, CT_AFFINE), LESION_MM, atol=0.5)
    peak = np.unravel_index(np.argmax(on_ct), CT_SHAPE)
    np.testing.assert_allclose(
        np.asarray(peak) @ CT_AFFINE[:3, :3].T + CT_AFFINE[:3, 3], LESION_MM, atol=2.0
    )


def test_to_volume_grid_matches_full_interpolation() -> None:
    """Interpolating only the covered block gives exactly the whole-image answer."""
    shape = (30, 28, 12)
    grid = WorkingGrid.around(CT_AFFINE[:3, 3] + (-12.0, -10.0, 15.0), (16, 18, 20), 1.0)
    probability = np.random.default_rng(2).random(grid.shape).astype(np.float32)

    source_voxels = grid.world_to_voxel(voxel_centres_mm(shape, CT_AFFINE).reshape(-1, 3))
    expected = ndimage.map_coordinates(probability, source_voxels.T, order=1, mode="constant")

    on_ct = to_volume_grid([(probability, grid)], shape, CT_AFFINE)
    np.testing.assert_allclose(on_ct, expected.reshape(shape), atol=1e-6)
    assert on_ct.any() and not on_ct.all()


def test_to_volume_grid_outside_the_image_is_all_zero() -> None:
    grid = WorkingGrid.around((0.0, 0.0, 0.0), (8, 8, 8), 1.0)
    on_ct = to_volume_grid([(np.ones(grid.shape), grid)], CT_SHAPE, CT_AFFINE)
    assert on_ct.shape == CT_SHAPE and not on_ct.any()


# --- normalisation and network input --------------------------------------------------


def test_normalise_ct_windows_soft_tissue_to_unit_range() -> None:
    hu = np.array([-1024.0, -200.0, 0.0, 100.0, 200.0, 3000.0])
    np.testing.assert_allclose(normalise_ct(hu), [-1.0, -1.0, 0.0, 0.5, 1.0, 1.0])
    assert normalise_ct(hu).dtype == np.float32


def test_normalise_pet_is_a_z_score() -> None:
    suv = np.random.default_rng(3).gamma(2.0, 1.5, size=(20, 20, 20))
    z = normalise_pet(suv)
    assert z.dtype == np.float32
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(z.std()) == pytest.approx(1.0, abs=1e-5)


def test_normalise_pet_of_a_constant_image_is_zero() -> None:
    np.testing.assert_array_equal(normalise_pet(np.full((3, 3, 3), 2.5)), np.zeros((3, 3, 3)))


def test_preprocess_stacks_normalised_ct_and_pet() -> None:
    ct = ct_with_lesion()
    pet_affine = np.diag([4.0, 4.0, 4.0, 1.0])
    pet_affine[:3, 3] = (120.0, 100.0, -620.0)
    pet = Volume(array=np.random.default_rng(4).random((40, 40, 20)), affine=pet_affine)
    grid = WorkingGrid.around(overlap_centre(ct, pet), (24, 24, 24), 2.0)

    network_input = preprocess(ct, pet, grid)

    assert network_input.shape == (2, 24, 24, 24) and network_input.dtype == np.float32
    np.testing.assert_array_equal(network_input[0], normalise_ct(resample(ct, grid, fill=CT_FILL_HU)))
    np.testing.assert_array_equal(network_input[1], normalise_pet(resample(pet, grid)))
    assert network_input[0].min() >= -1.0 and network_input[0].max() <= 1.0
