"""A smoke test of a checkpoint directory: load it as the service does, run each stage once.

One seeded phantom case is written, preprocessed onto the checkpoint's grid with the
service's own preprocessing, and given to the initial ensemble and (when present) to
the refinement ensemble with one simulated click. Phantoms are synthetic: the DSC it
prints says that the passes ran and the output is a probability, not how good weights
trained on real PET-CT are (that is ``icr evaluate`` on held-out cases).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.bench.paths import vram_peak
from service.bench.stats import peak_rss_mib
from service.engine.checkpoints import CheckpointError
from service.engine.ensemble import Engine
from service.engine.loading import load_engine
from service.science.dataset import find_cases, prepare_case
from service.science.metrics import dice
from service.science.phantoms import write_cases
from service.science.simulator import next_click
from service.settings import Settings
from service.store.contract import Click


class WeightsCheckFailed(CheckpointError):
    """The ensemble loaded but a pass gave no usable probability; the message says which and why."""


@dataclass(frozen=True)
class StagePass:
    stage: str
    seconds: float
    foreground_voxels: int
    phantom_dsc: float


@dataclass
class CheckReport:
    weights: Path
    digest: str
    method: str
    members: dict[str, int]
    device: str
    precision: str
    grid_shape: tuple[int, int, int]
    spacing_mm: float
    passes: list[StagePass] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        members = ", ".join(f"{n} {stage}" for stage, n in self.members.items())
        memory = f"peak RSS {self.memory['peak_rss_mib']} MiB (this process)"
        if "peak_vram_mib" in self.memory:
            memory += f", peak CUDA allocated {self.memory['peak_vram_mib']} MiB (the passes)"
        lines = [
            f"weights     {self.weights}",
            f"digest      {self.digest}",
            f"method      {self.method} ({members} members)",
            f"device      {self.device}, precision {self.precision}",
            f"grid        {'x'.join(map(str, self.grid_shape))} at {self.spacing_mm:g} mm",
        ]
        lines += [
            f"{p.stage:<11} {p.seconds:.3f} s per pass, {p.foreground_voxels} foreground voxels, "
            f"phantom DSC {p.phantom_dsc:.3f}"
            for p in self.passes
        ]
        if "refinement" not in self.members:
            lines.append("refinement  absent: the service serves the automatic mask and answers clicks 409")
        lines.append(f"memory      {memory}")
        return lines


def _checked(stage: str, probability: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    if probability.shape != shape:
        raise WeightsCheckFailed(f"the {stage} ensemble returned shape {probability.shape}, not the grid {shape}")
    if not np.isfinite(probability).all():
        raise WeightsCheckFailed(f"the {stage} ensemble returned NaN or infinite probabilities")
    return probability


def _timed_pass(report: CheckReport, stage: str, truth: np.ndarray, run: Any) -> np.ndarray:
    started = time.perf_counter()
    probability = _checked(stage, run(), report.grid_shape)
    seconds = time.perf_counter() - started
    mask = probability > 0.5
    report.passes.append(StagePass(stage, seconds, int(mask.sum()), dice(mask, truth)))
    return probability


def check_weights(settings: Settings, *, phantom_seed: int = 0) -> CheckReport:
    """Load ``settings.weights`` as the service would and run each stage once (CheckpointError if unusable)."""
    engine: Engine = load_engine(settings)
    checkpoint = engine.checkpoint
    report = CheckReport(
        weights=settings.weights, digest=checkpoint.digest, method=checkpoint.method,
        members={stage: len(members) for stage, members in checkpoint.stages.items()},
        device=str(engine.device), precision=engine.precision,
        grid_shape=checkpoint.grid_shape, spacing_mm=checkpoint.spacing_mm,
    )
    with tempfile.TemporaryDirectory(prefix="icr-weights-check-") as scratch:
        write_cases(scratch, 1, phantom_seed)
        case = prepare_case(find_cases(scratch)[0], checkpoint.grid_shape, checkpoint.spacing_mm)
    with vram_peak(engine.device, report.memory):
        initial = _timed_pass(report, "initial", case.truth,
                              lambda: engine.initial_probability(case.images))
        if engine.refinement is not None:
            simulated = next_click(initial, case.truth, np.random.default_rng(phantom_seed))
            click = (Click(simulated.label, simulated.voxel) if simulated is not None
                     else Click("background", (0, 0, 0)))  # a perfect mask: any correct click will do
            _timed_pass(report, "refinement", case.truth,
                        lambda: engine.refine(case.images, initial, [click], new_clicks=1))
    report.memory["peak_rss_mib"] = peak_rss_mib()
    return report
