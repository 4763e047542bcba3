"""The click guarantee: on the working grid (balls) and at the CT's own resolution (clicked voxels)."""

from __future__ import annotations

import numpy as np

from service.engine.guarantee import honour_clicked_voxels, honour_clicks, honour_radius_voxels
from service.store.contract import Click


def test_each_click_sets_its_ball_and_the_nearest_click_wins_where_balls_meet() -> None:
    probability = np.full((9, 9, 9), 0.3, dtype=np.float32)
    result = honour_clicks(probability, [Click("foreground", (4, 4, 2)), Click("background", (4, 4, 5))], 2.0)
    assert result[4, 4, 2] == 1.0 and result[4, 4, 0] == 1.0 and result[4, 4, 3] == 1.0
    assert result[4, 4, 5] == 0.0 and result[4, 4, 4] == 0.0 and result[4, 4, 7] == 0.0
    assert result[0, 0, 0] == np.float32(0.3)  # far from both: untouched
    assert probability[4, 4, 2] == np.float32(0.3)  # a copy


def test_the_service_sets_the_clicked_voxels_alone_and_a_later_click_wins_its_voxel() -> None:
    probability = np.full((6, 6, 6), 0.7, dtype=np.float32)
    clicks = [Click("background", (2, 2, 2)), Click("foreground", (2, 2, 3)), Click("background", (2, 2, 3))]
    result = honour_clicks(probability, clicks, honour_radius_voxels(2.0))
    changed = np.argwhere(result != probability)
    assert sorted(map(tuple, changed)) == [(2, 2, 2), (2, 2, 3)]
    assert result[2, 2, 2] == 0.0 and result[2, 2, 3] == 0.0  # the later background click on (2, 2, 3) wins


def test_clicked_ct_voxels_take_their_labels_even_closer_than_a_working_voxel() -> None:
    ct_affine = np.diag([0.5, 0.5, 3.0, 1.0])
    ct_affine[:3, 3] = (-10.0, -10.0, -30.0)
    mask = np.zeros((40, 40, 20), dtype=bool)
    mask[20, 20, 10] = True
    # two opposite clicks 0.5 mm apart (neighbouring CT voxels), a third outside the image
    clicks = [("foreground", (0.0, 0.0, 0.0)), ("background", (0.0, 0.5, 0.0)), ("foreground", (99.0, 0.0, 0.0))]
    honour_clicked_voxels(mask, clicks, ct_affine)
    assert mask[20, 20, 10] and not mask[20, 21, 10]
    assert mask.sum() == 1
    honour_clicked_voxels(mask, [("background", (0.1, 0.1, 0.2))], ct_affine)  # a later click on the same voxel wins
    assert not mask[20, 20, 10]
