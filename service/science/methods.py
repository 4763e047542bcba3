"""Every compared method behind one interface: initial probability, then refine with clicks.

- ``2s-icr``: the service's :class:`~service.engine.ensemble.Engine` (memory of the
  previous ensemble probability, two stages).
- ``unet``: the initial ensemble alone; clicks change nothing.
- ``deepgrow`` / ``deepedit-25`` / ``deepedit-50``: one interactive ensemble on CT,
  PET and the click maps of all clicks so far (no memory); 0 clicks = empty maps.
- ``pet-threshold``: the classical 40 % of SUVmax baseline, no weights
  (:mod:`service.science.pet_threshold`).

:class:`Guaranteed` puts any of them behind the service's click rules, as a session applies
them to every pass's probability before it is thresholded and becomes the next pass's
memory: the click guarantee (:func:`service.engine.guarantee.honour_clicks`) and what a
click may change (:mod:`service.engine.locality`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from service.engine.checkpoints import LoadedCheckpoint
from service.engine.clicks import click_maps, new_clicks_of
from service.engine.ensemble import Engine, Ensemble
from service.engine.fastpath import autocast_dtype
from service.engine.guarantee import honour_clicks
from service.engine.locality import confine
from service.store.contract import Click


class Segmenter(Protocol):
    def initial_probability(self, images: np.ndarray) -> np.ndarray: ...

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray:
        """``new_clicks``: how many trailing clicks are new since ``previous`` (a hint for windowed paths)."""


class NonInteractive:
    def __init__(self, checkpoint: LoadedCheckpoint, device: torch.device, autocast: str | None = None) -> None:
        self.checkpoint = checkpoint
        self.ensemble = Ensemble(checkpoint.stages["initial"], device, autocast_dtype(autocast, device))

    def initial_probability(self, images: np.ndarray) -> np.ndarray:
        return self.ensemble.probability(images)

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray:
        return previous


class ClickGuided:
    """DeepGrow/DeepEdit: the click maps are the only interaction input."""

    def __init__(self, checkpoint: LoadedCheckpoint, device: torch.device, autocast: str | None = None) -> None:
        self.checkpoint = checkpoint
        self.ensemble = Ensemble(checkpoint.stages["interactive"], device, autocast_dtype(autocast, device))

    def _run(self, images: np.ndarray, clicks: Sequence[Click]) -> np.ndarray:
        guidance = click_maps(clicks, images.shape[1:], *self.checkpoint.click_encoding)
        return self.ensemble.probability(np.concatenate([images, guidance], axis=0))

    def initial_probability(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, ())

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray:
        return self._run(images, clicks)


def segmenter_for(
    checkpoint: LoadedCheckpoint,
    device: torch.device,
    *,
    refine_window: int | None = None,
    refine_margin: int = 16,
    autocast: str | None = None,
) -> Segmenter:
    """The segmenter of a loaded checkpoint's method."""
    if checkpoint.method == "2s-icr":
        return Engine(checkpoint, device, refine_window=refine_window, refine_margin=refine_margin, autocast=autocast)
    if checkpoint.method == "unet":
        return NonInteractive(checkpoint, device, autocast)
    return ClickGuided(checkpoint, device, autocast)


class Guaranteed:
    """A segmenter behind the service's click rules (the click guarantee, then what a click may change)."""

    def __init__(self, segmenter: Segmenter, radius_voxels: float, spacing_mm: float) -> None:
        self.segmenter = segmenter
        self.radius_voxels = radius_voxels
        self.spacing_mm = spacing_mm

    def initial_probability(self, images: np.ndarray) -> np.ndarray:
        return self.segmenter.initial_probability(images)

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray:
        probability = self.segmenter.refine(images, previous, clicks, new_clicks=new_clicks)
        return behind_rules(probability, previous, clicks, new_clicks, self.radius_voxels, self.spacing_mm)


def behind_rules(probability: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], new_clicks: int | None,
                 radius_voxels: float, spacing_mm: float) -> np.ndarray:
    """A pass's ``probability`` as a session keeps it (the click guarantee, then what a click may change) over
    the session's ``previous``; ``new_clicks``: how many trailing ``clicks`` the pass is for (None: all)."""
    probability = honour_clicks(probability, clicks, radius_voxels)
    return confine(probability, previous, new_clicks_of(clicks, new_clicks), clicks, spacing_mm)[0]
