"""The paper's network: a MONAI 3D UNet, sigmoid output, only the input channels differ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from monai.networks.nets import UNet

INITIAL_CHANNELS = 2  # CT, PET
REFINEMENT_CHANNELS = 5  # CT, PET, previous probability, positive clicks, negative clicks
INTERACTIVE_CHANNELS = 4  # DeepGrow/DeepEdit baselines: CT, PET, positive clicks, negative clicks


@dataclass(frozen=True)
class Architecture:
    """UNet hyper-parameters; the defaults are the paper's."""

    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (1, 2, 2, 2)
    num_res_units: int = 2

    def to_dict(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "strides": list(self.strides), "num_res_units": self.num_res_units}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        return cls(
            channels=tuple(int(c) for c in data["channels"]),
            strides=tuple(int(s) for s in data["strides"]),
            num_res_units=int(data["num_res_units"]),
        )


PAPER_ARCHITECTURE = Architecture()


def build_unet(in_channels: int, architecture: Architecture = PAPER_ARCHITECTURE) -> UNet:
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=1,
        channels=architecture.channels,
        strides=architecture.strides,
        num_res_units=architecture.num_res_units,
    )
