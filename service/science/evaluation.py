"""Simulated-user evaluation of interactive segmenters, as in the 2S-ICR paper's Methods.

Every case is segmented once without clicks (k = 0), then corrected by up to
``max_clicks`` simulated clicks. Each click is drawn by the click simulator from the
errors of the *system's* current mask (the ensemble probability > 0.5), so all members
of an ensemble see the same click; it is appended to all clicks so far and the
segmenter refines from its previous output (its memory, for 2S-ICR). When the mask
already equals the truth the simulated user stops, and the curve stays where it is.

Each case runs ``repetitions`` times with ``np.random.default_rng([seed, r, case_index])``,
so the same case meets the same random stream under every method. DSC and HD95 are
averaged over repetitions per case (the paper: "each interaction and sample outcome is
averaged over three repetitions"); the per-repetition curves are kept for NoC/PoF (see
:mod:`service.science.report`).

An empty mask (prediction or truth, not both) has no surface, so its HD95 is infinite;
it is recorded as the working grid's diagonal in mm, the worst distance the grid can
show, so that means, medians and paired tests stay defined. HD95 thresholds (5 and 2.5
mm) are far below any grid's diagonal, so NoC and PoF are unaffected by this choice.

Interaction measures (see :mod:`service.science.results`): after each click, which of
the clicks so far the mask honours, and the DSC inside a ball of 15 mm around the new
click before and after it; once per case, after the initial mask, one *no-op* click
(:func:`service.science.simulator.no_op_click`: background, inside the body, at least
30 mm from the mask and the truth) and how far the mask moved.

Each learned method runs as the model alone and/or behind the service's click rules
(the click guarantee and what a click may change, :class:`service.science.methods.Guaranteed`,
the label suffixed ``+guarantee``), and the ``pet-threshold`` baseline (no weights) runs on the first
checkpoint's working grid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from service.argtypes import non_negative_int, positive_int
from service.engine.checkpoints import CheckpointError, load_checkpoint
from service.engine.ensemble import resolve_device
from service.engine.fastpath import AUTOCAST_CHOICES, autocast_dtype, precision_name
from service.engine.guarantee import honour_radius_voxels, honour_rule
from service.imaging.grid import WorkingGrid
from service.imaging.volume import ImageError
from service.science.dataset import (
    Case,
    PreparedCase,
    find_cases,
    load_prepared,
    read_case_list,
    select,
    write_whole,
)
from service.science.methods import Guaranteed, Segmenter, segmenter_for
from service.science.metrics import (
    PAPER_MAX_CLICKS,
    clicks_honoured,
    dice,
    hd95,
    local_dice,
)
from service.science.pet_threshold import METHOD as PET_THRESHOLD
from service.science.pet_threshold import PetThreshold, with_suv
from service.science.report import (
    EvaluationConfig,
    MethodIdentity,
    choose_reference,
    write_report,
)
from service.science.results import (
    LOCAL_EFFECT_RADIUS_MM,
    CaseResult,
    Curve,
    MethodResult,
    NoOpResult,
    cases_from_json,
    cases_json,
)
from service.science.simulator import ClickRule, body_mask, next_click, no_op_click
from service.store.contract import Click

log = logging.getLogger(__name__)

PAPER_REPETITIONS = 3
GUARANTEE_CHOICES = ("off", "on", "both")
GUARANTEE_SUFFIX = "+guarantee"
BASELINES = (PET_THRESHOLD,)
BASELINE_GRID = ((64, 64, 64), 2.0)  # the shipped demo's grid, when no checkpoint gives one
MEASURES = "interaction/1"  # saved results from before these measures are recomputed


class EvaluationInputError(ValueError):
    """The evaluation cannot start with what it was given; the message says why."""


def worst_hd95_mm(grid: WorkingGrid) -> float:
    """The grid's diagonal in mm: no two voxels of the grid are further apart."""
    return float(grid.spacing_mm * math.sqrt(sum(n * n for n in grid.shape)))


def bounded_hd95(mask: np.ndarray, truth: np.ndarray, grid: WorkingGrid) -> float:
    """HD95 in mm on the working grid, with the surfaceless (infinite) case at the grid diagonal."""
    distance = hd95(mask, truth, (grid.spacing_mm,) * 3)
    return min(distance, worst_hd95_mm(grid))


def repetition_rng(seed: int, repetition: int, case_index: int) -> np.random.Generator:
    """The random stream of one repetition of one case, identical for every method."""
    return np.random.default_rng([seed, repetition, case_index])


def interaction_curve(
    segmenter: Segmenter,
    case: PreparedCase,
    rng: np.random.Generator,
    max_clicks: int = PAPER_MAX_CLICKS,
    rule: ClickRule = ClickRule.DEEPGROW,
    *,
    initial: np.ndarray | None = None,
) -> Curve:
    """Simulate one user session: the initial mask, then up to ``max_clicks`` corrective clicks.

    ``initial`` is the segmenter's initial probability when the caller already has it
    (it does not depend on the random stream, so repetitions can share it).
    """
    if max_clicks < 0:
        raise ValueError(f"max_clicks must be >= 0, got {max_clicks}")
    probability = segmenter.initial_probability(case.images) if initial is None else initial
    mask = probability > 0.5
    local_radius = LOCAL_EFFECT_RADIUS_MM / case.grid.spacing_mm
    dsc_values = [dice(mask, case.truth)]
    hd95_values = [bounded_hd95(mask, case.truth, case.grid)]
    changed = [0]
    honoured = {"foreground": [0], "background": [0]}
    local_before, local_after = [math.nan], [math.nan]
    clicks: list[Click] = []
    for _ in range(max_clicks):
        click = next_click(mask, case.truth, rng, rule)
        if click is None:  # perfect mask: the user has nothing left to correct
            break
        clicks.append(click)
        local_before.append(local_dice(mask, case.truth, click.voxel, local_radius))
        probability = segmenter.refine(case.images, probability, tuple(clicks), new_clicks=1)
        refined = probability > 0.5
        changed.append(int(np.count_nonzero(refined != mask)))
        mask = refined
        local_after.append(local_dice(mask, case.truth, click.voxel, local_radius))
        kept = clicks_honoured(mask, clicks)
        for label, counts in honoured.items():
            counts.append(int(sum(ok for ok, made in zip(kept, clicks) if made.label == label)))
        dsc_values.append(dice(mask, case.truth))
        hd95_values.append(bounded_hd95(mask, case.truth, case.grid))
    remaining = max_clicks + 1 - len(dsc_values)

    def held(values: list[Any], dtype: type, after: Any = None) -> np.ndarray:
        return np.array(values + [values[-1] if after is None else after] * remaining, dtype=dtype)

    return Curve(
        dsc=held(dsc_values, np.float64),
        hd95=held(hd95_values, np.float64),
        changed_voxels=held(changed, np.int64, 0),
        clicks=tuple(clicks),
        foreground_honoured=held(honoured["foreground"], np.int64),
        background_honoured=held(honoured["background"], np.int64),
        local_dice_before=held(local_before, np.float64, math.nan),
        local_dice_after=held(local_after, np.float64, math.nan),
    )


def no_op_result(segmenter: Segmenter, case: PreparedCase, initial: np.ndarray) -> NoOpResult | None:
    """The initial mask, one no-op click (see the module doc), and how much the mask moved."""
    mask = initial > 0.5
    click = no_op_click(mask, case.truth, body_mask(case.images[0]), case.grid.spacing_mm)
    if click is None:
        return None
    after = segmenter.refine(case.images, initial, (click,), new_clicks=1) > 0.5
    return NoOpResult(
        click=click,
        dsc_before=dice(mask, case.truth),
        dsc_after=dice(after, case.truth),
        voxels_before=int(np.count_nonzero(mask)),
        voxels_after=int(np.count_nonzero(after)),
        changed_voxels=int(np.count_nonzero(after != mask)),
    )


def evaluate_method(
    segmenter: Segmenter,
    cases: Iterable[PreparedCase],
    *,
    max_clicks: int = PAPER_MAX_CLICKS,
    repetitions: int = PAPER_REPETITIONS,
    seed: int = 0,
    rule: ClickRule = ClickRule.DEEPGROW,
    no_op: bool = True,
) -> MethodResult:
    """Every case, ``repetitions`` simulated sessions each, and its no-op click; ``cases`` may be lazy."""
    if repetitions < 1:
        raise ValueError(f"repetitions must be >= 1, got {repetitions}")
    results = []
    for case_index, case in enumerate(cases):
        initial = segmenter.initial_probability(case.images)
        curves = tuple(
            interaction_curve(segmenter, case, repetition_rng(seed, r, case_index), max_clicks, rule, initial=initial)
            for r in range(repetitions)
        )
        results.append(CaseResult(case.id, curves, no_op_result(segmenter, case, initial) if no_op else None))
    return MethodResult(tuple(results))


def cases_to_evaluate(data_dir: Path | str, case_ids: Sequence[str] | None = None) -> list[Case]:
    """The cases under ``data_dir``: all of them, or those named, in the order named."""
    found = find_cases(data_dir)
    if case_ids is not None:
        try:
            found = select(found, list(case_ids))
        except KeyError as error:
            raise EvaluationInputError(str(error.args[0])) from error
    if not found:
        raise EvaluationInputError(f"no complete cases (CT, PET and GTVt) found in {data_dir}")
    return found


def _device(device: str | torch.device) -> torch.device:
    """The torch device; an unavailable one is an input error, reported before any work."""
    if not isinstance(device, str):
        return device
    try:
        return resolve_device(device)
    except RuntimeError as error:  # CUDA asked for but absent
        raise EvaluationInputError(str(error)) from error


@dataclass(frozen=True)
class MethodPlan:
    """One report entry: its segmenter, where its cases come from, and what identifies its results."""

    label: str
    identity: MethodIdentity
    segmenter: Segmenter
    provenance: dict[str, Any]
    prepare: Callable[[Case], PreparedCase]


def _prepared(
    case: Case, *, grid_shape: tuple[int, int, int], spacing_mm: float, cache: Path | None, suv: bool = False
) -> PreparedCase:
    prepared = load_prepared(case, grid_shape, spacing_mm, cache)
    return with_suv(case, prepared) if suv else prepared


def guarantee_labels(label: str, guarantee: str) -> list[tuple[str, bool]]:
    """(report label, guarantee on?) for a learned method under ``--guarantee off|on|both``."""
    if guarantee not in GUARANTEE_CHOICES:
        raise EvaluationInputError(f"guarantee must be one of {', '.join(GUARANTEE_CHOICES)}, got {guarantee!r}")
    variants = {"off": [False], "on": [True], "both": [False, True]}[guarantee]
    return [(f"{label}{GUARANTEE_SUFFIX}" if on else label, on) for on in variants]


def _plans(
    methods: Mapping[str, Path | str],
    baselines: Sequence[str],
    guarantee: str,
    common: dict[str, Any],
    device: torch.device,
    cache: Path | None,
    *,
    refine_window: int | None,
    refine_margin: int,
    autocast: str,
) -> list[MethodPlan]:
    plans = []
    grid: tuple[tuple[int, int, int], float] | None = None
    for name, directory in methods.items():
        checkpoint = load_checkpoint(directory, method=None)
        segmenter = segmenter_for(
            checkpoint, device, refine_window=refine_window, refine_margin=refine_margin, autocast=autocast
        )
        shape, spacing = checkpoint.grid_shape, checkpoint.spacing_mm
        grid = grid or (shape, spacing)
        identity = MethodIdentity(checkpoint.method, checkpoint.digest, checkpoint.description, str(directory),
                                  shape, spacing)
        windowed = checkpoint.method == "2s-icr"
        for label, on in guarantee_labels(name, guarantee):
            radius = honour_radius_voxels(spacing) if on else None
            plans.append(MethodPlan(
                label=label,
                identity=identity,
                segmenter=Guaranteed(segmenter, radius, spacing) if radius is not None else segmenter,
                provenance={
                    **common, "label": label, "checkpoint_digest": checkpoint.digest,
                    "refine_window": refine_window if windowed else None,
                    "refine_margin": refine_margin if refine_window and windowed else None,
                    "guarantee_radius_voxels": radius,
                },
                prepare=partial(_prepared, grid_shape=shape, spacing_mm=spacing, cache=cache),
            ))
    shape, spacing = grid or BASELINE_GRID
    for baseline in baselines:
        if baseline != PET_THRESHOLD:
            raise EvaluationInputError(f"unknown baseline {baseline!r}; known: {', '.join(BASELINES)}")
        if baseline in methods:
            raise EvaluationInputError(f"label {baseline!r} names both a checkpoint and the baseline")
        identity = MethodIdentity(PET_THRESHOLD, "-", "40 % of the local SUVmax, connected, clicks add or cut regions",
                                  "-", shape, spacing)
        plans.append(MethodPlan(
            label=baseline,
            identity=identity,
            segmenter=PetThreshold(spacing),
            provenance={**common, "label": baseline, "checkpoint_digest": "-", "grid": [list(shape), spacing]},
            prepare=partial(_prepared, grid_shape=shape, spacing_mm=spacing, cache=cache, suv=True),
        ))
    return plans


def evaluate(
    methods: Mapping[str, Path | str],
    data_dir: Path | str,
    out_dir: Path | str,
    *,
    case_ids: Sequence[str] | None = None,
    max_clicks: int = PAPER_MAX_CLICKS,
    repetitions: int = PAPER_REPETITIONS,
    seed: int = 0,
    rule: ClickRule = ClickRule.DEEPGROW,
    device: str | torch.device = "auto",
    cache_dir: Path | str | None = None,
    reference: str | None = None,
    refine_window: int | None = None,
    refine_margin: int = 16,
    autocast: str = "off",
    guarantee: str = "both",
    baselines: Sequence[str] = BASELINES,
) -> dict[str, MethodResult]:
    """Evaluate each named checkpoint (and each baseline) on the same cases; write the report into ``out_dir``.

    Cases are prepared on each checkpoint's own working grid, one at a time (a 144^3
    case is tens of MB), and cached under ``cache_dir`` when given. ``refine_window``
    evaluates 2S-ICR's windowed fast path instead of the exact refinement; ``autocast``
    runs every method's networks in reduced precision (default: exact float32).
    ``guarantee`` says whether each checkpoint is reported as the model alone (off),
    behind the service's click guarantee (on, label + ``+guarantee``), or both.

    Each method's results are kept in ``out_dir/methods/`` with what produced them
    (checkpoint digest, cases, protocol, device); a rerun into the same ``out_dir``
    reuses those that match instead of recomputing them, so an interrupted evaluation
    resumes and a method can be added to a comparison without rerunning the others.
    """
    if not methods and not baselines:
        raise EvaluationInputError("no methods to evaluate")
    if max_clicks < 0 or repetitions < 1:
        raise EvaluationInputError(f"need max_clicks >= 0 and repetitions >= 1, got {max_clicks}, {repetitions}")
    cases = cases_to_evaluate(data_dir, case_ids)
    torch_device = _device(device)
    try:
        precision = precision_name(autocast_dtype(autocast, torch_device))
    except ValueError as error:
        raise EvaluationInputError(str(error)) from error
    common = {
        "case_ids": [case.id for case in cases], "max_clicks": max_clicks, "repetitions": repetitions, "seed": seed,
        "rule": rule.value, "device": str(torch_device), "precision": precision, "measures": MEASURES,
    }
    plans = _plans(methods, baselines, guarantee, common, torch_device, Path(cache_dir) if cache_dir else None,
                   refine_window=refine_window, refine_margin=refine_margin, autocast=autocast)
    try:
        reference_name = choose_reference([plan.label for plan in plans], reference)
    except ValueError as error:
        raise EvaluationInputError(str(error)) from error
    results: dict[str, MethodResult] = {}
    for plan in tqdm(plans, desc="methods", unit="method"):
        saved = _method_results_path(out_dir, plan.label)
        kept = _read_method_result(saved, plan.provenance)
        if kept is not None:
            results[plan.label] = kept
            log.info("reusing %s's results from %s", plan.label, saved)
            continue
        prepared = (plan.prepare(case) for case in cases)
        progress = tqdm(prepared, total=len(cases), desc=plan.label, unit="case", leave=False)
        results[plan.label] = evaluate_method(
            plan.segmenter, progress, max_clicks=max_clicks, repetitions=repetitions, seed=seed, rule=rule
        )
        _write_method_result(saved, plan.provenance, results[plan.label])
        log.info("evaluated %s (%s) on %d cases", plan.label, plan.identity.method, len(cases))
    config = EvaluationConfig(
        max_clicks=max_clicks,
        repetitions=repetitions,
        seed=seed,
        rule=rule,
        case_ids=tuple(case.id for case in cases),
        device=str(torch_device),
        reference=reference_name,
        precision=precision,
        refine_window=refine_window,
        guarantee=guarantee,
    )
    write_report(out_dir, config, {plan.label: plan.identity for plan in plans}, results)
    return results


def _method_results_path(out_dir: Path | str, name: str) -> Path:
    return Path(out_dir) / "methods" / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"


def _write_method_result(path: Path, provenance: dict[str, Any], result: MethodResult) -> None:
    document = json.dumps({"provenance": provenance, "cases": cases_json(result)}) + "\n"
    write_whole(path, lambda file: file.write(document.encode()))


def _read_method_result(path: Path, provenance: dict[str, Any]) -> MethodResult | None:
    """The saved results at ``path`` if they came from exactly ``provenance``, else None."""
    try:
        saved = json.loads(path.read_text())
        if saved["provenance"] != provenance:
            return None
        return cases_from_json(saved["cases"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:  # unreadable: recompute and overwrite
        log.warning("ignoring saved results %s: %s", path, error)
        return None


# ------------------------------------------------------------------------------ CLI


def _named_directory(text: str) -> tuple[str, Path]:
    """``NAME=DIR`` from the command line."""
    name, separator, directory = text.partition("=")
    if not separator or not name.strip() or not directory.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name.strip(), Path(directory.strip())


def _methods_from_arguments(pairs: Sequence[tuple[str, Path]]) -> dict[str, Path]:
    methods: dict[str, Path] = {}
    for name, directory in pairs:
        if name in methods:
            raise EvaluationInputError(f"method name {name!r} is given twice in --weights")
        methods[name] = directory
    return methods


def _run_evaluate(args: argparse.Namespace) -> int:
    """``icr evaluate``: 0 when the report is written, 2 on unusable input."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        methods = _methods_from_arguments(args.weights)
        case_ids = read_case_list(args.cases) if args.cases is not None else None
        evaluate(
            methods,
            args.data,
            args.out,
            case_ids=case_ids,
            max_clicks=args.max_clicks,
            repetitions=args.repetitions,
            seed=args.seed,
            rule=ClickRule(args.rule),
            device=args.device,
            cache_dir=args.cache,
            reference=args.reference,
            refine_window=args.refine_window,
            refine_margin=args.refine_margin,
            autocast=args.autocast,
            guarantee=args.guarantee,
            baselines=[name for name in (args.baseline or BASELINES) if name != "none"],
        )
    except (EvaluationInputError, CheckpointError, ImageError, FileNotFoundError) as error:
        log.error("evaluation failed: %s", error)
        return 2
    log.info("report written to %s", args.out)
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``evaluate`` to the ``icr`` subcommands."""
    parser = commands.add_parser(
        "evaluate",
        help="simulated-click evaluation of checkpoints (paper tables, curves, significance)",
        description="Evaluate checkpoints with a simulated user and write report.json, report.md and curves.png.",
    )
    parser.add_argument("--data", type=Path, required=True, help="case folder (HECKTOR 2021 or 2022 layout)")
    parser.add_argument("--cases", type=Path, default=None, help="file of case ids, one a line (default: all)")
    parser.add_argument(
        "--weights", type=_named_directory, action="append", default=[], metavar="NAME=DIR",
        help="a label and a checkpoint directory; repeat for each method (the method type comes from its manifest)",
    )
    parser.add_argument(
        "--guarantee", choices=GUARANTEE_CHOICES, default="both",
        help="each checkpoint as the model alone (off), behind the service's click rules (on, label "
        f"+ '{GUARANTEE_SUFFIX}', each click's label set {honour_rule()}, only the objects a click touches "
        "changed), or both (default)",
    )
    parser.add_argument(
        "--baseline", choices=[*BASELINES, "none"], action="append", default=None,
        help=f"baselines without weights (default: {', '.join(BASELINES)}; 'none' for no baseline)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument("--max-clicks", type=non_negative_int, default=PAPER_MAX_CLICKS)
    parser.add_argument("--repetitions", type=positive_int, default=PAPER_REPETITIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rule", choices=[rule.value for rule in ClickRule], default=ClickRule.DEEPGROW.value,
                        help="click simulator weighting (deepgrow: MONAI's exp(d)-1; linear: the paper's text)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--cache", type=Path, default=None, help="folder for prepared-case caches")
    parser.add_argument("--reference", default=None,
                        help="label tested against the others (default: '2s-icr' if given, else the first)")
    parser.add_argument("--refine-window", type=positive_int, default=None,
                        help="2S-ICR: evaluate the windowed refinement fast path with this window edge (voxels)")
    parser.add_argument("--refine-margin", type=non_negative_int, default=16,
                        help="voxels discarded per side of the refinement window")
    parser.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="off",
                        help="reduced-precision inference for every method (default off: exact float32; "
                        "auto: the service's default, bfloat16 on CPUs with bfloat16 instructions)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    parser.set_defaults(run=_run_evaluate, baseline=None)
    return parser
