"""``icr phantoms --field-of-view whole-body`` and ``icr localise-eval`` end to end, small scale."""

from __future__ import annotations

import json

from service.cli import main
from service.science.dataset import find_cases


def test_localise_eval_reports_hits_and_distances_on_whole_body_phantoms(tmp_path, capsys) -> None:
    data = tmp_path / "cases"
    assert main(["phantoms", str(data), "-n", "2", "--seed", "4", "--field-of-view", "whole-body",
                 "--scale", "2"]) == 0
    assert [c.id for c in find_cases(data)] == ["wholebody_s4_000", "wholebody_s4_001"]
    out = tmp_path / "localisation.json"
    assert main(["localise-eval", "--data", str(data), "--grid-mm", "128", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["cases"] == 2 and summary["window_mm"] == 128.0
    for case in report["cases"]:
        offset = [abs(t - f) for t, f in zip(case["truth_mm"], case["found_mm"])]
        assert case["hit"] == all(o <= 64.0 for o in offset)
        assert case["distance_mm"] >= max(offset) - 0.2
    assert summary["hits"] == sum(c["hit"] for c in report["cases"])
    assert "hit" in capsys.readouterr().out


def test_localise_eval_on_an_empty_folder_fails(tmp_path) -> None:
    assert main(["localise-eval", "--data", str(tmp_path)]) == 2
