"""Weights, argument types and the machine description of a benchmark run."""

from __future__ import annotations

import argparse
import logging
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.bench.stats import BenchError
from service.engine.checkpoints import (
    write_checkpoint,
)
from service.engine.networks import (
    INITIAL_CHANNELS,
    REFINEMENT_CHANNELS,
    Architecture,
    build_unet,
)
from service.settings import DEMO_WEIGHTS

log = logging.getLogger(__name__)



def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def random_checkpoint(args: argparse.Namespace, directory: Path) -> Path:
    """Randomly initialised members of the requested architecture, written as a checkpoint the services can load."""
    architecture = Architecture(channels=args.channels, strides=args.strides, num_res_units=args.res_units)
    factor = int(np.prod(args.strides))
    if args.grid % factor:
        raise BenchError(f"--grid {args.grid} must be a multiple of the strides' product {factor}")
    torch.manual_seed(args.seed)
    stages = {
        "initial": [build_unet(INITIAL_CHANNELS, architecture) for _ in range(args.members)],
        "refinement": [build_unet(REFINEMENT_CHANNELS, architecture) for _ in range(args.members)],
    }
    write_checkpoint(directory, stages, architecture=architecture, grid_shape=(args.grid,) * 3,
                     description=f"random initialisation, seed {args.seed} (icr bench)")
    return directory


def choose_weights(args: argparse.Namespace, scratch: Path) -> tuple[Path, str]:
    if args.random:
        return random_checkpoint(args, scratch / "weights"), f"random (seed {args.seed})"
    weights = args.weights or (DEMO_WEIGHTS if (DEMO_WEIGHTS / "manifest.json").is_file() else None)
    if weights is None:
        raise BenchError(f"no weights: pass --weights DIR or --random (no demo checkpoint at {DEMO_WEIGHTS})")
    return Path(weights), str(weights)


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover - monai is a dependency
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


