"""The input ablation of a 2S-ICR refinement ensemble."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from service.engine.checkpoints import load_checkpoint, write_checkpoint
from service.engine.ensemble import Engine
from service.science.ablation import VARIANTS, ablate, ablate_case, register
from service.science.dataset import find_cases, load_prepared
from service.science.evaluation import interaction_curve, repetition_rng
from service.science.phantoms import write_cases

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def inputs(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two phantom cases, the shared random 2S-ICR checkpoint and a U-Net made of its initial members."""
    root = tmp_path_factory.mktemp("ablation")
    write_cases(root / "data", 2, seed=11)
    checkpoint = load_checkpoint(tiny_weights)
    write_checkpoint(root / "unet", {"initial": checkpoint.stages["initial"]}, method="unet",
                     architecture=checkpoint.architecture, grid_shape=checkpoint.grid_shape,
                     spacing_mm=checkpoint.spacing_mm, description="random unet | test weights")
    return {"data": root / "data", "2s-icr": tiny_weights, "unet": root / "unet"}


def test_memory_and_click_is_the_protocols_first_click(inputs: dict[str, Path]) -> None:
    checkpoint = load_checkpoint(inputs["2s-icr"])
    engine = Engine(checkpoint, CPU)
    for index, case in enumerate(find_cases(inputs["data"])):
        prepared = load_prepared(case, checkpoint.grid_shape, checkpoint.spacing_mm)
        scores = ablate_case(engine, prepared, repetition_rng(3, 0, index))
        curve = interaction_curve(engine, prepared, repetition_rng(3, 0, index), max_clicks=1)
        assert scores["initial"] == pytest.approx(curve.dsc[0])
        assert scores["memory+click"] == pytest.approx(curve.dsc[1])
        assert set(scores) == set(VARIANTS) and all(0.0 <= value <= 1.0 for value in scores.values())
    result = ablate(inputs["2s-icr"], inputs["data"], seed=3)
    assert result["mean_dsc"]["memory+click"] == pytest.approx(
        sum(case["memory+click"] for case in result["cases"].values()) / 2)


def test_the_command_writes_json_and_refuses_other_methods(inputs: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="icr")
    register(parser.add_subparsers(dest="command", required=True))

    def run(*arguments: str) -> int:
        args = parser.parse_args(["ablate", "--data", str(inputs["data"]), *arguments])
        return int(args.run(args))

    assert run("--weights", str(inputs["2s-icr"]), "--json", str(tmp_path / "ablation.json")) == 0
    written = json.loads((tmp_path / "ablation.json").read_text())
    assert set(written["mean_dsc"]) == set(VARIANTS) and len(written["cases"]) == 2
    assert "mean DSC" in capsys.readouterr().out
    assert run("--weights", str(inputs["unet"])) == 2
