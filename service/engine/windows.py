"""Working windows: where the networks look in a session's scan, and how their outputs make one probability.

A session covers its whole scan. The networks see a *window*: a cube of the
checkpoint's grid shape on the session lattice (the first window's voxels, extended
without end; a window is named by the lattice index of its first voxel, its offset).
The rules:

- **Placement.** The first window is placed at session creation (the given centre or
  the tumour found on PET/CT). A later window is centred on the click(s) that call for
  it and then moved, axis by axis, to lie inside the CT's extent where the CT is
  longer than a window on that axis (so it holds as much scan as it can); where the CT
  is shorter, it is centred on the CT.
- **Which window a click uses.** A window *keeps* a click that lies inside it at least
  ``edge // KEEP_FRACTION`` voxels from every face that the CT continues beyond. A new
  click is refined in the current window when that keeps it, else in the most recent
  other window of the session that keeps it (its memory is there already), else in a
  new window placed around it. Clicks of one request that no one window keeps are
  refined window by window, in the order of their last click; the last window becomes
  the current one.
- **Memory.** A window's memory is the session's probability composed over it; where
  no earlier window reached, the window's first mask is used (the initial ensemble and the
  checkpoint's zero-click passes, :meth:`service.engine.ensemble.Engine.initial_pass`; so
  a click that moves the window costs one initial pass, those, and one refinement pass; a
  click in the current window costs one refinement pass).
- **The border rule.** When a pass's mask has voxels within ``BORDER_VOXELS`` of a face
  of its window that the CT continues beyond, the tumour may be cut there: one more
  pass runs in the window shifted by half an edge towards that face (on each axis
  that touches; where both faces of an axis touch, towards the face with more mask
  voxels), with at most ``border_passes`` such passes per job. The extension is kept
  *under* the window it extends, so the window the user's click chose stays on top.
- **What a pass keeps.** A click pass keeps only the objects its clicks touch, and "not
  tumour" only removes (:mod:`service.engine.locality`): a window moved to a
  click near its edge, which sees the session's mask at another place in its field of view,
  does not redraw it there, and territory it reaches for the first time gains no tumour
  that no click asked for.
- **Stitching.** A version lists its windows in order (:class:`WindowRef`); the
  session's probability at a voxel is that of the last window holding it. A window
  computed again replaces its earlier entry; a version stores only the windows it
  computed, the others are the earlier versions' blobs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from service.store.contract import Click, Extent, WindowRef

Offset = tuple[int, int, int]
KEEP_FRACTION = 8
BORDER_VOXELS = 2


def place(centre: Sequence[float], shape: Sequence[int], extent: Extent) -> Offset:
    """The offset of a window of ``shape`` around the lattice point ``centre`` (see the module doc)."""
    offset = []
    for c, n, lo, hi in zip(centre, shape, extent.low, extent.high):
        start = int(np.floor(float(c) - (n - 1) / 2 + 0.5))
        if hi - lo + 1 >= n:
            start = min(max(start, lo), hi - n + 1)
        else:
            start = int(np.floor((lo + hi) / 2 - (n - 1) / 2 + 0.5))
        offset.append(start)
    return offset[0], offset[1], offset[2]


def keeps(offset: Offset, shape: Sequence[int], voxel: Sequence[int], extent: Extent) -> bool:
    """Whether a click at ``voxel`` is refined in the window at ``offset`` (see the module doc)."""
    for v, start, n, lo, hi in zip(voxel, offset, shape, extent.low, extent.high):
        margin = n // KEEP_FRACTION
        stop = start + n - 1
        if not start <= v <= stop:
            return False
        if v - start < margin and start > lo:
            return False
        if stop - v < margin and stop < hi:
            return False
    return True


def plan(new_clicks: Sequence[Click], known: Sequence[Offset], shape: Sequence[int], extent: Extent) -> list[Offset]:
    """The windows, in order, that refine ``new_clicks`` (see the module doc); the last becomes current.

    ``known`` are the session's windows, the current one last: a click that one of them keeps
    goes there (the current first, then the most recent), else to a new window around it."""
    groups: list[tuple[Offset, int]] = []  # (window, index of its last click)
    for index, click in enumerate(new_clicks):
        for n, (offset, _) in enumerate(groups):
            if keeps(offset, shape, click.voxel, extent):
                groups[n] = (offset, index)
                break
        else:
            here = next((w for w in reversed(known) if keeps(w, shape, click.voxel, extent)), None)
            groups.append((here or place(click.voxel, shape, extent), index))
    return [offset for offset, _ in sorted(groups, key=lambda group: group[1])]


def border_shift(mask: np.ndarray, offset: Offset, extent: Extent) -> Offset | None:
    """The window the border rule adds after a pass in ``offset`` gave ``mask``; None when it adds none."""
    shape = mask.shape
    moved = list(offset)
    for axis, (start, n, lo, hi) in enumerate(zip(offset, shape, extent.low, extent.high)):
        low_face = int(mask.take(range(BORDER_VOXELS), axis=axis).sum()) if start > lo else 0
        high_face = int(mask.take(range(n - BORDER_VOXELS, n), axis=axis).sum()) if start + n - 1 < hi else 0
        if low_face or high_face:
            moved[axis] = start + (n // 2 if high_face > low_face else -(n // 2))
    if tuple(moved) == tuple(offset):
        return None
    centre = [m + (n - 1) / 2 for m, n in zip(moved, shape)]
    target = place(centre, shape, extent)
    return None if target == tuple(offset) else target


def local_clicks(clicks: Sequence[Click], offset: Offset) -> list[Click]:
    """``clicks`` in the window's own voxel indices (those outside it too: the guarantee skips them)."""
    return [Click(c.label, (c.voxel[0] - offset[0], c.voxel[1] - offset[1], c.voxel[2] - offset[2])) for c in clicks]


def inside(clicks: Sequence[Click], shape: Sequence[int]) -> list[Click]:
    """The window-local clicks that lie in a window of ``shape``: what its click maps show."""
    return [c for c in clicks if all(0 <= v < n for v, n in zip(c.voxel, shape))]


class Canvas:
    """A version's windows, composed: the session's probability over any box of the lattice.

    ``load`` gives a stored window's probability (the worker caches them); the windows this
    job computed are held here until they are committed.
    """

    def __init__(self, windows: Sequence[WindowRef], shape: Sequence[int], load: Callable[[WindowRef], np.ndarray]):
        self.windows = list(windows)
        self.shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self._load = load
        self._computed: dict[WindowRef, np.ndarray] = {}

    def probability(self, ref: WindowRef) -> np.ndarray:
        return self._computed[ref] if ref in self._computed else self._load(ref)

    def compose(self, low: Sequence[int], shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(probability, covered) over the lattice box at ``low`` of ``shape``: 0 and False where no window reaches."""
        size = tuple(int(n) for n in shape)
        probability = np.zeros(size, dtype=np.float32)
        covered = np.zeros(size, dtype=bool)
        box_low = np.asarray(low, dtype=int)
        for ref in self.windows:
            start = np.maximum(box_low, ref.offset)
            stop = np.minimum(box_low + size, np.asarray(ref.offset) + self.shape)
            if np.any(stop <= start):
                continue
            target = tuple(slice(int(a), int(b)) for a, b in zip(start - box_low, stop - box_low))
            source = tuple(slice(int(a), int(b)) for a, b in zip(start - ref.offset, stop - ref.offset))
            probability[target] = self.probability(ref)[source]
            covered[target] = True
        return probability, covered

    def add(self, ref: WindowRef, probability: np.ndarray, *, under: WindowRef | None = None) -> None:
        """Record a newly computed window: on top, or just under ``under``; it replaces an entry at its offset."""
        self._computed[ref] = probability
        self.windows = [w for w in self.windows if w.offset != ref.offset]
        at = self.windows.index(under) if under is not None and under in self.windows else len(self.windows)
        self.windows.insert(at, ref)

    def union_box(self) -> tuple[Offset, tuple[int, int, int]]:
        """The lattice box (low, shape) holding every window."""
        offsets = np.asarray([w.offset for w in self.windows], dtype=int)
        low = offsets.min(axis=0)
        i, j, k = (int(n) for n in offsets.max(axis=0) + self.shape - low)
        a, b, c = (int(v) for v in low)
        return (a, b, c), (i, j, k)
