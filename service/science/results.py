"""What a simulated-click evaluation measured: curves per session, per case, per method.

Shared by :mod:`service.science.evaluation` (which fills them) and
:mod:`service.science.report` (which summarises them), and written to and read from
JSON here, so a saved method result and report.json's ``cases`` have one layout.

Per session (:class:`Curve`), index k holds the state after k clicks:

- ``dsc``, ``hd95``, ``changed_voxels`` as in the paper's protocol;
- ``foreground_honoured[k]`` / ``background_honoured[k]``: how many of the foreground /
  background clicks among the first k have their label at their voxel in the mask after
  click k (the totals come from ``clicks``);
- ``local_dice_before[k]`` / ``local_dice_after[k]``: the DSC inside a ball around click
  k (``LOCAL_EFFECT_RADIUS_MM``) in the mask before and after it; NaN at k = 0 and for
  click counts the simulated user never reached.

Once the simulated user stops (the mask equals the truth) the curves stay where they
are: DSC, HD95 and the honoured counts keep their last value (a perfect mask honours
every click the user made), changed voxels are 0 and the local DSCs NaN.

Per case, :class:`NoOpResult` is the one no-op click after the initial mask (see
:func:`service.science.simulator.no_op_click`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.store.contract import Click

LOCAL_EFFECT_RADIUS_MM = 15.0


@dataclass(frozen=True)
class Curve:
    """One simulated session on one case: index k holds the state after k clicks."""

    dsc: np.ndarray  # (max_clicks + 1,) float64
    hd95: np.ndarray  # (max_clicks + 1,) float64, mm; empty-mask cases at the grid diagonal
    changed_voxels: np.ndarray  # (max_clicks + 1,) int64: mask voxels flipped by click k; [0] = 0
    clicks: tuple[Click, ...]  # the clicks actually made (fewer than max_clicks if the mask became perfect)
    foreground_honoured: np.ndarray  # (max_clicks + 1,) int64
    background_honoured: np.ndarray  # (max_clicks + 1,) int64
    local_dice_before: np.ndarray  # (max_clicks + 1,) float64, NaN where no click k was made
    local_dice_after: np.ndarray  # (max_clicks + 1,) float64

    @property
    def max_clicks(self) -> int:
        return len(self.dsc) - 1

    def clicks_so_far(self, label: str) -> np.ndarray:
        """(max_clicks + 1,) count of ``label`` clicks among the first k made."""
        made = np.cumsum([0] + [click.label == label for click in self.clicks])
        return np.concatenate([made, np.full(self.max_clicks + 1 - len(made), made[-1])]).astype(np.int64)


@dataclass(frozen=True)
class NoOpResult:
    """One click that agrees with the initial mask, far from it: how much did the mask move?"""

    click: Click
    dsc_before: float
    dsc_after: float
    voxels_before: int
    voxels_after: int
    changed_voxels: int  # voxels flipped either way

    @property
    def delta_dsc(self) -> float:
        return self.dsc_after - self.dsc_before

    @property
    def delta_voxels(self) -> int:
        return self.voxels_after - self.voxels_before


@dataclass(frozen=True)
class CaseResult:
    """All repetitions of one case under one method, and its no-op click (None: no voxel qualified)."""

    case_id: str
    repetitions: tuple[Curve, ...]
    no_op: NoOpResult | None = None

    @property
    def dsc(self) -> np.ndarray:
        """DSC per click count, averaged over repetitions."""
        return np.mean([curve.dsc for curve in self.repetitions], axis=0)

    @property
    def hd95(self) -> np.ndarray:
        """HD95 (mm) per click count, averaged over repetitions."""
        return np.mean([curve.hd95 for curve in self.repetitions], axis=0)


@dataclass(frozen=True)
class MethodResult:
    """One method's results on every evaluated case, in case order."""

    cases: tuple[CaseResult, ...]

    @property
    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.cases]

    @property
    def repetitions(self) -> int:
        return len(self.cases[0].repetitions) if self.cases else 0

    def curves(self) -> list[Curve]:
        """Every session: all cases x repetitions."""
        return [curve for case in self.cases for curve in case.repetitions]

    def dsc_by_case(self) -> np.ndarray:
        """(cases, max_clicks + 1) repetition-averaged DSC."""
        return np.array([case.dsc for case in self.cases])

    def hd95_by_case(self) -> np.ndarray:
        """(cases, max_clicks + 1) repetition-averaged HD95 in mm."""
        return np.array([case.hd95 for case in self.cases])

    def repetition_curves(self, repetition: int) -> list[Curve]:
        """Every case's curve from one repetition (one simulated user's pass over the data set)."""
        return [case.repetitions[repetition] for case in self.cases]

    def interaction_changes(self) -> np.ndarray:
        """Changed-voxel counts of every click actually made, over all cases and repetitions."""
        counts = [curve.changed_voxels[1 : len(curve.clicks) + 1] for curve in self.curves()]
        return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)

    def no_ops(self) -> list[NoOpResult]:
        return [case.no_op for case in self.cases if case.no_op is not None]


# ---------------------------------------------------------------------------- JSON


def _floats(values: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values.tolist()]


def _array(values: list[Any], dtype: type) -> np.ndarray:
    return np.asarray([math.nan if v is None else v for v in values], dtype=dtype)


def curve_json(curve: Curve) -> dict[str, Any]:
    return {
        "dsc": curve.dsc.tolist(),
        "hd95": curve.hd95.tolist(),
        "changed_voxels": curve.changed_voxels.tolist(),
        "clicks": [click.to_dict() for click in curve.clicks],
        "foreground_clicks": curve.clicks_so_far("foreground").tolist(),
        "foreground_honoured": curve.foreground_honoured.tolist(),
        "background_clicks": curve.clicks_so_far("background").tolist(),
        "background_honoured": curve.background_honoured.tolist(),
        "local_dice_before": _floats(curve.local_dice_before),
        "local_dice_after": _floats(curve.local_dice_after),
    }


def curve_from_json(data: Mapping[str, Any]) -> Curve:
    return Curve(
        dsc=np.asarray(data["dsc"], dtype=np.float64),
        hd95=np.asarray(data["hd95"], dtype=np.float64),
        changed_voxels=np.asarray(data["changed_voxels"], dtype=np.int64),
        clicks=tuple(Click.from_dict(click) for click in data["clicks"]),
        foreground_honoured=np.asarray(data["foreground_honoured"], dtype=np.int64),
        background_honoured=np.asarray(data["background_honoured"], dtype=np.int64),
        local_dice_before=_array(data["local_dice_before"], np.float64),
        local_dice_after=_array(data["local_dice_after"], np.float64),
    )


def no_op_json(no_op: NoOpResult | None) -> dict[str, Any] | None:
    if no_op is None:
        return None
    return {
        "click": no_op.click.to_dict(), "dsc_before": no_op.dsc_before, "dsc_after": no_op.dsc_after,
        "voxels_before": no_op.voxels_before, "voxels_after": no_op.voxels_after,
        "changed_voxels": no_op.changed_voxels, "delta_dsc": no_op.delta_dsc, "delta_voxels": no_op.delta_voxels,
    }


def no_op_from_json(data: Mapping[str, Any] | None) -> NoOpResult | None:
    if data is None:
        return None
    return NoOpResult(
        click=Click.from_dict(data["click"]), dsc_before=float(data["dsc_before"]), dsc_after=float(data["dsc_after"]),
        voxels_before=int(data["voxels_before"]), voxels_after=int(data["voxels_after"]),
        changed_voxels=int(data["changed_voxels"]),
    )


def cases_json(result: MethodResult) -> list[dict[str, Any]]:
    return [
        {
            "case_id": case.case_id,
            "dsc": case.dsc.tolist(),
            "hd95": case.hd95.tolist(),
            "repetitions": [curve_json(curve) for curve in case.repetitions],
            "no_op": no_op_json(case.no_op),
        }
        for case in result.cases
    ]


def cases_from_json(cases: list[Mapping[str, Any]]) -> MethodResult:
    return MethodResult(tuple(
        CaseResult(case["case_id"], tuple(curve_from_json(curve) for curve in case["repetitions"]),
                   no_op_from_json(case["no_op"]))
        for case in cases
    ))
