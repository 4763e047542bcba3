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
- **Reduced precision** (autocast) changes results slightly: float16 or bfloat16 on
  CUDA; bfloat16 on a CPU, where each member runs as a rewritten copy
  (:func:`for_cpu_bfloat16`: channels-last, oneDNN's fast layout for bfloat16
  convolutions, with the two layers that are slow in it swapped for equivalents).
  ``auto`` picks bfloat16 on CPUs with bfloat16 instructions (AVX-512 BF16, AMX) and
  float32 everywhere else: without them bfloat16 convolutions were measured 25-50x
  slower than float32.
- **Device tuning**: cuDNN autotuning on CUDA (every pass has the same shapes).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Box = tuple[slice, slice, slice]

DEFAULT_REFINE_MARGIN = 16
# A window holding at least this share of the volume costs nearly a full pass: run the exact one.
FULL_PASS_SHARE = 0.5
AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
AUTOCAST_CHOICES = ("auto", "off", *AUTOCAST_DTYPES)


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


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's own check: AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``name`` (see :data:`AUTOCAST_CHOICES`) on ``device``; None = float32.

    ``auto``: bfloat16 on a CPU with bfloat16 instructions, float32 elsewhere (CUDA
    included). float16 is refused on a CPU, where torch has no fast float16 convolution.
    """
    if name is None or name == "off":
        return None
    if name == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bfloat16() else None
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown autocast dtype {name!r}; use {', '.join(AUTOCAST_CHOICES)}")
    if device.type == "cpu" and name == "float16":
        raise ValueError("float16 autocast needs CUDA; on a CPU use bfloat16 (or auto)")
    return AUTOCAST_DTYPES[name]


def precision_name(dtype: torch.dtype | None) -> str:
    """What the networks compute in: 'float32' without autocast, else the autocast dtype's name."""
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def cpu_bfloat16(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether members run as :func:`for_cpu_bfloat16` copies: bfloat16 on a CPU."""
    return device.type == "cpu" and dtype is torch.bfloat16


class ChannelNorm(nn.Module):
    """Instance normalisation as a group norm with one group per channel: the same
    statistics, but PyTorch's CPU kernel for it reads channels-last tensors in place,
    where ``instance_norm`` copies them to the contiguous layout and back."""

    def __init__(self, norm: nn.InstanceNorm3d) -> None:
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight  # None unless affine
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)


def _as_convolution(layer: nn.ConvTranspose3d) -> nn.Conv3d:
    """A stride-1 transposed convolution as the plain convolution it equals (kernel
    flipped, in/out swapped, padding k-1-p): oneDNN runs the plain one, PyTorch's
    fallback the transposed one (the UNet's last layer took 14% of a bfloat16 pass)."""
    if isinstance(layer.padding, str):  # a transposed convolution's padding is always numbers
        raise TypeError(f"unexpected padding {layer.padding!r}")
    (kd, kh, kw), (pd, ph, pw) = layer.kernel_size, layer.padding
    conv = nn.Conv3d(layer.in_channels, layer.out_channels, (kd, kh, kw), padding=(kd - 1 - pd, kh - 1 - ph, kw - 1 - pw),
                     bias=layer.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(layer.weight.transpose(0, 1).flip(2, 3, 4))
        if conv.bias is not None and layer.bias is not None:
            conv.bias.copy_(layer.bias)
    return conv


def _equivalent(layer: nn.Module) -> nn.Module | None:
    if isinstance(layer, nn.InstanceNorm3d) and not layer.track_running_stats:
        return ChannelNorm(layer)
    if (isinstance(layer, nn.ConvTranspose3d) and layer.groups == 1 and set(layer.stride) == {1}
            and set(layer.dilation) == {1} and set(layer.output_padding) == {0} and layer.padding_mode == "zeros"):
        return _as_convolution(layer)
    return None


def for_cpu_bfloat16(member: nn.Module) -> nn.Module:
    """A copy of ``member`` for bfloat16 autocast on a CPU: channels-last, instance norms as
    :class:`ChannelNorm`, stride-1 transposed convolutions as convolutions. The same
    function as ``member`` (equal to float32 rounding: tested); the original is untouched."""
    # torch's type hints for Module.to lack its memory_format-only form (documented, and tested here)
    return _rewritten(copy.deepcopy(member)).to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]


def _rewritten(module: nn.Module) -> nn.Module:
    """``module`` with every layer that has an :func:`_equivalent` replaced by it, in place."""
    replacement = _equivalent(module)
    if replacement is not None:
        return replacement
    for name, child in list(module.named_children()):
        setattr(module, name, _rewritten(child))
    return module


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
    """No autograd bookkeeping, autocast to ``dtype`` when one is given; on CUDA, cuDNN autotuning."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if device.type == "cuda":
            stack.enter_context(cudnn_autotuning())
        if dtype is not None:
            stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
        yield
