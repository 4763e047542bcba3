"""The input ablation of a 2S-ICR refinement ensemble."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from service.engine.checkpoints import load_checkpoint
from service.engine.ensemble import Engine
from service.science.ablation import VARIANTS, ablate_case, register
from service.science.dataset import find_cases, load_prepared
from service.science.evaluation import interaction_curve, repetition_rng

CPU = torch.device("cpu")


def _ablate(data: Path, weights: Path, *arguments: str) -> tuple[int, str]:
    """(exit code, what it printed) of ``icr ablate --data DATA --weights WEIGHTS ...``."""
    parser = argparse.ArgumentParser(prog="icr")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ablate", "--data", str(data), "--weights", str(weights), *arguments])
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = int(args.run(args))
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def ablated(evaluation_inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """(written JSON, printed table) of one ``icr ablate --seed 3`` on the two phantoms and the 2S-ICR checkpoint."""
    written = tmp_path_factory.mktemp("ablate") / "ablation.json"
    code, printed = _ablate(evaluation_inputs["data"], evaluation_inputs["2s-icr"], "--seed", "3", "--json", str(written))
    assert code == 0
    return json.loads(written.read_text()), printed


def test_memory_and_click_is_the_protocols_first_click(
    evaluation_inputs: dict[str, Path], ablated: tuple[dict, str]
) -> None:
    result, _ = ablated
    checkpoint = load_checkpoint(evaluation_inputs["2s-icr"])
    engine = Engine(checkpoint, CPU)
    cases = find_cases(evaluation_inputs["data"])
    assert list(result["cases"]) == [case.id for case in cases] and result["seed"] == 3
    for index, case in enumerate(cases):
        prepared = load_prepared(case, checkpoint.grid_shape, checkpoint.spacing_mm)
        scores = result["cases"][case.id]
        curve = interaction_curve(engine, prepared, repetition_rng(3, 0, index), max_clicks=1)
        assert scores["initial"] == pytest.approx(curve.dsc[0])
        assert scores["memory+click"] == pytest.approx(curve.dsc[1])
        assert set(scores) == set(VARIANTS) and all(0.0 <= value <= 1.0 for value in scores.values())
        if index == 0:  # the command's scores are ablate_case's on the protocol's stream
            assert ablate_case(engine, prepared, repetition_rng(3, 0, index)) == pytest.approx(scores)
    for name in VARIANTS:
        assert result["mean_dsc"][name] == pytest.approx(sum(case[name] for case in result["cases"].values()) / 2)


def test_the_command_writes_json_and_refuses_other_methods(
    evaluation_inputs: dict[str, Path], ablated: tuple[dict, str]
) -> None:
    written, printed = ablated
    assert set(written["mean_dsc"]) == set(VARIANTS) and len(written["cases"]) == 2
    assert written["digest"] == load_checkpoint(evaluation_inputs["2s-icr"]).digest
    assert "mean DSC" in printed
    assert _ablate(evaluation_inputs["data"], evaluation_inputs["unet"])[0] == 2
