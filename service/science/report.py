"""The evaluation report: the paper's Tables 1-3, changed voxels, significance and Fig. 1,
and the interaction measures.

Writes ``report.json`` (configuration, every curve, every summary and test),
``report.md`` (tables shaped like the paper's) and ``curves.png`` (DSC and HD95 against
clicks, as Fig. 1), and ``interaction.png`` (clicks honoured and local effect against clicks).

Aggregation, following the paper:

- Table 1 (DSC): per-case curves averaged over repetitions, then mean ± sd over cases
  at 0, 1, 5 and 10 clicks; "0 to 10 avg." is each case's mean over k = 0..10, then
  mean ± sd over cases. Click counts beyond ``max_clicks`` are left out, and the
  average then runs over k = 0..max_clicks.
- Table 2 (HD95): the same per-case values, median ± IQR (Q3 - Q1) over cases.
- Table 3 (NoC, PoF): computed per repetition over all cases (one simulated user's pass
  over the data set; a failure enters NoC as ``max_clicks``, see
  :func:`service.science.metrics.noc_summary`), then mean ± sd over repetitions. The sds
  in the paper's Table 3 fit this reading (e.g. PoF 0.70 = sd of 0, 1/67 and 1/67). With
  the same cases in every repetition, the mean PoF equals the pooled PoF over cases x
  repetitions; report.json also gives NoC pooled over cases x repetitions.
- Changed voxels: mean ± sd over every click actually made (cases x repetitions x clicks).
- Significance: two-sided Wilcoxon signed-rank test of the reference against each other
  method on per-case values, Benjamini-Hochberg adjusted over all methods x columns of a
  table (over all methods x click counts for the curves' markers); p_adj < 0.05 counts.

- Clicks honoured at k clicks: of all clicks among the first k of every session (cases x
  repetitions), the share whose voxel has the click's label in the mask after click k,
  for foreground and background clicks separately (pooled, so each click counts once
  per step; a session that stopped early keeps its final mask).
- Local effect of click k: DSC inside a ball of ``LOCAL_EFFECT_RADIUS_MM`` around click k
  in the mask before and after it, mean over the sessions that made a k-th click; "all
  clicks" pools every click made.
- No-op stability: one no-op click per case after the initial mask (see
  :func:`service.science.simulator.no_op_click`); mean and max of |delta DSC| and mean
  |delta mask voxels| over the cases where a voxel qualified.

Standard deviations are population sds (ddof = 0), as ``noc_summary`` uses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from service.engine.guarantee import honour_rule
from service.science.metrics import (
    PAPER_DSC_THRESHOLDS,
    PAPER_HD95_THRESHOLDS_MM,
    benjamini_hochberg,
    noc_summary,
    wilcoxon_bh,
)
from service.science.results import LOCAL_EFFECT_RADIUS_MM, MethodResult, cases_json
from service.science.simulator import BODY_MIN_HU, NO_OP_MIN_DISTANCE_MM, ClickRule

REPORT_FORMAT = "icr-evaluation/1"
DEFAULT_REFERENCE = "2s-icr"
SUMMARY_CLICKS = (0, 1, 5, 10)
AVERAGE_UP_TO = 10
ALPHA = 0.05
RULE_DESCRIPTIONS = {
    ClickRule.DEEPGROW: "MONAI DeepGrow sampler, click weight exp(d) - 1 of the border distance d",
    ClickRule.LINEAR: "the paper's text, click weight proportional to the border distance d",
}


@dataclass(frozen=True)
class EvaluationConfig:
    """What was run: enough to rerun it and to read the numbers right."""

    max_clicks: int
    repetitions: int
    seed: int
    rule: ClickRule
    case_ids: tuple[str, ...]
    device: str
    reference: str
    precision: str = "float32"
    refine_window: int | None = None
    guarantee: str = "off"

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_clicks": self.max_clicks,
            "repetitions": self.repetitions,
            "seed": self.seed,
            "repetition_seed": "numpy default_rng([seed, repetition, case_index])",
            "rule": self.rule.value,
            "rule_description": RULE_DESCRIPTIONS[self.rule],
            "cases": len(self.case_ids),
            "case_ids": list(self.case_ids),
            "device": self.device,
            "precision": self.precision,
            "refine_window": self.refine_window,
            "reference": self.reference,
            "hd95_of_empty_mask": "working grid diagonal in mm",
            "dsc_thresholds": list(PAPER_DSC_THRESHOLDS),
            "hd95_thresholds_mm": list(PAPER_HD95_THRESHOLDS_MM),
            "guarantee": self.guarantee,
            "guarantee_rule": (f"the service's click rules: probability set to each click's label {honour_rule()}, "
                               "and changed only in the objects the new click touches (a background click only "
                               "removing, and removing a whole object from its core), after every pass, before "
                               "thresholding and before it becomes the next memory"),
            "local_effect_radius_mm": LOCAL_EFFECT_RADIUS_MM,
            "no_op_rule": (f"one background click per case after the initial mask: of the voxels above "
                           f"{BODY_MIN_HU:g} HU at least {NO_OP_MIN_DISTANCE_MM:g} mm from the mask and the truth, "
                           "the nearest to them"),
        }


@dataclass(frozen=True)
class MethodIdentity:
    """The checkpoint behind a method label."""

    method: str
    digest: str
    description: str
    directory: str
    grid_shape: tuple[int, int, int]
    spacing_mm: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "checkpoint_digest": self.digest,
            "description": self.description,
            "directory": self.directory,
            "grid": {"shape": list(self.grid_shape), "spacing_mm": self.spacing_mm},
        }


@dataclass(frozen=True)
class Column:
    """One summary column: a click count, or the average over a range of click counts."""

    key: str
    header: str
    clicks: tuple[int, ...]

    def per_case(self, by_case: np.ndarray) -> np.ndarray:
        """(cases, max_clicks + 1) curves -> one value per case."""
        return by_case[:, list(self.clicks)].mean(axis=1)


def summary_columns(max_clicks: int) -> list[Column]:
    """The paper's columns (0, 1, 5, 10 clicks, 0-to-10 average) that ``max_clicks`` allows."""
    columns = [
        Column(str(k), f"{k} click" if k == 1 else f"{k} clicks", (k,)) for k in SUMMARY_CLICKS if k <= max_clicks
    ]
    last = min(AVERAGE_UP_TO, max_clicks)
    columns.append(Column(f"avg_0_{last}", f"0 to {last} avg.", tuple(range(last + 1))))
    return columns


def choose_reference(names: Sequence[str], requested: str | None = None) -> str:
    """The method the others are tested against: ``requested``, else '2s-icr', else the first."""
    if not names:
        raise ValueError("no methods to choose a reference from")
    if requested is not None:
        if requested not in names:
            raise ValueError(f"reference {requested!r} is not among the methods {list(names)}")
        return requested
    return DEFAULT_REFERENCE if DEFAULT_REFERENCE in names else names[0]


# ---------------------------------------------------------------------- summaries


def dsc_table(results: Mapping[str, MethodResult], columns: Sequence[Column]) -> dict[str, dict[str, dict[str, float]]]:
    """Table 1: mean ± sd over cases of the repetition-averaged DSC."""
    table = {}
    for name, result in results.items():
        by_case = result.dsc_by_case()
        table[name] = {
            c.key: {"mean": float(np.mean(c.per_case(by_case))), "sd": float(np.std(c.per_case(by_case)))}
            for c in columns
        }
    return table


def _median_iqr(values: np.ndarray) -> dict[str, float]:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "iqr": float(q3 - q1)}


def hd95_table(results: Mapping[str, MethodResult], columns: Sequence[Column]) -> dict[str, dict[str, dict[str, float]]]:
    """Table 2: median ± IQR over cases of the repetition-averaged HD95 (mm)."""
    return {
        name: {c.key: _median_iqr(c.per_case(result.hd95_by_case())) for c in columns}
        for name, result in results.items()
    }


def _threshold_key(metric: str, threshold: float) -> str:
    return f"dsc>={threshold:g}" if metric == "dsc" else f"hd95<={threshold:g}mm"


def noc_table(result: MethodResult, max_clicks: int) -> dict[str, dict[str, Any]]:
    """Table 3 for one method: NoC and PoF per repetition, then mean ± sd over repetitions."""
    table = {}
    for metric, thresholds, higher_is_better in (
        ("dsc", PAPER_DSC_THRESHOLDS, True),
        ("hd95", PAPER_HD95_THRESHOLDS_MM, False),
    ):
        per_repetition = []
        pooled_curves = []
        for repetition in range(result.repetitions):
            curves = [getattr(curve, metric) for curve in result.repetition_curves(repetition)]
            pooled_curves.extend(curves)
            per_repetition.append(noc_summary(curves, thresholds, higher_is_better, max_clicks))
        pooled = noc_summary(pooled_curves, thresholds, higher_is_better, max_clicks)
        for threshold in thresholds:
            noc = np.array([summary[float(threshold)]["noc_mean"] for summary in per_repetition])
            pof = np.array([summary[float(threshold)]["pof_percent"] for summary in per_repetition])
            table[_threshold_key(metric, threshold)] = {
                "metric": metric,
                "threshold": float(threshold),
                "noc_mean": float(noc.mean()),
                "noc_sd": float(noc.std()),
                "pof_percent_mean": float(pof.mean()),
                "pof_percent_sd": float(pof.std()),
                "noc_pooled_mean": pooled[float(threshold)]["noc_mean"],
                "noc_pooled_sd": pooled[float(threshold)]["noc_std"],
                "failures": pooled[float(threshold)]["failures"],
                "sessions": pooled[float(threshold)]["cases"],
            }
    return table


def changed_voxel_summary(result: MethodResult) -> dict[str, float]:
    """Mean ± sd of the mask voxels one click changes, over every click made."""
    counts = result.interaction_changes().astype(np.float64)
    if counts.size == 0:
        return {"mean": math.nan, "sd": math.nan, "interactions": 0.0}
    return {"mean": float(counts.mean()), "sd": float(counts.std()), "interactions": float(counts.size)}


def _share(honoured: int, total: int) -> float:
    return 100.0 * honoured / total if total else math.nan


def honoured_table(result: MethodResult) -> dict[str, list[float]]:
    """Per click count k: clicks so far and the percentage of them honoured, pooled over sessions."""
    curves = result.curves()
    table: dict[str, list[float]] = {}
    for label in ("foreground", "background"):
        made = np.sum([curve.clicks_so_far(label) for curve in curves], axis=0)
        kept = np.sum([getattr(curve, f"{label}_honoured") for curve in curves], axis=0)
        table[f"{label}_clicks"] = made.tolist()
        table[f"{label}_percent"] = [_share(int(h), int(n)) for h, n in zip(kept, made)]
    made = np.add(table["foreground_clicks"], table["background_clicks"])
    kept = np.sum([curve.foreground_honoured + curve.background_honoured for curve in curves], axis=0)
    table["all_percent"] = [_share(int(h), int(n)) for h, n in zip(kept, made)]
    return table


def _local_summary(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    made = ~np.isnan(before)
    if not made.any():
        return {"clicks": 0.0, "before": math.nan, "after": math.nan, "gain": math.nan, "worse_percent": math.nan}
    gain = after[made] - before[made]
    return {"clicks": float(made.sum()), "before": float(before[made].mean()), "after": float(after[made].mean()),
            "gain": float(gain.mean()), "worse_percent": float(100.0 * np.mean(gain < 0))}


def local_effect_table(result: MethodResult) -> dict[str, Any]:
    """Local DSC before and after click k (k = 1..max_clicks), and over all clicks made."""
    before = np.array([curve.local_dice_before for curve in result.curves()])
    after = np.array([curve.local_dice_after for curve in result.curves()])
    return {
        "per_click": [_local_summary(before[:, k], after[:, k]) for k in range(1, before.shape[1])],
        "all_clicks": _local_summary(before[:, 1:].ravel(), after[:, 1:].ravel()),
    }


def no_op_table(result: MethodResult) -> dict[str, float]:
    """|delta DSC| and |delta voxels| of the no-op click, over the cases where one was placed."""
    no_ops = result.no_ops()
    if not no_ops:
        return {"cases": 0.0, "mean_abs_delta_dsc": math.nan, "max_abs_delta_dsc": math.nan,
                "mean_abs_delta_voxels": math.nan, "mean_changed_voxels": math.nan,
                "mean_delta_dsc": math.nan, "mean_delta_voxels": math.nan}
    delta_dsc = np.array([no_op.delta_dsc for no_op in no_ops])
    delta_voxels = np.array([no_op.delta_voxels for no_op in no_ops], dtype=np.float64)
    return {
        "cases": float(len(no_ops)),
        "mean_abs_delta_dsc": float(np.abs(delta_dsc).mean()),
        "max_abs_delta_dsc": float(np.abs(delta_dsc).max()),
        "mean_abs_delta_voxels": float(np.abs(delta_voxels).mean()),
        "mean_changed_voxels": float(np.mean([no_op.changed_voxels for no_op in no_ops])),
        "mean_delta_dsc": float(delta_dsc.mean()),  # signed: does the no-op click make the mask better or worse?
        "mean_delta_voxels": float(delta_voxels.mean()),
    }


# -------------------------------------------------------------------- significance


def _paired_tests(family: Sequence[tuple[str, Mapping[str, np.ndarray]]], reference: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Wilcoxon tests of the reference against each method for each (key, samples) of a family, BH over the family.

    Returns {method: {key: {p_raw, p_adjusted, significant, median_difference}}}.
    """
    entries: list[tuple[str, str, dict[str, Any]]] = []
    for key, samples in family:
        if len(samples) < 2:
            continue
        for name, test in wilcoxon_bh(samples, reference, ALPHA).items():
            p_raw = float(test["p_raw"])
            entries.append((name, key, {"p_raw": 1.0 if math.isnan(p_raw) else p_raw,
                                        "median_difference": float(test["median_difference"])}))
    adjusted = benjamini_hochberg([entry["p_raw"] for _, _, entry in entries])
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for (name, key, entry), p_adjusted in zip(entries, adjusted):
        entry.update(p_adjusted=float(p_adjusted), significant=bool(p_adjusted < ALPHA))
        table.setdefault(name, {})[key] = entry
    return table


def column_significance(
    results: Mapping[str, MethodResult], columns: Sequence[Column], reference: str, metric: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """Reference vs each method on per-case ``metric`` ('dsc' or 'hd95') at each summary column."""
    by_case = {name: _by_case(result, metric) for name, result in results.items()}
    family = [(c.key, {name: c.per_case(values) for name, values in by_case.items()}) for c in columns]
    return _paired_tests(family, reference)


def curve_significance(
    results: Mapping[str, MethodResult], reference: str, metric: str, max_clicks: int
) -> dict[str, list[dict[str, Any]]]:
    """Reference vs each method at every click count, BH over all click counts x methods."""
    by_case = {name: _by_case(result, metric) for name, result in results.items()}
    family = [(str(k), {name: values[:, k] for name, values in by_case.items()}) for k in range(max_clicks + 1)]
    table = _paired_tests(family, reference)
    return {name: [tests[str(k)] for k in range(max_clicks + 1)] for name, tests in table.items()}


def _by_case(result: MethodResult, metric: str) -> np.ndarray:
    return result.dsc_by_case() if metric == "dsc" else result.hd95_by_case()


# ---------------------------------------------------------------------------- JSON


def _json_safe(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, non-finite floats to null."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def build_report(
    config: EvaluationConfig, identities: Mapping[str, MethodIdentity], results: Mapping[str, MethodResult]
) -> dict[str, Any]:
    """Everything the report says, as one JSON-ready document."""
    columns = summary_columns(config.max_clicks)
    return _json_safe({
        "format": REPORT_FORMAT,
        "config": config.to_dict(),
        "methods": {name: identity.to_dict() for name, identity in identities.items()},
        "cases": {name: cases_json(result) for name, result in results.items()},
        "summary": {
            "columns": [{"key": c.key, "header": c.header, "clicks": list(c.clicks)} for c in columns],
            "dsc": dsc_table(results, columns),
            "hd95": hd95_table(results, columns),
            "noc": {name: noc_table(result, config.max_clicks) for name, result in results.items()},
            "changed_voxels": {name: changed_voxel_summary(result) for name, result in results.items()},
            "clicks_honoured": {name: honoured_table(result) for name, result in results.items()},
            "local_effect": {name: local_effect_table(result) for name, result in results.items()},
            "no_op": {name: no_op_table(result) for name, result in results.items()},
        },
        "significance": {
            "reference": config.reference,
            "test": "two-sided Wilcoxon signed-rank on per-case values, Benjamini-Hochberg adjusted",
            "alpha": ALPHA,
            "dsc": column_significance(results, columns, config.reference, "dsc"),
            "hd95": column_significance(results, columns, config.reference, "hd95"),
            "curves": {
                metric: curve_significance(results, config.reference, metric, config.max_clicks)
                for metric in ("dsc", "hd95")
            },
        },
    })


# ------------------------------------------------------------------------ Markdown


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "/").split())


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(row) for row in rows)]


def _pm(value: float | None, spread: float | None, digits: int) -> str:
    if value is None or spread is None:
        return "n/a"
    return f"{value:.{digits}f} ± {spread:.{digits}f}"


def _p_value(test: Mapping[str, Any] | None) -> str:
    if test is None:
        return "n/a"
    p = test["p_adjusted"]
    text = f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"
    return f"**{text}** *" if test["significant"] else text


def _methods_section(report: Mapping[str, Any]) -> list[str]:
    rows = [
        [f"`{name}`", m["method"], f"`{m['checkpoint_digest'][:12]}`",
         f"{'x'.join(str(n) for n in m['grid']['shape'])} @ {m['grid']['spacing_mm']:g} mm", _cell(m["description"]) or "-"]
        for name, m in report["methods"].items()
    ]
    return ["## Methods", "", *_table(["Label", "Method", "Checkpoint", "Grid", "Description"], rows), ""]


def _metric_tables(report: Mapping[str, Any]) -> list[str]:
    columns = report["summary"]["columns"]
    header = ["Method", *(c["header"] for c in columns)]
    dsc_rows = [[name, *(_pm(t[c["key"]]["mean"], t[c["key"]]["sd"], 3) for c in columns)]
                for name, t in report["summary"]["dsc"].items()]
    hd95_rows = [[name, *(_pm(t[c["key"]]["median"], t[c["key"]]["iqr"], 3) for c in columns)]
                 for name, t in report["summary"]["hd95"].items()]
    return [
        "## Table 1. Dice similarity coefficient (mean ± sd over cases)", "", *_table(header, dsc_rows), "",
        "## Table 2. HD95 in mm (median ± IQR over cases)", "", *_table(header, hd95_rows), "",
    ]


def _noc_table(report: Mapping[str, Any]) -> list[str]:
    max_clicks = report["config"]["max_clicks"]
    keys = list(next(iter(report["summary"]["noc"].values())))
    header = ["Method"]
    for key in keys:
        label = key.replace("dsc>=", "").replace("hd95<=", "").replace("mm", " mm")
        metric = "DSC" if key.startswith("dsc") else "HD95"
        header += [f"{label} {metric} NoC", f"{label} {metric} PoF (%)"]
    rows = []
    for name, table in report["summary"]["noc"].items():
        cells = [name]
        for key in keys:
            entry = table[key]
            cells += [_pm(entry["noc_mean"], entry["noc_sd"], 2), _pm(entry["pof_percent_mean"], entry["pof_percent_sd"], 2)]
        rows.append(cells)
    return [
        f"## Table 3. Number of clicks (NoC) to reach a threshold within {max_clicks} clicks",
        "",
        ("NoC and PoF (proportion of failures) per repetition over all cases, then mean ± sd over repetitions; "
         f"a failure counts as {max_clicks} clicks in NoC."),
        "",
        *_table(header, rows),
        "",
    ]


def _changed_voxels_table(report: Mapping[str, Any]) -> list[str]:
    rows = [[name, _pm(s["mean"], s["sd"], 1), f"{int(s['interactions'])}"]
            for name, s in report["summary"]["changed_voxels"].items()]
    return ["## Changed voxels per interaction", "", *_table(["Method", "Mean ± sd", "Clicks made"], rows), ""]


def _percent(value: float | None, clicks: int) -> str:
    return "n/a" if value is None else f"{value:.1f} % of {clicks}"


def _interaction_tables(report: Mapping[str, Any]) -> list[str]:
    config = report["config"]
    steps = [k for k in SUMMARY_CLICKS if 0 < k <= config["max_clicks"]]
    honoured = report["summary"]["clicks_honoured"]
    header = ["Method", *(f"fg {k}" for k in steps), *(f"bg {k}" for k in steps)]
    rows = [[name, *(_percent(t[f"{label}_percent"][k], t[f"{label}_clicks"][k])
                     for label in ("foreground", "background") for k in steps)]
            for name, t in honoured.items()]
    local = report["summary"]["local_effect"]
    local_header = ["Method", "Clicks made", "Local DSC before", "after", "gain", "Clicks that lowered it",
                    *(f"gain at click {k}" for k in steps)]

    def gain(entry: Mapping[str, Any]) -> str:
        return "n/a" if entry["gain"] is None else f"{entry['gain']:+.3f}"

    local_rows = []
    for name, t in local.items():
        every = t["all_clicks"]
        local_rows.append([
            name, f"{int(every['clicks'])}",
            *("n/a" if every[key] is None else f"{every[key]:.3f}" for key in ("before", "after")), gain(every),
            "n/a" if every["worse_percent"] is None else f"{every['worse_percent']:.1f} %",
            *(gain(t["per_click"][k - 1]) for k in steps),
        ])
    no_op = report["summary"]["no_op"]

    def number(value: float | None, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    no_op_rows = [[name, f"{int(t['cases'])}", number(t["mean_abs_delta_dsc"], 4), number(t["max_abs_delta_dsc"], 4),
                   number(t["mean_delta_dsc"], 4), number(t["mean_abs_delta_voxels"], 1),
                   number(t["mean_delta_voxels"], 1), number(t["mean_changed_voxels"], 1)]
                  for name, t in no_op.items()]
    return [
        "## Clicks honoured",
        "",
        ("Share of the foreground (fg) / background (bg) clicks so far whose voxel has the click's label in the "
         "mask after k clicks, pooled over cases and repetitions."),
        "",
        *_table(header, rows),
        "",
        f"## Local effect: DSC inside {config['local_effect_radius_mm']:g} mm of the new click",
        "",
        "Mean over clicks made of the local DSC in the mask before and after the click.",
        "",
        *_table(local_header, local_rows),
        "",
        "## No-op stability",
        "",
        f"{config['no_op_rule'][0].upper()}{config['no_op_rule'][1:]}; change of DSC and of mask voxels it causes.",
        "",
        *_table(["Method", "Cases", "mean abs Δ DSC", "max abs Δ DSC", "mean Δ DSC", "mean abs Δ voxels",
                 "mean Δ voxels", "mean changed voxels"], no_op_rows),
        "",
        "![Clicks honoured and local effect against clicks](interaction.png)",
        "",
    ]


def _significance_tables(report: Mapping[str, Any]) -> list[str]:
    significance = report["significance"]
    reference = significance["reference"]
    columns = report["summary"]["columns"]
    lines = [
        f"## Significance: `{reference}` against each method",
        "",
        ("Two-sided Wilcoxon signed-rank test on per-case values, Benjamini-Hochberg adjusted over all "
         f"methods and columns of each table; cells are adjusted p-values, `*` marks p < {significance['alpha']:g}."),
        "",
    ]
    others = [name for name in report["methods"] if name != reference]
    if not others:
        return [*lines, "Only one method was evaluated: nothing to compare.", ""]
    for metric, title in (("dsc", "DSC"), ("hd95", "HD95")):
        tests = significance[metric]
        rows = [[name, *(_p_value(tests.get(name, {}).get(c["key"])) for c in columns)] for name in others]
        lines += [f"### {title}", "", *_table([f"{reference} vs", *(c["header"] for c in columns)], rows), ""]
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown tables shaped like the paper's."""
    config = report["config"]
    lines = [
        "# Interactive GTVt segmentation: simulated-click evaluation",
        "",
        f"- Click rule: `{config['rule']}` ({config['rule_description']}).",
        (f"- Cases: {config['cases']}; repetitions: {config['repetitions']} (seed {config['seed']}); "
         f"at most {config['max_clicks']} clicks per session; device: {config['device']} "
         f"({config.get('precision', 'float32')}"
         + (f", 2S-ICR refinement window {config['refine_window']}" if config.get("refine_window") else "")
         + ")."),
        f"- Click guarantee: `{config['guarantee']}` (`+guarantee` labels: {config['guarantee_rule']}).",
        "- Per-case values are averaged over repetitions; HD95 of an empty mask is recorded as the grid diagonal.",
        f"- Reference for significance tests: `{config['reference']}`.",
        "",
        *_methods_section(report),
        *_metric_tables(report),
        *_noc_table(report),
        *_changed_voxels_table(report),
        *_interaction_tables(report),
        *_significance_tables(report),
        "![DSC and HD95 against clicks](curves.png)",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plot


def _colours(names: Sequence[str]) -> dict[str, Any]:
    """One colour per method: matplotlib's ten defaults, or tab20's twenty for more methods."""
    tab20 = matplotlib.colormaps["tab20"]
    palette = [f"C{index}" for index in range(10)] if len(names) <= 10 else [tab20(index) for index in range(20)]
    return {name: palette[index % len(palette)] for index, name in enumerate(names)}


def plot_curves(report: Mapping[str, Any], path: Path) -> None:
    """Fig. 1: mean DSC and HD95 over cases against clicks, '*' where the reference differs (BH p < alpha)."""
    reference = report["config"]["reference"]
    max_clicks = report["config"]["max_clicks"]
    clicks = np.arange(max_clicks + 1)
    figure = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    names = list(report["methods"])
    colours = _colours(names)
    others = [name for name in names if name != reference]
    for ax, metric, label in ((axes[0], "dsc", "DSC"), (axes[1], "hd95", "HD95 (mm)")):
        for name in names:
            mean = np.mean([case[metric] for case in report["cases"][name]], axis=0)
            ax.plot(clicks, mean, marker="o", markersize=3, color=colours[name],
                    linewidth=2.2 if name == reference else 1.4, label=name)
        _mark_significance(ax, report["significance"]["curves"][metric], others, colours, clicks)
        ax.set_xlabel("clicks")
        ax.set_ylabel(label)
        ax.set_xticks(clicks if max_clicks <= 20 else clicks[:: max(1, max_clicks // 10)])
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize="small")
    figure.suptitle(f"Mean over cases; * {reference} vs method, Wilcoxon + BH p < {ALPHA:g}", fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_interaction(report: Mapping[str, Any], path: Path) -> None:
    """Clicks honoured (foreground, background) and the local DSC gain of each click, against clicks."""
    max_clicks = report["config"]["max_clicks"]
    clicks = np.arange(1, max_clicks + 1)
    figure = Figure(figsize=(14, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    names = list(report["methods"])
    colours = _colours(names)
    for name in names:
        colour = colours[name]
        honoured = report["summary"]["clicks_honoured"][name]
        for ax, label in ((axes[0], "foreground"), (axes[1], "background")):
            values = [math.nan if v is None else v for v in honoured[f"{label}_percent"][1:]]
            ax.plot(clicks, values, marker="o", markersize=3, color=colour, label=name)
        gains = [math.nan if e["gain"] is None else e["gain"] for e in report["summary"]["local_effect"][name]["per_click"]]
        axes[2].plot(clicks, gains, marker="o", markersize=3, color=colour, label=name)
    for ax, title in zip(axes, ("foreground clicks honoured (%)", "background clicks honoured (%)",
                                f"local DSC gain ({report['config']['local_effect_radius_mm']:g} mm ball)")):
        ax.set_xlabel("clicks")
        ax.set_title(title, fontsize="medium")
        ax.set_xticks(clicks if max_clicks <= 20 else clicks[:: max(1, max_clicks // 10)])
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-2, 102)
    axes[1].set_ylim(-2, 102)
    axes[2].legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _mark_significance(ax: Any, tests: Mapping[str, Sequence[Mapping[str, Any] | None]],
                       others: Sequence[str], colours: Mapping[str, str], clicks: np.ndarray) -> None:
    """A row of '*' per compared method above the curves, in that method's colour."""
    if not others:
        return
    bottom, top = ax.get_ylim()
    row_height = 0.06 * (top - bottom)
    ax.set_ylim(bottom, top + row_height * (len(others) + 0.5))
    for row, name in enumerate(others):
        y = top + row_height * (row + 0.5)
        for k, test in zip(clicks, tests.get(name, [])):
            if test is not None and test["significant"]:
                ax.text(k, y, "*", color=colours[name], ha="center", va="center", fontsize=12)


# ---------------------------------------------------------------------------- files


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    markdown: Path
    curves: Path
    interaction: Path


def write_report(
    out_dir: Path | str,
    config: EvaluationConfig,
    identities: Mapping[str, MethodIdentity],
    results: Mapping[str, MethodResult],
) -> ReportFiles:
    """Write report.json, report.md, curves.png and interaction.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(config, identities, results)
    files = ReportFiles(out / "report.json", out / "report.md", out / "curves.png", out / "interaction.png")
    files.json.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    files.markdown.write_text(render_markdown(report))
    plot_curves(report, files.curves)
    plot_interaction(report, files.interaction)
    return files
