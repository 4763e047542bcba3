"""What a click may change (service.engine.locality), on hand-made masks."""

from __future__ import annotations

import numpy as np

from service.engine.locality import confine, removing_only, touched_objects
from service.store.contract import Click

SHAPE = (12, 12, 12)


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
    # a foreground click on A's new slab, a background click on B; D reached by an earlier pass of the request
    clicks = [Click("foreground", (4, 2, 2)), Click("background", (2, 9, 9)), Click("foreground", (40, 40, 40))]
    reached = np.zeros(SHAPE, dtype=bool)
    reached[9, 9, 9] = True
    changed = touched_objects(drawn, earlier, clicks, reached)
    expected = np.zeros(SHAPE, dtype=bool)
    expected[1:5, 1:4, 1:4] = True  # A and its slab
    expected[1:4, 8:11, 8:11] = True  # B: only the session has it, the click is on it
    expected[8, 8, 8] = expected[9, 9, 9] = True  # D
    assert np.array_equal(changed, expected)  # C holds no click: not changed, so not added
    result = confine(drawn, earlier, changed, removing_only=False)
    assert np.array_equal(result, np.where(expected, drawn, earlier))
    assert result[1:5, 1:4, 1:4].all() and not result[1:4, 8:11, 8:11].any() and not result[8:11, 1:4, 8:11].any()


def test_a_foreground_click_the_networks_ignore_still_touches_its_voxel_and_nothing_else() -> None:
    earlier, drawn = _session_and_pass()
    changed = touched_objects(drawn, earlier, [Click("foreground", (6, 6, 6))])
    assert np.flatnonzero(changed).tolist() == [np.ravel_multi_index((6, 6, 6), SHAPE)]


def test_a_background_click_where_neither_mask_has_tumour_changes_nothing() -> None:
    earlier, drawn = _session_and_pass()
    changed = touched_objects(drawn, earlier, [Click("background", (6, 6, 6))])
    assert not changed.any()
    assert np.array_equal(confine(drawn, earlier, changed, removing_only=True), earlier)


def test_a_request_of_background_clicks_only_removes() -> None:
    earlier, drawn = _session_and_pass()
    clicks = [Click("background", (2, 2, 2))]  # on A: its object changes, but its new slab is not added
    changed = touched_objects(drawn, earlier, clicks)
    assert removing_only(clicks) and not removing_only([*clicks, Click("foreground", (4, 2, 2))])
    assert not removing_only([])
    result = confine(drawn * 0.9, earlier * 0.8, changed, removing_only=True)
    assert np.allclose(result[1:4, 1:4, 1:4], 0.8) and not result[4, 1:4, 1:4].any()
    assert np.allclose(confine(drawn * 0.9, earlier * 0.8, changed, removing_only=False)[1:5, 1:4, 1:4], 0.9)
