"""What a click may change (service.engine.locality), on hand-made masks."""

from __future__ import annotations

import numpy as np

from service.engine.locality import CORE_SHARE, DISMISS_DEPTH_MM, confine, dismissed_objects, touched_objects
from service.store.contract import Click

SHAPE = (12, 12, 12)
SPACING_MM = 2.0


def _session_and_pass() -> tuple[np.ndarray, np.ndarray]:
    """The session's probability (earlier) and a pass's, each 1 in its mask and 0 elsewhere."""
    earlier = np.zeros(SHAPE, dtype=np.float32)
    drawn = np.zeros(SHAPE, dtype=np.float32)
    earlier[1:4, 1:4, 1:4] = 1.0  # A: the tumour, which the pass grows by a slab
    drawn[1:5, 1:4, 1:4] = 1.0
    earlier[1:4, 8:11, 8:11] = 1.0  # B: an earlier blob that the pass drops
    drawn[8:11, 1:4, 8:11] = 1.0  # C: a blob only the pass draws
    earlier[8, 8, 8] = 1.0  # D: two voxels joined by a corner (26-connected), one old and one new
    drawn[9, 9, 9] = 1.0
    return earlier, drawn


def test_only_the_objects_holding_a_new_click_or_reached_by_the_request_change() -> None:
    earlier, drawn = _session_and_pass()
    # a foreground click on A's new slab, a background click on B's rim; D reached by an earlier pass of the request
    clicks = [Click("foreground", (4, 2, 2)), Click("background", (1, 9, 9)), Click("foreground", (40, 40, 40))]
    reached = np.zeros(SHAPE, dtype=bool)
    reached[9, 9, 9] = True
    expected = np.zeros(SHAPE, dtype=bool)
    expected[1:5, 1:4, 1:4] = True  # A and its slab
    expected[1:4, 8:11, 8:11] = True  # B: only the session has it, the click is on it
    expected[8, 8, 8] = expected[9, 9, 9] = True  # D
    assert np.array_equal(touched_objects(drawn, earlier, clicks, reached), expected)
    result, changed = confine(drawn, earlier, clicks, clicks, SPACING_MM, reached=reached)
    assert np.array_equal(changed, expected)  # C holds no click: not changed, so not added
    assert np.array_equal(result, np.where(expected, drawn, earlier))
    assert result[1:5, 1:4, 1:4].all() and not result[1:4, 8:11, 8:11].any() and not result[8:11, 1:4, 8:11].any()


def test_a_foreground_click_the_networks_ignore_still_touches_its_voxel_and_nothing_else() -> None:
    earlier, drawn = _session_and_pass()
    changed = touched_objects(drawn, earlier, [Click("foreground", (6, 6, 6))])
    assert np.flatnonzero(changed).tolist() == [np.ravel_multi_index((6, 6, 6), SHAPE)]


def test_a_background_click_where_neither_mask_has_tumour_changes_nothing() -> None:
    earlier, drawn = _session_and_pass()
    clicks = [Click("background", (6, 6, 6))]
    result, changed = confine(drawn, earlier, clicks, clicks, SPACING_MM)
    assert not changed.any() and np.array_equal(result, earlier)


def test_a_request_of_background_clicks_only_removes() -> None:
    earlier, drawn = _session_and_pass()
    on_a = [Click("background", (1, 2, 2))]  # on A's rim: its object changes, but its new slab is not added
    result, _ = confine(drawn * 0.9, earlier * 0.8, on_a, on_a, SPACING_MM)
    assert np.allclose(result[1:4, 1:4, 1:4], 0.8) and not result[4, 1:4, 1:4].any()
    with_foreground = [*on_a, Click("foreground", (4, 2, 2))]
    assert np.allclose(confine(drawn * 0.9, earlier * 0.8, with_foreground, with_foreground, SPACING_MM)[0][1:5, 1:4, 1:4],
                       0.9)


def test_a_background_click_in_the_core_of_an_object_without_a_foreground_click_removes_it() -> None:
    earlier = np.zeros((16, 16, 16), dtype=np.float32)
    earlier[1:8, 1:8, 1:8] = 1.0  # the tumour, 7 voxels across: its centre is 4 voxels (8 mm) from its edge
    earlier[9:16, 9:16, 1:8] = 1.0  # a blob of the same size
    drawn = earlier.copy()  # the networks keep everything
    depth_of_the_second_layer = 2 * SPACING_MM
    assert DISMISS_DEPTH_MM <= depth_of_the_second_layer < 4 * SPACING_MM
    centre, rim, second = Click("background", (12, 12, 4)), Click("background", (9, 12, 4)), Click("background", (10, 12, 4))
    blob = np.zeros(earlier.shape, dtype=bool)
    blob[9:16, 9:16, 1:8] = True
    assert np.array_equal(dismissed_objects(earlier, [centre], [centre], SPACING_MM), blob)
    assert np.array_equal(dismissed_objects(earlier, [second], [second], SPACING_MM), blob)
    assert not dismissed_objects(earlier, [rim], [rim], SPACING_MM).any()  # on the rim: the networks move the edge
    result, changed = confine(drawn, earlier, [centre], [centre], SPACING_MM)
    assert not result[blob].any() and result[1:8, 1:8, 1:8].all() and changed[blob].all()
    # an object that holds a foreground click, from this request or an earlier one, is never removed
    confirmed = [Click("foreground", (14, 14, 2)), centre]
    assert not dismissed_objects(earlier, [centre], confirmed, SPACING_MM).any()
    assert not dismissed_objects(earlier, confirmed, confirmed, SPACING_MM).any()
    # only new clicks count: the same click again in a later request, on a mask that no longer has it, does nothing
    assert not dismissed_objects(result, [centre], [centre, centre], SPACING_MM).any()


def test_a_background_click_in_a_thick_margin_around_a_large_object_leaves_it_to_the_networks() -> None:
    earlier = np.zeros((16, 16, 16), dtype=np.float32)
    earlier[2:13, 2:13, 2:13] = 1.0  # a tumour with a false-positive margin: 11 voxels across, 6 deep (12 mm)
    in_margin = Click("background", (3, 7, 7))  # two voxels (4 mm) from the edge: deep enough, but not its core
    assert 2 * SPACING_MM >= DISMISS_DEPTH_MM and 2 < CORE_SHARE * 6
    assert not dismissed_objects(earlier, [in_margin], [in_margin], SPACING_MM).any()
    in_core = Click("background", (5, 7, 7))  # four voxels deep: its core
    assert dismissed_objects(earlier, [in_core], [in_core], SPACING_MM).sum() == 11**3
