"""The interaction summaries of the report (clicks honoured, local effect, no-op stability) by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.science import results
from service.science.report import honoured_table, local_effect_table, no_op_table
from service.science.results import CaseResult, Curve, MethodResult, NoOpResult
from service.store.contract import Click

NAN = math.nan


def _curve(clicks: list[Click], foreground: list[int], background: list[int],
           before: list[float], after: list[float]) -> Curve:
    n = len(foreground)
    return Curve(np.linspace(0.5, 0.9, n), np.ones(n), np.zeros(n, dtype=np.int64), tuple(clicks),
                 np.asarray(foreground), np.asarray(background), np.asarray(before), np.asarray(after))


@pytest.fixture
def result() -> MethodResult:
    fg, bg = Click("foreground", (1, 1, 1)), Click("background", (2, 2, 2))
    # case a: a foreground click (honoured), then a background one (honoured, and the first click is lost)
    a = _curve([fg, bg], [0, 1, 0], [0, 0, 1], [NAN, 0.2, 0.5], [NAN, 0.6, 0.4])
    # case b: one foreground click not honoured, then the user stopped
    b = _curve([fg], [0, 0, 0], [0, 0, 0], [NAN, 0.0, NAN], [NAN, 1.0, NAN])
    no_ops = [NoOpResult(bg, 0.80, 0.79, 100, 90, 12), NoOpResult(bg, 0.50, 0.53, 50, 54, 4)]
    return MethodResult((CaseResult("a", (a,), no_ops[0]), CaseResult("b", (b,), no_ops[1]), CaseResult("c", (b,))))


def test_clicks_honoured_are_pooled_over_sessions(result: MethodResult) -> None:
    table = honoured_table(result)
    assert table["foreground_clicks"] == [0, 3, 3]  # cases a, b, b (case c repeats b's curve)
    assert math.isnan(table["foreground_percent"][0])
    assert table["foreground_percent"][1:] == pytest.approx([100 / 3, 0.0])
    assert table["background_clicks"] == [0, 0, 1]
    assert math.isnan(table["background_percent"][1]) and table["background_percent"][2] == 100.0
    assert table["all_percent"][2] == pytest.approx(25.0)  # 1 of a's 2 clicks + 0 of b's 1 click, twice


def test_local_effect_per_click_and_over_all_clicks(result: MethodResult) -> None:
    table = local_effect_table(result)
    first, second = table["per_click"]
    assert (first["clicks"], first["before"], first["after"]) == (3, pytest.approx(0.2 / 3), pytest.approx(2.6 / 3))
    assert first["gain"] == pytest.approx(2.4 / 3) and first["worse_percent"] == 0.0
    assert (second["clicks"], second["gain"], second["worse_percent"]) == (1, pytest.approx(-0.1), 100.0)
    every = table["all_clicks"]
    assert every["clicks"] == 4
    assert every["gain"] == pytest.approx((0.4 - 0.1 + 1.0 + 1.0) / 4)
    assert every["worse_percent"] == 25.0


def test_no_op_stability_over_the_cases_that_had_one(result: MethodResult) -> None:
    table = no_op_table(result)
    assert table["cases"] == 2
    assert table["mean_abs_delta_dsc"] == pytest.approx(0.02)
    assert table["max_abs_delta_dsc"] == pytest.approx(0.03)
    assert table["mean_abs_delta_voxels"] == 7.0 and table["mean_changed_voxels"] == 8.0
    assert table["mean_delta_dsc"] == pytest.approx(0.01) and table["mean_delta_voxels"] == -3.0
    assert no_op_table(MethodResult((result.cases[2],)))["cases"] == 0


def test_results_round_trip_through_json(result: MethodResult) -> None:
    again = results.cases_from_json(results.cases_json(result))
    assert [case.no_op for case in again.cases] == [case.no_op for case in result.cases]
    for mine, theirs in zip(again.curves(), result.curves()):
        assert mine.clicks == theirs.clicks
        np.testing.assert_array_equal(mine.local_dice_before, theirs.local_dice_before)  # NaN stays NaN
        np.testing.assert_array_equal(mine.foreground_honoured, theirs.foreground_honoured)
    assert result.curves()[0].clicks_so_far("background").tolist() == [0, 0, 1]
    assert result.curves()[1].clicks_so_far("foreground").tolist() == [0, 1, 1]
