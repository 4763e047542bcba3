"""Simulated-click evaluation: one session's curve, repetitions, and the `icr evaluate` report."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine.guarantee import honour_clicks, honour_radius_voxels
from service.imaging.grid import WorkingGrid
from service.science.dataset import PreparedCase
from service.science.evaluation import (
    evaluate,
    evaluate_method,
    guarantee_labels,
    interaction_curve,
    no_op_result,
    register,
    repetition_rng,
    worst_hd95_mm,
)
from service.science.methods import Guaranteed
from service.science.report import (
    changed_voxel_summary,
    choose_reference,
    column_significance,
    dsc_table,
    hd95_table,
    noc_table,
    summary_columns,
)
from service.science.results import CaseResult, Curve, MethodResult
from service.science.simulator import ClickRule
from service.store.contract import Click

SHAPE = (20, 20, 20)
GRID = WorkingGrid(SHAPE, 2.0, (0.0, 0.0, 0.0))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ball(centre: Sequence[float], radius: float, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    ijk = np.indices(shape, dtype=np.float64)
    return sum((ijk[a] - centre[a]) ** 2 for a in range(3)) <= radius**2


class TruthPainter:
    """A segmenter that, at each click, paints the truth into a ball around the newest click.

    The truth comes in as image channel 0 (see :func:`_case`); its masks can only get
    closer to it, and it records what it was given.
    """

    def __init__(self, initial: np.ndarray, radius: float) -> None:
        self.checkpoint = None
        self.initial = initial.astype(np.float32)
        self.radius = radius
        self.initial_calls = 0
        self.calls: list[tuple[np.ndarray, tuple[Click, ...], np.ndarray]] = []

    def initial_probability(self, images: np.ndarray) -> np.ndarray:
        self.initial_calls += 1
        return self.initial.copy()

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray:
        newest, truth = clicks[-1], images[0] > 0.5
        ball = _ball(newest.voxel, self.radius, previous.shape)
        probability = previous.copy()
        if newest.label == "foreground":
            probability[ball & truth] = 1.0
        else:
            probability[ball & ~truth] = 0.0
        self.calls.append((previous.copy(), tuple(clicks), probability.copy()))
        return probability


def _case(truth: np.ndarray, case_id: str = "fake") -> PreparedCase:
    """A prepared case whose first image channel is its truth, for :class:`TruthPainter`."""
    images = np.zeros((2, *truth.shape), dtype=np.float32)
    images[0] = truth
    return PreparedCase(case_id, images, truth, GRID)


@pytest.fixture
def truth() -> np.ndarray:
    return _ball((10, 10, 10), 5)


@pytest.fixture
def shifted(truth: np.ndarray) -> np.ndarray:
    """An initial mask with as many misses as spurious voxels, so both click kinds come up."""
    return _ball((12, 10, 10), 5)


def test_clicks_come_from_the_current_masks_errors_and_accumulate(truth: np.ndarray, shifted: np.ndarray) -> None:
    painter = TruthPainter(shifted, radius=2)
    curve = interaction_curve(painter, _case(truth), np.random.default_rng(0), max_clicks=8)
    assert len(painter.calls) == len(curve.clicks) == 8
    assert {c.label for c in curve.clicks} == {"foreground", "background"}
    for index, (previous, clicks, _) in enumerate(painter.calls):
        assert clicks == curve.clicks[: index + 1]  # all clicks so far, oldest first
        mask, newest = previous > 0.5, clicks[-1]
        if newest.label == "foreground":
            assert truth[newest.voxel] and not mask[newest.voxel]
        else:
            assert mask[newest.voxel] and not truth[newest.voxel]
    # memory: each refinement starts from the previous output
    for (_, _, output), (previous, _, _) in zip(painter.calls, painter.calls[1:]):
        np.testing.assert_array_equal(output, previous)


def test_dsc_never_drops_and_changed_voxels_count_flips(truth: np.ndarray, shifted: np.ndarray) -> None:
    painter = TruthPainter(shifted, radius=2)
    curve = interaction_curve(painter, _case(truth), np.random.default_rng(3), max_clicks=10)
    assert curve.dsc.shape == curve.hd95.shape == curve.changed_voxels.shape == (11,)
    assert np.all(np.diff(curve.dsc) >= 0)
    assert curve.dsc[-1] > curve.dsc[0]
    assert np.all(np.isfinite(curve.hd95)) and np.all(curve.hd95 >= 0)
    assert curve.changed_voxels[0] == 0
    for k, (previous, _, output) in enumerate(painter.calls, start=1):
        assert curve.changed_voxels[k] == np.count_nonzero((previous > 0.5) != (output > 0.5))
    assert curve.changed_voxels[1:].sum() > 0


def test_same_seed_gives_identical_curves(truth: np.ndarray, shifted: np.ndarray) -> None:
    def run(seed: int):
        return interaction_curve(TruthPainter(shifted, 2), _case(truth), np.random.default_rng(seed), 6)

    first, again = run(7), run(7)
    assert first.clicks == again.clicks
    np.testing.assert_array_equal(first.dsc, again.dsc)
    np.testing.assert_array_equal(first.hd95, again.hd95)
    np.testing.assert_array_equal(first.changed_voxels, again.changed_voxels)
    assert any(run(seed).clicks != first.clicks for seed in range(8, 12))


def test_perfect_initial_mask_keeps_the_curve_constant(truth: np.ndarray) -> None:
    painter = TruthPainter(truth, radius=2)
    curve = interaction_curve(painter, _case(truth), np.random.default_rng(0), max_clicks=5)
    assert painter.calls == [] and curve.clicks == ()
    np.testing.assert_array_equal(curve.dsc, np.ones(6))
    np.testing.assert_array_equal(curve.hd95, np.zeros(6))
    np.testing.assert_array_equal(curve.changed_voxels, np.zeros(6))


def test_mask_made_perfect_mid_session_stays_constant() -> None:
    small = _ball((10, 10, 10), 2)
    painter = TruthPainter(np.zeros(SHAPE), radius=8)  # one click paints the whole tumour
    curve = interaction_curve(painter, _case(small), np.random.default_rng(0), max_clicks=4)
    assert len(curve.clicks) == 1 and curve.clicks[0].label == "foreground"
    assert curve.dsc[0] == 0.0
    np.testing.assert_array_equal(curve.dsc[1:], np.ones(4))
    np.testing.assert_array_equal(curve.hd95[1:], np.zeros(4))
    assert curve.changed_voxels[1] == small.sum()
    np.testing.assert_array_equal(curve.changed_voxels[2:], np.zeros(3))


def test_empty_prediction_hd95_is_the_grid_diagonal(truth: np.ndarray) -> None:
    painter = TruthPainter(np.zeros(SHAPE), radius=2)
    curve = interaction_curve(painter, _case(truth), np.random.default_rng(0), max_clicks=0)
    assert curve.dsc.tolist() == [0.0]
    assert curve.hd95[0] == pytest.approx(worst_hd95_mm(GRID)) == pytest.approx(2.0 * np.sqrt(3 * 20**2))


def test_evaluate_method_seeds_each_repetition_and_averages(truth: np.ndarray, shifted: np.ndarray) -> None:
    cases = [_case(truth), _case(_ball((8, 9, 11), 4), "other")]
    painter = TruthPainter(shifted, radius=2)
    result = evaluate_method(painter, cases, max_clicks=3, repetitions=2, seed=5, rule=ClickRule.LINEAR)
    assert result.case_ids == ["fake", "other"] and result.repetitions == 2
    assert painter.initial_calls == 2  # once per case, shared by its repetitions
    for index, case in enumerate(cases):
        for r in range(2):
            expected = interaction_curve(painter, case, repetition_rng(5, r, index), 3, ClickRule.LINEAR)
            assert result.cases[index].repetitions[r].clicks == expected.clicks
        per_repetition = [curve.dsc for curve in result.cases[index].repetitions]
        np.testing.assert_allclose(result.cases[index].dsc, np.mean(per_repetition, axis=0))
    assert result.dsc_by_case().shape == result.hd95_by_case().shape == (2, 4)


class Ignoring:
    """A segmenter that keeps its previous output whatever the clicks say."""

    def __init__(self, initial: np.ndarray) -> None:
        self.initial = initial.astype(np.float32)

    def initial_probability(self, images: np.ndarray) -> np.ndarray:
        return self.initial.copy()

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray:
        return previous


class Blotting(Ignoring):
    """A segmenter that marks a radius-1 ball of foreground at every new click, whatever its label."""

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray:
        probability = previous.copy()
        probability[_ball(clicks[-1].voxel, 1, previous.shape)] = 1.0
        return probability


def test_curve_counts_honoured_clicks_and_local_dice_of_one_perfect_click() -> None:
    small = _ball((10, 10, 10), 2)
    curve = interaction_curve(TruthPainter(np.zeros(SHAPE), radius=8), _case(small), np.random.default_rng(0), 4)
    assert curve.foreground_honoured.tolist() == [0, 1, 1, 1, 1]
    assert curve.background_honoured.tolist() == [0] * 5
    assert curve.clicks_so_far("foreground").tolist() == [0, 1, 1, 1, 1]
    # 15 mm on 2 mm voxels: the whole small tumour is inside the ball; empty before, perfect after
    assert curve.local_dice_before[1] == 0.0 and curve.local_dice_after[1] == 1.0
    assert np.isnan(curve.local_dice_before[[0, 2, 3, 4]]).all() and np.isnan(curve.local_dice_after[[0, 2, 3, 4]]).all()


def test_curve_of_a_segmenter_that_ignores_clicks(truth: np.ndarray) -> None:
    curve = interaction_curve(Ignoring(np.zeros(SHAPE)), _case(truth), np.random.default_rng(0), 3)
    assert [click.label for click in curve.clicks] == ["foreground"] * 3  # the mask stays empty
    assert curve.foreground_honoured.tolist() == [0, 0, 0, 0]
    assert curve.clicks_so_far("foreground").tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(curve.local_dice_before[1:], [0.0] * 3)
    np.testing.assert_array_equal(curve.local_dice_after[1:], [0.0] * 3)


def test_the_guarantee_honours_every_click_and_feeds_the_memory(truth: np.ndarray, shifted: np.ndarray) -> None:
    alone = interaction_curve(Ignoring(shifted), _case(truth), np.random.default_rng(2), 6)
    assert alone.foreground_honoured[-1] + alone.background_honoured[-1] < len(alone.clicks)
    painter = TruthPainter(shifted, radius=0)  # records what it is given
    guaranteed = Guaranteed(painter, honour_radius_voxels(GRID.spacing_mm), GRID.spacing_mm)
    curve = interaction_curve(guaranteed, _case(truth), np.random.default_rng(2), 6)
    for k in range(1, len(curve.clicks) + 1):
        assert curve.foreground_honoured[k] == curve.clicks_so_far("foreground")[k]
        assert curve.background_honoured[k] == curve.clicks_so_far("background")[k]
    for (_, clicks, output), (previous, _, _) in zip(painter.calls, painter.calls[1:]):
        np.testing.assert_array_equal(previous, honour_clicks(output, clicks, honour_radius_voxels(2.0)))


class Redrawing(Ignoring):
    """A segmenter that answers every click with a blob in a far corner and the truth gone."""

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray:
        return _ball((17, 17, 17), 2).astype(np.float32)


def test_behind_the_service_rules_a_click_changes_only_the_object_it_touches(truth: np.ndarray) -> None:
    # the initial mask is the truth plus a small false blob far from it; the networks redraw everything
    blob = _ball((3, 3, 16), 1)
    guaranteed = Guaranteed(Redrawing(truth | blob), honour_radius_voxels(GRID.spacing_mm), GRID.spacing_mm)
    initial = guaranteed.initial_probability(np.zeros((2, *SHAPE), dtype=np.float32))
    removed = guaranteed.refine(np.zeros((2, *SHAPE), dtype=np.float32), initial, (Click("background", (3, 3, 16)),))
    # the background click touches the blob: it goes; the tumour it does not touch stays; the corner blob the
    # networks drew touches no click and does not appear
    assert np.array_equal(removed > 0.5, truth)
    again = guaranteed.refine(np.zeros((2, *SHAPE), dtype=np.float32), removed,
                              (Click("background", (3, 3, 16)), Click("foreground", (17, 17, 17))), new_clicks=1)
    assert np.array_equal(again > 0.5, truth | _ball((17, 17, 17), 2))  # the foreground click asks for its blob


def test_no_op_result_by_hand() -> None:
    corner = _ball((3, 3, 3), 1)  # 7 voxels; the far corner is ~27 voxels (54 mm) away
    case = _case(corner)
    still = no_op_result(Ignoring(corner), case, corner.astype(np.float32))
    assert still is not None and still.click.label == "background"
    assert not corner[still.click.voxel]
    assert (still.delta_dsc, still.delta_voxels, still.changed_voxels) == (0.0, 0, 0)
    blotted = no_op_result(Blotting(corner), case, corner.astype(np.float32))
    assert blotted is not None and blotted.click == still.click
    assert (blotted.dsc_before, blotted.voxels_before, blotted.voxels_after) == (1.0, 7, 14)
    assert blotted.dsc_after == pytest.approx(2 * 7 / (7 + 14)) and blotted.changed_voxels == 7
    guaranteed = no_op_result(Guaranteed(Blotting(corner), 1.75, GRID.spacing_mm), case, corner.astype(np.float32))
    assert guaranteed is not None and guaranteed.delta_voxels == 0  # the background click's ball wins
    assert no_op_result(Ignoring(truth := _ball((10, 10, 10), 9)), _case(truth), truth.astype(np.float32)) is None


def test_guarantee_labels() -> None:
    assert guarantee_labels("demo", "both") == [("demo", False), ("demo+guarantee", True)]
    assert guarantee_labels("demo", "on") == [("demo+guarantee", True)]
    assert guarantee_labels("demo", "off") == [("demo", False)]


def _made_up_result(dsc_by_repetition: Sequence[Sequence[float]], cases: int = 8) -> MethodResult:
    """Cases whose DSC curves are given per repetition (+ a small per-case offset) and HD95 = case index."""
    click = Click("foreground", (0, 0, 0))
    return MethodResult(tuple(
        CaseResult(f"case{i}", tuple(
            Curve(np.asarray(dsc) + 0.001 * i, np.full(len(dsc), float(i)), np.r_[0, np.full(len(dsc) - 1, 10 + i)],
                  (click,) * (len(dsc) - 1), foreground_honoured=np.arange(len(dsc)),
                  background_honoured=np.zeros(len(dsc), dtype=np.int64),
                  local_dice_before=np.r_[np.nan, np.full(len(dsc) - 1, 0.5)],
                  local_dice_after=np.r_[np.nan, np.full(len(dsc) - 1, 0.75)])
            for dsc in dsc_by_repetition
        ))
        for i in range(cases)
    ))


def test_summaries_follow_the_papers_aggregation() -> None:
    icr = _made_up_result([[0.70, 0.80, 0.90], [0.70, 0.76, 0.84]])
    unet = _made_up_result([[0.50, 0.50, 0.50], [0.50, 0.50, 0.50]])
    columns = summary_columns(2)
    assert [(c.key, c.header, c.clicks) for c in columns] == [
        ("0", "0 clicks", (0,)), ("1", "1 click", (1,)), ("avg_0_2", "0 to 2 avg.", (0, 1, 2))]
    assert [c.key for c in summary_columns(20)] == ["0", "1", "5", "10", "avg_0_10"]
    dsc = dsc_table({"2s-icr": icr}, columns)["2s-icr"]
    assert dsc["1"]["mean"] == pytest.approx(0.78 + 0.0035)
    assert dsc["avg_0_2"]["mean"] == pytest.approx(np.mean([0.70, 0.78, 0.87]) + 0.0035)
    hd95 = hd95_table({"2s-icr": icr}, columns)["2s-icr"]["0"]
    assert (hd95["median"], hd95["iqr"]) == (pytest.approx(3.5), pytest.approx(3.5))
    noc = noc_table(icr, max_clicks=2)
    assert (noc["dsc>=0.75"]["noc_mean"], noc["dsc>=0.75"]["pof_percent_mean"]) == (1.0, 0.0)
    # 0.85: every case reaches it at click 2 in repetition 0 and fails in repetition 1
    high = noc["dsc>=0.85"]
    assert (high["noc_mean"], high["noc_sd"]) == (2.0, 0.0)
    assert (high["pof_percent_mean"], high["pof_percent_sd"]) == (50.0, 50.0)
    assert (high["failures"], high["sessions"]) == (8.0, 16.0)
    changes = changed_voxel_summary(icr)
    assert (changes["mean"], changes["interactions"]) == (pytest.approx(13.5), 32.0)
    tests = column_significance({"2s-icr": icr, "unet": unet}, columns, "2s-icr", "dsc")
    assert set(tests) == {"unet"}
    assert all(t["significant"] and t["median_difference"] > 0 for t in tests["unet"].values())
    assert column_significance({"unet": unet}, columns, "unet", "dsc") == {}


def test_reference_choice() -> None:
    assert choose_reference(["unet", "2s-icr"]) == "2s-icr"
    assert choose_reference(["unet", "deepgrow"]) == "unet"
    assert choose_reference(["unet", "deepgrow"], "deepgrow") == "deepgrow"
    with pytest.raises(ValueError):
        choose_reference(["unet"], "2s-icr")


# ----------------------------------------------------------------- icr evaluate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icr")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(arguments: list[str]) -> int:
    args = _parser().parse_args(arguments)
    return int(args.run(args))


@pytest.fixture(scope="module")
def report_dir(evaluation_inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    code = _run([
        "evaluate", "--data", str(evaluation_inputs["data"]),
        "--weights", f"unet={evaluation_inputs['unet']}",
        "--weights", f"2s-icr={evaluation_inputs['2s-icr']}",
        "--weights", f"deepgrow={evaluation_inputs['deepgrow']}",
        "--out", str(out), "--max-clicks", "3", "--repetitions", "2", "--seed", "1",
        "--rule", "linear", "--device", "cpu", "--cache", str(out / "cache"),
    ])
    assert code == 0
    return out


@pytest.mark.slow  # the whole `icr evaluate`: three checkpoints, each alone and guaranteed, and the baseline
def test_report_json_is_complete_and_consistent(report_dir: Path, evaluation_inputs: dict[str, Path]) -> None:
    report = json.loads((report_dir / "report.json").read_text())
    config = report["config"]
    assert (config["max_clicks"], config["repetitions"], config["seed"], config["rule"]) == (3, 2, 1, "linear")
    assert len(config["case_ids"]) == 2 and config["device"] == "cpu" and config["precision"] == "float32"
    assert config["reference"] == "2s-icr"  # the default reference wins over the first label
    for name in ("unet", "2s-icr", "deepgrow"):
        identity = report["methods"][name]
        assert identity["method"] == name
        manifest = (evaluation_inputs[name] / "manifest.json").read_bytes()
        assert identity["checkpoint_digest"] == hashlib.sha256(manifest).hexdigest()
        cases = report["cases"][name]
        assert [c["case_id"] for c in cases] == config["case_ids"]
        for case in cases:
            assert len(case["dsc"]) == len(case["hd95"]) == 4
            assert len(case["repetitions"]) == 2
            for repetition in case["repetitions"]:
                assert len(repetition["dsc"]) == len(repetition["changed_voxels"]) == 4
                assert len(repetition["clicks"]) <= 3
            np.testing.assert_allclose(case["dsc"], np.mean([r["dsc"] for r in case["repetitions"]], axis=0))
        column_zero = report["summary"]["dsc"][name]["0"]["mean"]
        assert column_zero == pytest.approx(np.mean([c["dsc"][0] for c in cases]))
        average = report["summary"]["dsc"][name]["avg_0_3"]["mean"]
        assert average == pytest.approx(np.mean([np.mean(c["dsc"]) for c in cases]))
        assert set(report["summary"]["noc"][name]) == {"dsc>=0.75", "dsc>=0.85", "hd95<=5mm", "hd95<=2.5mm"}
    assert [c["key"] for c in report["summary"]["columns"]] == ["0", "1", "avg_0_3"]
    unet_changes = [r["changed_voxels"] for c in report["cases"]["unet"] for r in c["repetitions"]]
    assert np.sum(unet_changes) == 0  # clicks change nothing for the plain UNet
    labels = ["unet", "unet+guarantee", "2s-icr", "2s-icr+guarantee", "deepgrow", "deepgrow+guarantee", "pet-threshold"]
    assert list(report["methods"]) == labels  # each checkpoint alone and guaranteed, then the baseline
    assert report["methods"]["2s-icr+guarantee"]["checkpoint_digest"] == report["methods"]["2s-icr"]["checkpoint_digest"]
    assert report["methods"]["pet-threshold"]["grid"] == {"shape": [24, 24, 24], "spacing_mm": 4.0}
    assert config["guarantee"] == "both" and config["local_effect_radius_mm"] == 15.0
    for label in labels:
        honoured = report["summary"]["clicks_honoured"][label]
        made = np.add(honoured["foreground_clicks"], honoured["background_clicks"])
        assert made[0] == 0 and made[-1] > 0
        if label.endswith("+guarantee") or label == "pet-threshold":  # every click kept, every time
            assert all(p == 100.0 for p, n in zip(honoured["all_percent"], made) if n)
        assert len(report["summary"]["local_effect"][label]["per_click"]) == 3
        assert report["summary"]["no_op"][label]["cases"] in (0, 1, 2)
    tests = report["significance"]["dsc"]
    assert set(tests) == set(labels) - {"2s-icr"} and set(tests["unet"]) == {"0", "1", "avg_0_3"}
    assert all(0.0 <= t["p_adjusted"] <= 1.0 for m in tests.values() for t in m.values())
    assert len(report["significance"]["curves"]["hd95"]["deepgrow"]) == 4


@pytest.mark.slow  # the whole `icr evaluate`, as above
def test_report_markdown_and_plot(report_dir: Path) -> None:
    markdown = (report_dir / "report.md").read_text()
    for heading in ("Table 1", "Table 2", "Table 3", "Changed voxels per interaction", "Significance"):
        assert heading in markdown
    assert "| Method | 0 clicks | 1 click | 0 to 3 avg. |" in markdown
    assert "0.75 DSC NoC" in markdown and "2.5 mm HD95 PoF (%)" in markdown
    assert "Click rule: `linear`" in markdown and "Cases: 2; repetitions: 2" in markdown
    assert "| 2s-icr vs | 0 clicks | 1 click | 0 to 3 avg. |" in markdown
    for heading in ("## Clicks honoured", "## Local effect: DSC inside 15 mm of the new click", "## No-op stability"):
        assert heading in markdown
    assert "| Method | fg 1 | bg 1 |" in markdown
    assert (report_dir / "interaction.png").read_bytes()[:8] == PNG_MAGIC
    assert "random unet / test weights" in markdown  # a '|' in a description cannot break the table
    assert (report_dir / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_rejects_unusable_input(evaluation_inputs: dict[str, Path], tmp_path: Path) -> None:
    common = ["evaluate", "--data", str(evaluation_inputs["data"]), "--out", str(tmp_path / "out")]
    unet = f"unet={evaluation_inputs['unet']}"
    assert _run([*common, "--weights", unet, "--reference", "2s-icr"]) == 2
    assert _run([*common, "--weights", unet, "--weights", unet]) == 2
    (tmp_path / "ids.txt").write_text("no_such_case\n")
    assert _run([*common, "--weights", unet, "--cases", str(tmp_path / "ids.txt")]) == 2
    assert _run([*common, "--weights", f"unet={tmp_path / 'missing'}"]) == 2
    assert _run([*common, "--weights", unet, "--device", "cpu", "--autocast", "float16"]) == 2
    assert _run([*common, "--baseline", "none"]) == 2  # nothing left to evaluate
    assert _run([*common, "--weights", f"pet-threshold={evaluation_inputs['unet']}"]) == 2  # a label taken twice
    with pytest.raises(SystemExit):
        _parser().parse_args([*common, "--weights", "no-equals-sign"])
    assert not (tmp_path / "out").exists()


def test_a_rerun_reuses_matching_method_results_and_recomputes_the_rest(
    evaluation_inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for plot in ("plot_curves", "plot_interaction"):  # drawn by report_dir's run; here only the results count
        monkeypatch.setattr(f"service.science.report.{plot}", lambda *args: None)
    arguments: dict[str, Any] = {"max_clicks": 2, "repetitions": 1, "seed": 3, "device": "cpu", "guarantee": "off",
                                 "baselines": ()}
    methods = {"deepgrow": evaluation_inputs["deepgrow"]}
    first = evaluate(methods, evaluation_inputs["data"], tmp_path, **arguments)["deepgrow"]
    (saved,) = (tmp_path / "methods").glob("*.json")
    stored = json.loads(saved.read_text())
    assert stored["provenance"]["checkpoint_digest"] and stored["provenance"]["max_clicks"] == 2
    stored["cases"][0]["repetitions"][0]["dsc"] = [0.5, 0.25, 0.125]  # only a reuse can report these
    saved.write_text(json.dumps(stored))
    with_unet = {**methods, "unet": evaluation_inputs["unet"]}
    again = evaluate(with_unet, evaluation_inputs["data"], tmp_path, **arguments)
    np.testing.assert_array_equal(again["deepgrow"].cases[0].repetitions[0].dsc, [0.5, 0.25, 0.125])
    np.testing.assert_array_equal(again["deepgrow"].cases[1].repetitions[0].dsc, first.cases[1].repetitions[0].dsc)
    assert again["deepgrow"].cases[0].repetitions[0].clicks == first.cases[0].repetitions[0].clicks
    assert len(list((tmp_path / "methods").glob("*.json"))) == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["cases"]["deepgrow"][0]["dsc"] == [0.5, 0.25, 0.125]
    # another protocol is recomputed, and its results replace the saved ones
    changed = evaluate(methods, evaluation_inputs["data"], tmp_path, **{**arguments, "seed": 4})["deepgrow"]
    assert changed.cases[0].repetitions[0].dsc.tolist() != [0.5, 0.25, 0.125]
    assert json.loads(saved.read_text())["provenance"]["seed"] == 4
    # so is another precision: bfloat16 results never stand in for exact ones
    evaluate(methods, evaluation_inputs["data"], tmp_path, **{**arguments, "seed": 4, "autocast": "bfloat16"})
    assert json.loads(saved.read_text())["provenance"]["precision"] == "bfloat16"
    assert json.loads((tmp_path / "report.json").read_text())["config"]["precision"] == "bfloat16"
