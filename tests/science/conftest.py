"""Science fixtures: tiny random checkpoints of three methods, for the evaluation commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.engine.checkpoints import write_checkpoint
from service.engine.networks import (
    INITIAL_CHANNELS,
    INTERACTIVE_CHANNELS,
    REFINEMENT_CHANNELS,
    Architecture,
    build_unet,
)

TINY = Architecture(channels=(4, 8, 16), strides=(1, 2), num_res_units=1)
METHOD_STAGE_CHANNELS = {
    "2s-icr": {"initial": INITIAL_CHANNELS, "refinement": REFINEMENT_CHANNELS},
    "unet": {"initial": INITIAL_CHANNELS},
    "deepgrow": {"interactive": INTERACTIVE_CHANNELS},
}


@pytest.fixture(scope="session")
def evaluation_inputs(phantom_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two phantom cases ("data") and a two-member random checkpoint per method (24^3 at 4 mm)."""
    root = tmp_path_factory.mktemp("evaluation")
    torch.manual_seed(0)
    paths = {"data": phantom_data}
    for method, stages in METHOD_STAGE_CHANNELS.items():
        nets = {stage: [build_unet(channels, TINY) for _ in range(2)] for stage, channels in stages.items()}
        paths[method] = root / f"weights-{method}"
        write_checkpoint(paths[method], nets, method=method, architecture=TINY, grid_shape=(24, 24, 24),
                         spacing_mm=4.0, description=f"random {method} | test weights")
    return paths
