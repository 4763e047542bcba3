"""Turn settings into a ready engine, or fail with a message an operator can act on."""

from __future__ import annotations

import logging

import torch

from service.engine.checkpoints import SERVED_METHODS, load_checkpoint
from service.engine.ensemble import Engine, resolve_device
from service.engine.fastpath import cpu_bfloat16, cpu_has_bfloat16
from service.settings import Settings

log = logging.getLogger(__name__)


def load_engine(settings: Settings) -> Engine:
    """Load the checkpoint's ensembles onto the configured device (CheckpointError if unusable).

    A ``2s-icr`` checkpoint serves both stages; an initial-only ``unet`` one serves the
    automatic mask and no clicks.
    """
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    checkpoint = load_checkpoint(settings.weights, method=SERVED_METHODS)
    try:
        engine = Engine(
            checkpoint,
            device,
            refine_window=settings.refine_window,
            refine_margin=settings.refine_margin,
            autocast=settings.autocast,
        )
    except ValueError as error:  # a window or precision the device cannot run: the operator must fix the setting
        raise RuntimeError(f"invalid fast-path settings: {error}") from error
    if cpu_bfloat16(device, engine.initial.autocast) and not cpu_has_bfloat16():
        log.warning("bfloat16 on a CPU without bfloat16 instructions is many times slower than float32; "
                    "set ICR_AUTOCAST=auto or off")
    log.info(
        "loaded %d initial + %d refinement members from %s onto %s (grid %s, %s, refinement %s)",
        len(checkpoint.stages["initial"]), len(checkpoint.stages.get("refinement", ())),
        settings.weights, device, checkpoint.grid_shape, engine.precision,
        "absent: clicks are refused" if engine.refinement is None
        else "full volume" if engine.window_plan is None
        else f"windowed {engine.window_plan.size}^3, margin {engine.window_plan.margin}",
    )
    return engine
