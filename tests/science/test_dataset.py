"""Prepared cases are cached whole: a rerun reads back exactly what was prepared."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.science.dataset import find_cases, load_prepared
from service.science.phantoms import write_cases


def test_cached_case_equals_prepared_case_and_leaves_no_partial_file(tmp_path: Path) -> None:
    write_cases(tmp_path / "cases", 1, seed=4)
    case = find_cases(tmp_path / "cases")[0]
    fresh = load_prepared(case, (24, 24, 24), 4.0)
    first = load_prepared(case, (24, 24, 24), 4.0, tmp_path / "cache")
    cached = load_prepared(case, (24, 24, 24), 4.0, tmp_path / "cache")
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".npz"]
    for prepared in (first, cached):
        np.testing.assert_array_equal(prepared.images, fresh.images)
        np.testing.assert_array_equal(prepared.truth, fresh.truth)
        assert prepared.grid == fresh.grid
