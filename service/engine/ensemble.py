"""The 2S-ICR engine: initial ensemble, then refinement ensemble with memory.

Ensemble probability = mean of the members' sigmoids; every refinement member gets
the same inputs: CT, PET, the previous *ensemble* probability (the system's last
output) and the click maps of all clicks so far. Mask = probability > 0.5.

With no options the engine computes exactly that, full volume, float32. The fast
paths of :mod:`service.engine.fastpath` change results: a refinement window (off
unless configured) and reduced precision (``autocast``; the service's ``auto``
default is bfloat16 on CPUs with bfloat16 instructions).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from service.engine.checkpoints import LoadedCheckpoint
from service.engine.clicks import click_maps, new_clicks_of
from service.engine.fastpath import (
    DEFAULT_REFINE_MARGIN,
    Window,
    WindowPlan,
    autocast_dtype,
    cpu_bfloat16,
    downsampling_factor,
    for_cpu_bfloat16,
    inference,
    precision_name,
)
from service.store.contract import Click

# One forward pass at a time per device: concurrent passes only fight for memory and cores.
_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()


def device_lock(device: torch.device) -> threading.Lock:
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(str(device), threading.Lock())


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


@dataclass(frozen=True)
class Pass:
    """One ensemble pass: the mean probability and how many members vote foreground per voxel."""

    probability: np.ndarray  # (D, H, W) float32
    votes: np.ndarray  # (D, H, W) uint8, members whose sigmoid > 0.5
    members: int


@dataclass
class Ensemble:
    """Members run back to back on one device; ``autocast`` lowers their precision."""

    members: Sequence[torch.nn.Module]  # UNets, or their for_cpu_bfloat16 copies
    device: torch.device
    autocast: torch.dtype | None = None

    def __post_init__(self) -> None:
        self.members = [member.to(self.device) for member in self.members]
        self.memory_format = torch.contiguous_format
        if cpu_bfloat16(self.device, self.autocast):
            self.memory_format = torch.channels_last_3d
            self.members = [for_cpu_bfloat16(member) for member in self.members]

    def probability(self, inputs: np.ndarray) -> np.ndarray:
        """(C, D, H, W) inputs -> (D, H, W) float32 mean of member sigmoids."""
        return self.run(inputs).probability

    def run(self, inputs: np.ndarray) -> Pass:
        """The mean of member sigmoids and the members' foreground votes, from one pass."""
        batch = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))[None].to(self.device)
        batch = batch.contiguous(memory_format=self.memory_format)
        total = torch.zeros(batch.shape[2:], dtype=torch.float32, device=self.device)
        votes = torch.zeros(batch.shape[2:], dtype=torch.uint8, device=self.device)
        with device_lock(self.device), inference(self.device, self.autocast):
            for member in self.members:
                member_probability = torch.sigmoid(member(batch))[0, 0].float()
                total += member_probability
                votes += member_probability > 0.5
        probability = (total / len(self.members)).cpu().numpy()
        return Pass(probability, votes.cpu().numpy(), len(self.members))


class NoRefinementStage(RuntimeError):
    """The checkpoint has no refinement ensemble (an initial-only ``unet`` import): clicks cannot be served."""


class Engine:
    """The stages of a checkpoint on one device: the initial ensemble, and the refinement one when present.

    ``refine_window`` (voxels per edge; None = exact full-volume refinement) turns on
    windowed refinement with ``refine_margin`` voxels discarded per side;
    ``autocast`` (``auto``, ``off``, ``float16`` on CUDA, ``bfloat16``; None = off)
    lowers precision, see :func:`~service.engine.fastpath.autocast_dtype`.
    """

    window_plan: WindowPlan | None = None  # None: every refinement is the exact full-volume pass

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        device: torch.device,
        *,
        refine_window: int | None = None,
        refine_margin: int = DEFAULT_REFINE_MARGIN,
        autocast: str | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.device = device
        precision = autocast_dtype(autocast, device)
        self.initial = Ensemble(checkpoint.stages["initial"], device, precision)
        refinement = checkpoint.stages.get("refinement")
        self.refinement: Ensemble | None = None if refinement is None else Ensemble(refinement, device, precision)
        self.window_plan = (
            None
            if refine_window is None
            else WindowPlan(refine_window, refine_margin, downsampling_factor(checkpoint.architecture.strides))
        )

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return self.checkpoint.grid_shape

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages served: ``("initial", "refinement")``, or ``("initial",)`` for an initial-only checkpoint."""
        return ("initial",) if self.refinement is None else ("initial", "refinement")

    def refinement_stage(self) -> Ensemble:
        """The refinement ensemble; :class:`NoRefinementStage` on an initial-only checkpoint."""
        if self.refinement is None:
            raise NoRefinementStage(f"checkpoint {self.checkpoint.digest[:12]} has no refinement stage")
        return self.refinement

    @property
    def precision(self) -> str:
        """The dtype the networks compute in: float32 unless autocast is on."""
        return precision_name(self.initial.autocast)

    def initial_probability(self, images: np.ndarray) -> np.ndarray:
        return self.initial_pass(images).probability

    def initial_pass(self, images: np.ndarray) -> Pass:
        """The first mask and first memory of a window: the initial ensemble, then the checkpoint's
        ``zero_click_passes`` refinement passes with no clicks, each on the previous one's output.

        Why: the refinement ensemble is also the better segmenter; run only at the first click,
        its cleaning of the initial ensemble's mask would land wherever that click is, and a
        click far from the tumour would change the mask as much as one on it. Run here, the
        user starts from that mask and a click changes what is near it.
        """
        first = self.initial.run(images)
        for _ in range(self.zero_click_passes):
            first = self.refine_pass(images, first.probability, ())
        return first

    @property
    def zero_click_passes(self) -> int:
        """Refinement passes in each :meth:`initial_pass` (none without a refinement stage)."""
        return 0 if self.refinement is None else self.checkpoint.zero_click_passes

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray:
        """The refinement ensemble's probability given all ``clicks`` so far.

        ``new_clicks``: how many trailing clicks ``previous`` does not reflect yet; the
        refinement window (when configured) is placed around those. None: all of them,
        which is always safe but widens the window as clicks accumulate.
        Raises :class:`NoRefinementStage` on an initial-only checkpoint.
        """
        return self.refine_pass(images, previous, clicks, new_clicks=new_clicks).probability

    def refine_pass(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> Pass:
        """:meth:`refine` with the members' votes; outside a refinement window, where no member
        ran, the votes are unanimous for the previous mask."""
        refinement = self.refinement_stage()
        guidance = click_maps(clicks, previous.shape, *self.checkpoint.click_encoding)
        window = self._window(clicks, new_clicks, previous.shape)
        if window is None:
            return refinement.run(np.concatenate([images, previous[None], guidance], axis=0))
        box = (slice(None), *window.inputs)
        inputs = np.concatenate([images[box], previous[None][box], guidance[box]], axis=0)
        inside = refinement.run(inputs)
        members = inside.members
        probability = np.array(previous, dtype=np.float32, copy=True)
        votes = np.where(previous > 0.5, members, 0).astype(np.uint8)
        probability[window.kept] = inside.probability[window.kept_in_window]
        votes[window.kept] = inside.votes[window.kept_in_window]
        return Pass(probability, votes, members)

    def _window(self, clicks: Sequence[Click], new_clicks: int | None, shape: Sequence[int]) -> Window | None:
        if self.window_plan is None or not clicks:
            return None
        return self.window_plan.around((c.voxel for c in new_clicks_of(clicks, new_clicks)), shape)
