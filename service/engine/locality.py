"""What a click may change: the objects it touches; "not tumour" only removes, and in an object's core, all of it.

The interaction contract (DESIGN.md) says what is right stays right and what changes is near
the clicks. The networks redraw their whole window on every pass: after a click on the
tumour's rim they also redraw a hot structure 60 mm away, and a window moved to a click near
its edge sees the session's earlier mask at another place in its field of view and draws it
anew. So the service keeps of each click pass only what the request's clicks ask for
(:func:`confine`):

- **A click changes the objects it touches.** The objects are the connected components
  (26-connected) of the session's mask before the pass, the pass's mask and the voxels of
  the request's new foreground clicks, taken together. An object that holds one of the
  request's new clicks, or reaches what the request's earlier passes changed (the border
  rule's extra pass), takes the pass's probability; every other voxel keeps the session's
  probability, which is 0 where no window reached before: a blob the networks draw far from
  the clicks, or in territory a moved window reaches for the first time, is not added, and
  a tumour far from the clicks is not redrawn.
- **"Not tumour" only removes.** When every new click of the request is a background click,
  the probability nowhere rises above the session's: a background click never adds tumour.
- **"Not tumour" in the core of an object removes the object.** A new background click in
  the core of an object of the session's mask (at least ``DISMISS_DEPTH_MM`` from the
  mask's edge, and at least ``CORE_SHARE`` of the depth of the object's deepest voxel),
  where that object holds no foreground click so far, removes the whole object (in the
  pass's window): a click in the middle of a false-positive blob says the blob is not
  tumour, while a click on a rim, even a false-positive margin two voxels thick around a
  tumour, says where the edge is, and the networks move it. The networks alone remove a
  few voxels around such a click.

A click on a voxel that is background in both masks (a "not tumour" click where there is
none) touches no object and changes nothing. The click guarantee
(:mod:`service.engine.guarantee`) is applied before these rules and holds after them: a
clicked voxel of a touched object takes the pass's guaranteed value, one elsewhere keeps the
session's, which an earlier pass guaranteed, and a removed object holds no foreground click.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from service.engine.windows import inside
from service.store.contract import Click

DISMISS_DEPTH_MM = 4.0
CORE_SHARE = 0.5
_NEIGHBOURS = np.ones((3, 3, 3), dtype=bool)


def confine(probability: np.ndarray, earlier: np.ndarray, new_clicks: Sequence[Click], clicks: Sequence[Click],
            spacing_mm: float, *, reached: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the pass's ``probability`` as the service keeps it, the voxels it may have changed) by the module
    doc's rules; ``earlier`` is the session's probability (0 where no window reached), ``new_clicks`` the
    request's clicks and ``clicks`` all of the session's, window-local (those outside the window are skipped),
    ``reached`` what the request's earlier passes changed."""
    changed = touched_objects(probability, earlier, new_clicks, reached)
    result = np.where(changed, probability, earlier).astype(np.float32)
    if new_clicks and all(c.label == "background" for c in new_clicks):
        np.minimum(result, earlier, out=result)
    dismissed = dismissed_objects(earlier, new_clicks, clicks, spacing_mm)
    result[dismissed] = 0.0
    return result, changed | dismissed


def touched_objects(probability: np.ndarray, earlier: np.ndarray, new_clicks: Sequence[Click],
                    reached: np.ndarray | None = None) -> np.ndarray:
    """The voxels of the objects (see the module doc) that hold a click of ``new_clicks`` or a voxel of ``reached``."""
    union = (earlier > 0.5) | (probability > 0.5)
    fresh = inside(new_clicks, union.shape)
    for click in fresh:
        if click.label == "foreground":
            union[click.voxel] = True
    objects, count = ndimage.label(union, structure=_NEIGHBOURS)
    touched = np.zeros(count + 1, dtype=bool)
    for click in fresh:
        touched[objects[click.voxel]] = True
    if reached is not None:
        touched[np.unique(objects[reached])] = True
    touched[0] = False
    return touched[objects]


def dismissed_objects(earlier: np.ndarray, new_clicks: Sequence[Click], clicks: Sequence[Click],
                      spacing_mm: float) -> np.ndarray:
    """The objects of the session's mask (``earlier`` > 0.5) that hold no foreground click of ``clicks`` and
    whose core holds a new background click: at least ``DISMISS_DEPTH_MM`` from the object's edge and at least
    ``CORE_SHARE`` of the depth of its deepest voxel (depths within the window: its faces are no edge)."""
    mask = earlier > 0.5
    deep = [c for c in inside(new_clicks, mask.shape) if c.label == "background" and mask[c.voxel]]
    if not deep:
        return np.zeros(mask.shape, dtype=bool)
    objects, count = ndimage.label(mask, structure=_NEIGHBOURS)
    dismissed = np.zeros(count + 1, dtype=bool)
    confirmed = {int(objects[c.voxel]) for c in inside(clicks, mask.shape) if c.label == "foreground"}
    boxes = ndimage.find_objects(objects)
    for click in deep:
        label = int(objects[click.voxel])
        if label in confirmed or dismissed[label]:
            continue
        box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(boxes[label - 1], mask.shape))
        own = objects[box] == label  # the object and a margin of one voxel, where the window allows
        depth = ndimage.distance_transform_edt(own) * spacing_mm if not own.all() else np.full(own.shape, np.inf)
        at = tuple(v - s.start for v, s in zip(click.voxel, box))
        dismissed[label] = bool(depth[at] >= max(DISMISS_DEPTH_MM, CORE_SHARE * float(depth.max())))
    dismissed[0] = False
    return dismissed[objects]
