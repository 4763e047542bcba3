"""The 2S-ICR engine: initial ensemble, then refinement ensemble with memory.

Ensemble probability = mean of the members' sigmoids; every refinement member gets
the same inputs: CT, PET, the previous *ensemble* probability (the system's last
output) and the click maps of all clicks so far. Mask = probability > 0.5.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.nets import UNet

from service.engine.checkpoints import LoadedCheckpoint
from service.engine.clicks import click_maps
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


@dataclass
class Ensemble:
    members: list[UNet]
    device: torch.device

    def probability(self, inputs: np.ndarray) -> np.ndarray:
        """(C, D, H, W) inputs -> (D, H, W) float32 mean of member sigmoids."""
        batch = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))[None].to(self.device)
        total = torch.zeros(batch.shape[2:], dtype=torch.float32, device=self.device)
        with device_lock(self.device), torch.inference_mode():
            for member in self.members:
                total += torch.sigmoid(member(batch))[0, 0].float()
        return (total / len(self.members)).cpu().numpy()


class Engine:
    """Both stages of a checkpoint on one device."""

    def __init__(self, checkpoint: LoadedCheckpoint, device: torch.device) -> None:
        self.checkpoint = checkpoint
        self.device = device
        self.initial = Ensemble([m.to(device) for m in checkpoint.stages["initial"]], device)
        self.refinement = Ensemble([m.to(device) for m in checkpoint.stages["refinement"]], device)

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return self.checkpoint.grid_shape

    def initial_probability(self, images: np.ndarray) -> np.ndarray:
        return self.initial.probability(images)

    def refine(self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click]) -> np.ndarray:
        guidance = click_maps(clicks, previous.shape, self.checkpoint.click_sigma_voxels)
        inputs = np.concatenate([images, previous[None], guidance], axis=0)
        return self.refinement.probability(inputs)
