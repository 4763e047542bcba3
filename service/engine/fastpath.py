"""Faster inference: windowed refinement and device tuning.

- **Windowed refinement** changes results, so it is off unless asked for. After a
  click, the refinement ensemble runs on an input window around the new click(s)
  only; the outer ``margin`` voxels of the window are computed but discarded (they
  saw zero padding where the full volume has tissue) and the central part replaces
  the previous probability, which is kept everywhere else. Windows start on
  multiples of the network's downsampling factor, so a voxel deep inside a window
  sees the same strided sampling as in the full pass. The UNet's instance
  normalisation still takes its statistics over the window instead of the volume, so
  even the central part differs from the exact pass: ``icr bench`` reports by how much.
- **Device tuning**: cuDNN autotuning on CUDA (every pass has the same shapes), and
  optional float16/bfloat16 autocast on CUDA only (bfloat16 conv3d was measured about
  50x slower than float32 on a development CPU without bfloat16 instructions).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Box = tuple[slice, slice, slice]

DEFAULT_REFINE_MARGIN = 16
# A window holding at least this share of the volume costs nearly a full pass: run the exact one.
FULL_PASS_SHARE = 0.5
AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------ windows


@dataclass(frozen=True)
class Window:
    """Where a windowed pass reads its inputs and which of its outputs it keeps (volume indices)."""

    inputs: Box
    kept: Box

    @property
    def kept_in_window(self) -> Box:
        """``kept`` relative to the window's own origin."""
        return tuple(slice(k.start - i.start, k.stop - i.start) for k, i in zip(self.kept, self.inputs))  # type: ignore[return-value]

    @property
    def voxels(self) -> int:
        return math.prod(s.stop - s.start for s in self.inputs)


@dataclass(frozen=True)
class WindowPlan:
    """How to place refinement windows: edge ``size`` voxels, ``margin`` discarded per side.

    ``align`` is the network's total downsampling factor: window edges and starts are
    multiples of it, so the network accepts the window and samples it on the same
    lattice as the full volume. ``size`` is rounded up to a multiple of ``align``.
    """

    size: int
    margin: int = DEFAULT_REFINE_MARGIN
    align: int = 1

    def __post_init__(self) -> None:
        if self.align < 1 or self.margin < 0:
            raise ValueError(f"window alignment must be >= 1 and margin >= 0, got {self.align} and {self.margin}")
        size = -(-int(self.size) // self.align) * self.align
        if size - 2 * self.margin <= self.align:
            raise ValueError(
                f"refinement window {self.size} is too small for its margin of {self.margin} voxels per side "
                f"(the kept centre must exceed the network's downsampling factor {self.align})"
            )
        object.__setattr__(self, "size", size)

    def around(self, voxels: Iterable[Sequence[int]], shape: Sequence[int]) -> Window | None:
        """The window keeping ``size - 2 * margin`` voxels around every given voxel.

        None when no voxel is given, when the volume cannot be windowed on this
        lattice, or when the window would hold most of the volume (the exact full pass
        then costs about the same).
        """
        points = np.asarray(list(voxels), dtype=np.int64).reshape(-1, 3)
        if points.size == 0:
            return None
        inputs: list[slice] = []
        kept: list[slice] = []
        for axis, extent in enumerate(shape):
            span = self._axis_span(int(points[:, axis].min()), int(points[:, axis].max()), int(extent))
            if span is None:
                return None
            start, stop = span
            inputs.append(slice(start, stop))
            kept.append(slice(start + self.margin if start > 0 else 0, stop - self.margin if stop < extent else extent))
        window = Window((inputs[0], inputs[1], inputs[2]), (kept[0], kept[1], kept[2]))
        if window.voxels >= FULL_PASS_SHARE * math.prod(int(n) for n in shape):
            return None
        return window

    def _axis_span(self, low: int, high: int, extent: int) -> tuple[int, int] | None:
        """Aligned [start, stop) on one axis, centred on ``low..high``, ``size`` long where the clicks allow.

        A fixed length keeps the input shape fixed from click to click (autotuned kernels
        stay valid); near the volume's border the window is shifted inwards, not cut.
        """
        if extent % self.align:
            return None
        length = min(-(-(high - low + self.size) // self.align) * self.align, extent)
        start = round(((low + high) / 2 - length / 2) / self.align) * self.align
        start = min(max(start, 0), extent - length)
        return start, start + length


def downsampling_factor(strides: Sequence[int]) -> int:
    """The UNet's total downsampling: spatial sizes must be multiples of it."""
    return math.prod(int(s) for s in strides)


# ------------------------------------------------------------------ device tuning


def autocast_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``name`` ('off', 'float16', 'bfloat16') on ``device``: CUDA only."""
    if name is None or name == "off":
        return None
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown autocast dtype {name!r}; use off, {', '.join(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[name] if device.type == "cuda" else None


@contextlib.contextmanager
def cudnn_autotuning(enabled: bool = True) -> Iterator[None]:
    """cuDNN picks its fastest kernels for the shapes it meets (benchmark mode), for this block only.

    Scoped rather than process-wide, so a training loop that builds an engine for
    validation keeps its own cuDNN settings. No effect on a CPU.
    """
    cudnn = torch.backends.cudnn
    before = cudnn.benchmark
    cudnn.benchmark = enabled
    try:
        yield
    finally:
        cudnn.benchmark = before


@contextlib.contextmanager
def inference(device: torch.device, dtype: torch.dtype | None = None) -> Iterator[None]:
    """No autograd bookkeeping; on CUDA, cuDNN autotuning and autocast to ``dtype`` when one is given."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if device.type == "cuda":
            stack.enter_context(cudnn_autotuning())
            if dtype is not None:
                stack.enter_context(torch.autocast(device_type="cuda", dtype=dtype))
        yield
