"""Training for interaction: the memory-keep term and no-op clicks of a 2S-ICR refinement sample."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine.checkpoints import STAGE_CHANNELS
from service.engine.clicks import click_maps
from service.engine.networks import INITIAL_CHANNELS, build_unet
from service.science import training_samples
from service.science.dataset import find_cases, load_prepared
from service.science.methods import Guaranteed
from service.science.simulator import NO_OP_MIN_DISTANCE_MM
from service.science.training_config import CONFIGS
from service.science.training_samples import StageTrainer
from service.store.contract import Click

CPU = torch.device("cpu")


def _first_losses(phantom_data: Path, name: str, values: tuple[float, ...]) -> dict[float, float]:
    """The first interaction's loss of the same sample and click, per value of the setting ``name``."""
    config = replace(CONFIGS["tiny"], max_train_clicks=3, p_drop=0.0)
    case = load_prepared(find_cases(phantom_data)[0], config.grid_shape, config.spacing_mm)
    torch.manual_seed(0)
    initial = build_unet(INITIAL_CHANNELS, config.architecture)
    net = build_unet(STAGE_CHANNELS["refinement"], config.architecture)
    losses = {}
    for value in values:
        trainer = StageTrainer("2s-icr", "refinement", replace(config, **{name: value}), CPU, seed=3)
        trainer.use_initial([initial], [{"train": [case.id], "val": []}])
        closure = trainer.steps(net, 0, [case])[0]
        with torch.no_grad():
            losses[value] = float(closure())
    return losses


def test_the_keep_loss_adds_the_bce_to_the_memory_away_from_the_clicks(phantom_data: Path) -> None:
    losses = _first_losses(phantom_data, "keep_loss_weight", (0.0, 1.0))
    assert losses[1.0] > losses[0.0] + 0.01  # an untrained net does not reproduce its memory


def test_a_no_op_training_click_is_background_far_from_mask_and_truth(phantom_data: Path) -> None:
    config = replace(CONFIGS["tiny"], no_op_click_chance=1.0)
    case = load_prepared(find_cases(phantom_data)[0], config.grid_shape, config.spacing_mm)
    trainer = StageTrainer("2s-icr", "refinement", config, CPU, seed=0)
    mask = np.zeros(case.truth.shape, dtype=bool)
    click = trainer._training_click(mask, case.images, case.truth)
    assert click is not None and click.label == "background"
    where = np.argwhere(case.truth)
    distance = np.sqrt((((where - np.asarray(click.voxel)) * config.spacing_mm) ** 2).sum(axis=1)).min()
    assert distance >= NO_OP_MIN_DISTANCE_MM
    # never: the simulated user corrects errors
    ordinary = StageTrainer("2s-icr", "refinement", replace(config, no_op_click_chance=0.0), CPU, seed=0)
    correcting = ordinary._training_click(mask, case.images, case.truth)
    assert correcting is not None and correcting.label == "foreground" and case.truth[correcting.voxel]


def test_zero_click_passes_open_each_refinement_sample_without_clicks(phantom_data: Path) -> None:
    config = replace(CONFIGS["tiny"], max_train_clicks=1, p_drop=0.0, zero_click_passes=2)
    case = load_prepared(find_cases(phantom_data)[0], config.grid_shape, config.spacing_mm)
    torch.manual_seed(0)
    trainer = StageTrainer("2s-icr", "refinement", config, CPU, seed=3)
    trainer.use_initial([build_unet(INITIAL_CHANNELS, config.architecture)], [{"train": [case.id], "val": []}])
    seen: list[torch.Tensor] = []
    net = build_unet(STAGE_CHANNELS["refinement"], config.architecture)
    net.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0][0, 3:].clone()))
    closures = trainer.steps(net, 0, [case])
    assert len(closures) == 3  # two click-free interactions, then the one clicked (max_train_clicks=1)
    with torch.no_grad():
        for closure in closures:
            closure()
    assert [bool(maps.any()) for maps in seen] == [False, False, True]
    assert trainer.segmenter(net, 0).checkpoint.zero_click_passes == 2  # validation runs them too


def test_training_encodes_clicks_with_the_configured_sigma_overlap_and_reach_and_validates_with_them(
    phantom_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = replace(CONFIGS["tiny"], max_train_clicks=3, p_drop=0.0, click_overlap="max", click_sigma_voxels=1.5,
                     click_reach_sigma_voxels={"foreground": 3.0})
    case = load_prepared(find_cases(phantom_data)[0], config.grid_shape, config.spacing_mm)
    torch.manual_seed(0)
    trainer = StageTrainer("2s-icr", "refinement", config, CPU, seed=3)
    trainer.use_initial([build_unet(INITIAL_CHANNELS, config.architecture)], [{"train": [case.id], "val": []}])
    encoded: list[tuple[float, str, tuple[tuple[str, float], ...]]] = []

    def recording(clicks: Sequence[Click], shape: Sequence[int], sigma: float, overlap: str = "sum",
                  reach: Mapping[str, float] | None = None) -> np.ndarray:
        encoded.append((sigma, overlap, tuple(sorted((reach or {}).items()))))
        return click_maps(clicks, shape, sigma, overlap, reach)

    monkeypatch.setattr(training_samples, "click_maps", recording)
    net = build_unet(STAGE_CHANNELS["refinement"], config.architecture)
    with torch.no_grad():
        for closure in trainer.steps(net, 0, [case]):
            closure()
    assert encoded and set(encoded) == {(1.5, "max", (("foreground", 3.0),))}
    # validation encodes as training does
    assert trainer.segmenter(net, 0).checkpoint.click_encoding == (1.5, "max", {"foreground": 3.0})


@pytest.mark.parametrize("behind_rules", [True, False])
def test_memory_behind_the_rules_gives_every_click_so_far_its_label(
    phantom_data: Path, monkeypatch: pytest.MonkeyPatch, behind_rules: bool
) -> None:
    config = replace(CONFIGS["tiny"], max_train_clicks=3, p_drop=0.0, memory_behind_rules=behind_rules)
    case = load_prepared(find_cases(phantom_data)[0], config.grid_shape, config.spacing_mm)
    torch.manual_seed(0)
    initial = build_unet(INITIAL_CHANNELS, config.architecture)
    net = build_unet(STAGE_CHANNELS["refinement"], config.architecture)
    encoded: list[list[Click]] = []

    def recording(clicks: Sequence[Click], *args: object, **kwargs: object) -> np.ndarray:
        encoded.append(list(clicks))
        return click_maps(clicks, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(training_samples, "click_maps", recording)
    memories: list[np.ndarray] = []
    net.register_forward_hook(lambda _module, inputs, _output: memories.append(inputs[0][0, 2].numpy().copy()))
    closures: list = []
    seed = 0
    while len(closures) < 3:  # the first sample (by seed) with three clicked interactions
        trainer = StageTrainer("2s-icr", "refinement", config, CPU, seed=seed)
        trainer.use_initial([initial], [{"train": [case.id], "val": []}])
        closures, seed = trainer.steps(net, 0, [case]), seed + 1
    with torch.no_grad():
        for closure in closures:
            closure()
    labels = [[memory[c.voxel] == (c.label == "foreground") for c in clicks]
              for memory, clicks in zip(memories[1:], encoded)]  # each memory holds the clicks before its pass
    assert all(len(held) == n + 1 for n, held in enumerate(labels))
    assert all(all(held) for held in labels) == behind_rules  # an untrained net does not give them exactly
    assert isinstance(trainer.segmenter(net, 0), Guaranteed) == behind_rules  # validated as trained
