"""Working windows: which window a click uses, the border rule, and stitching windows into one probability."""

from __future__ import annotations

import numpy as np

from service.engine import windows
from service.engine.windows import Canvas
from service.store.contract import Click, Extent, WindowRef

SHAPE = (32, 32, 32)
# a CT 32 voxels wide in x and y (exactly one window) and 160 long in z, starting where the first window does
EXTENT = Extent((0, 0, -64), (31, 31, 95), (0.0, 0.0, -64.0), (31.0, 31.0, 95.0))


def _click(label: str, voxel: tuple[int, int, int]) -> Click:
    return Click(label, voxel)  # type: ignore[arg-type]


def test_a_click_well_inside_the_current_window_stays_there() -> None:
    assert windows.plan([_click("foreground", (16, 16, 16))], [(0, 0, 0)], SHAPE, EXTENT) == [(0, 0, 0)]
    # near the x faces, where the CT ends with the window: still kept
    assert windows.plan([_click("foreground", (0, 31, 16))], [(0, 0, 0)], SHAPE, EXTENT) == [(0, 0, 0)]


def test_a_click_near_a_face_the_ct_continues_beyond_moves_the_window_around_it() -> None:
    # 2 voxels from the window's high z face, and the CT goes on: the window is centred on the click in z
    assert windows.plan([_click("foreground", (16, 16, 29))], [(0, 0, 0)], SHAPE, EXTENT) == [(0, 0, 14)]
    # far outside the current window
    assert windows.plan([_click("background", (10, 20, 80))], [(0, 0, 0)], SHAPE, EXTENT) == [(0, 0, 64)]


def test_a_click_outside_the_current_window_goes_to_an_earlier_window_that_keeps_it() -> None:
    known = [(0, 0, 0), (0, 0, 64), (0, 0, -40)]  # the current one last
    assert windows.plan([_click("foreground", (16, 16, 15))], known, SHAPE, EXTENT) == [(0, 0, 0)]
    assert windows.plan([_click("foreground", (16, 16, 80))], known, SHAPE, EXTENT) == [(0, 0, 64)]
    # kept by none: a new window around it
    assert windows.plan([_click("foreground", (16, 16, 40))], known, SHAPE, EXTENT) == [(0, 0, 25)]


def test_windows_stay_inside_the_ct_where_it_is_longer_than_a_window() -> None:
    # a click at the CT's last z voxel: the window ends with the CT instead of hanging out of it
    assert windows.place((5, 5, 95), SHAPE, EXTENT) == (0, 0, 64)
    assert windows.place((5, 5, -64), SHAPE, EXTENT) == (0, 0, -64)
    # an axis where the CT is shorter than a window: centred on the CT
    short = Extent((0, 0, 0), (19, 31, 31), (0.0, 0.0, 0.0), (19.0, 31.0, 31.0))
    assert windows.place((2, 16, 16), SHAPE, short)[0] == -6


def test_clicks_of_one_request_that_do_not_fit_one_window_get_one_each_in_order_of_their_last_click() -> None:
    clicks = [_click("foreground", (16, 16, 80)), _click("background", (16, 16, 10)), _click("foreground", (16, 16, 82))]
    assert windows.plan(clicks, [(0, 0, 0)], SHAPE, EXTENT) == [(0, 0, 0), (0, 0, 64)]


def test_the_border_rule_shifts_half_a_window_towards_the_face_the_mask_reaches() -> None:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[10:20, 10:20, 25:32] = True  # reaches the high z face; the CT continues there
    assert windows.border_shift(mask, (0, 0, 0), EXTENT) == (0, 0, 16)
    mask[:] = False
    mask[10:20, 0:32, 10:20] = True  # reaches both y faces, but the CT ends there with the window
    assert windows.border_shift(mask, (0, 0, 0), EXTENT) is None
    mask[:] = False
    mask[12:20, 12:20, 12:20] = True  # well inside
    assert windows.border_shift(mask, (0, 0, 0), EXTENT) is None
    mask[:] = False
    mask[12:20, 12:20, 0:3] = True
    mask[12:20, 12:20, 30:32] = True  # both z faces: towards the one with more mask on it
    assert windows.border_shift(mask, (0, 0, 0), EXTENT) == (0, 0, -16)
    # at the CT's end the window cannot go further
    edge = np.zeros(SHAPE, dtype=bool)
    edge[10:20, 10:20, 28:32] = True
    assert windows.border_shift(edge, (0, 0, 64), EXTENT) is None


def _canvas(*entries: tuple[WindowRef, float]) -> Canvas:
    stored = {ref: np.full(SHAPE, value, dtype=np.float32) for ref, value in entries}
    return Canvas([ref for ref, _ in entries], SHAPE, lambda ref: stored[ref])


def test_a_later_window_is_stitched_over_an_earlier_one_and_nothing_is_covered_where_none_reaches() -> None:
    first, second = WindowRef((0, 0, 0), 0), WindowRef((0, 0, 16), 1)
    probability, covered = _canvas((first, 0.2), (second, 0.9)).compose((0, 0, -8), (32, 32, 64))
    z = np.arange(-8, 56)
    expected = np.where(z < 0, 0.0, np.where(z < 16, 0.2, np.where(z < 48, 0.9, 0.0)))
    np.testing.assert_allclose(probability[5, 7], expected)
    assert np.array_equal(covered[5, 7], (z >= 0) & (z < 48))


def test_a_window_computed_again_replaces_its_entry_and_an_extension_goes_under_its_window() -> None:
    first, second = WindowRef((0, 0, 0), 0), WindowRef((0, 0, 16), 1)
    canvas = _canvas((first, 0.2), (second, 0.9))
    again = WindowRef((0, 0, 0), 2)
    canvas.add(again, np.full(SHAPE, 0.6, dtype=np.float32))
    assert canvas.windows == [second, again]
    assert canvas.compose((0, 0, 20), (1, 1, 1))[0].item() == np.float32(0.6)
    below = WindowRef((0, 0, -16), 2, "probability.border1")
    canvas.add(below, np.full(SHAPE, 0.1, dtype=np.float32), under=again)
    assert canvas.windows == [second, below, again]
    assert canvas.compose((0, 0, -1), (1, 1, 1))[0].item() == np.float32(0.1)
    assert canvas.compose((0, 0, 5), (1, 1, 1))[0].item() == np.float32(0.6)  # the window it extends stays on top
    assert canvas.union_box() == ((0, 0, -16), (32, 32, 64))


def test_clicks_move_into_window_coordinates_and_only_those_inside_are_shown() -> None:
    clicks = [_click("foreground", (3, 4, 70)), _click("background", (3, 4, 10))]
    local = windows.local_clicks(clicks, (0, 0, 64))
    assert [c.voxel for c in local] == [(3, 4, 6), (3, 4, -54)]
    assert windows.inside(local, SHAPE) == [local[0]]
