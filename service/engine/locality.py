"""What a click may change: the objects it touches, and a "not tumour" click only removes.

The interaction contract (DESIGN.md) says what is right stays right and what changes is near
the clicks. The networks redraw their whole window on every pass: after a click on the
tumour's rim they also redraw a hot structure 60 mm away, and a window moved to a click near
its edge sees the session's earlier mask at another place in its field of view and draws it
anew. So the service keeps of each click pass only what the request's clicks ask for:

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

A click on a voxel that is background in both masks (a "not tumour" click where there is
none) touches no object and changes nothing. The click guarantee
(:mod:`service.engine.guarantee`) is applied before these rules and holds after them: a
clicked voxel of a touched object takes the pass's guaranteed value, one elsewhere keeps the
session's, which an earlier pass guaranteed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from service.store.contract import Click

_NEIGHBOURS = np.ones((3, 3, 3), dtype=bool)


def touched_objects(probability: np.ndarray, earlier: np.ndarray, new_clicks: Sequence[Click],
                    reached: np.ndarray | None = None) -> np.ndarray:
    """The voxels of the objects (see the module doc) that hold a click of ``new_clicks`` (window-local;
    those outside the window are skipped) or a voxel of ``reached``."""
    shape = probability.shape
    clicks = [c for c in new_clicks if all(0 <= v < n for v, n in zip(c.voxel, shape))]
    union = (earlier > 0.5) | (probability > 0.5)
    for click in clicks:
        if click.label == "foreground":
            union[click.voxel] = True
    objects, count = ndimage.label(union, structure=_NEIGHBOURS)
    touched = np.zeros(count + 1, dtype=bool)
    for click in clicks:
        touched[objects[click.voxel]] = True
    if reached is not None:
        touched[np.unique(objects[reached])] = True
    touched[0] = False
    return touched[objects]


def confine(probability: np.ndarray, earlier: np.ndarray, changed: np.ndarray, *, removing_only: bool) -> np.ndarray:
    """The pass's ``probability`` where ``changed`` (:func:`touched_objects`), the session's ``earlier``
    elsewhere, and at most ``earlier`` everywhere when ``removing_only`` (every new click says "not tumour")."""
    result = np.where(changed, probability, earlier).astype(np.float32)
    if removing_only:
        np.minimum(result, earlier, out=result)
    return result


def removing_only(new_clicks: Sequence[Click]) -> bool:
    """Whether a request's new clicks are all background clicks (and there is one)."""
    return bool(new_clicks) and all(c.label == "background" for c in new_clicks)
