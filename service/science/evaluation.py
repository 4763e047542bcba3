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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from service.argtypes import non_negative_int, positive_int
from service.engine.checkpoints import CheckpointError
from service.engine.ensemble import resolve_device
from service.engine.fastpath import AUTOCAST_CHOICES, autocast_dtype, precision_name
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
from service.science.methods import Segmenter, load_segmenter
from service.science.metrics import PAPER_MAX_CLICKS, dice, hd95
from service.science.report import (
    EvaluationConfig,
    MethodIdentity,
    cases_json,
    choose_reference,
    write_report,
)
from service.science.simulator import ClickRule, next_click
from service.store.contract import Click

log = logging.getLogger(__name__)

PAPER_REPETITIONS = 3


class EvaluationInputError(ValueError):
    """The evaluation cannot start with what it was given; the message says why."""


@dataclass(frozen=True)
class Curve:
    """One simulated session on one case: index k holds the state after k clicks."""

    dsc: np.ndarray  # (max_clicks + 1,) float64
    hd95: np.ndarray  # (max_clicks + 1,) float64, mm; empty-mask cases at the grid diagonal
    changed_voxels: np.ndarray  # (max_clicks + 1,) int64: mask voxels flipped by click k; [0] = 0
    clicks: tuple[Click, ...]  # the clicks actually made (fewer than max_clicks if the mask became perfect)

    @property
    def max_clicks(self) -> int:
        return len(self.dsc) - 1


@dataclass(frozen=True)
class CaseResult:
    """All repetitions of one case under one method."""

    case_id: str
    repetitions: tuple[Curve, ...]

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
        counts = [curve.changed_voxels[1 : len(curve.clicks) + 1] for case in self.cases for curve in case.repetitions]
        return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


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
    dsc_values = [dice(mask, case.truth)]
    hd95_values = [bounded_hd95(mask, case.truth, case.grid)]
    changed = [0]
    clicks: list[Click] = []
    for _ in range(max_clicks):
        simulated = next_click(mask, case.truth, rng, rule)
        if simulated is None:  # perfect mask: the user has nothing left to correct
            break
        clicks.append(Click(label=simulated.label, voxel=simulated.voxel))
        probability = segmenter.refine(case.images, probability, tuple(clicks), new_clicks=1)
        refined = probability > 0.5
        changed.append(int(np.count_nonzero(refined != mask)))
        mask = refined
        dsc_values.append(dice(mask, case.truth))
        hd95_values.append(bounded_hd95(mask, case.truth, case.grid))
    remaining = max_clicks + 1 - len(dsc_values)
    return Curve(
        dsc=np.array(dsc_values + [dsc_values[-1]] * remaining, dtype=np.float64),
        hd95=np.array(hd95_values + [hd95_values[-1]] * remaining, dtype=np.float64),
        changed_voxels=np.array(changed + [0] * remaining, dtype=np.int64),
        clicks=tuple(clicks),
    )


def evaluate_method(
    segmenter: Segmenter,
    cases: Iterable[PreparedCase],
    *,
    max_clicks: int = PAPER_MAX_CLICKS,
    repetitions: int = PAPER_REPETITIONS,
    seed: int = 0,
    rule: ClickRule = ClickRule.DEEPGROW,
) -> MethodResult:
    """Every case, ``repetitions`` simulated sessions each; ``cases`` may be a lazy iterable."""
    if repetitions < 1:
        raise ValueError(f"repetitions must be >= 1, got {repetitions}")
    results = []
    for case_index, case in enumerate(cases):
        initial = segmenter.initial_probability(case.images)
        curves = tuple(
            interaction_curve(segmenter, case, repetition_rng(seed, r, case_index), max_clicks, rule, initial=initial)
            for r in range(repetitions)
        )
        results.append(CaseResult(case.id, curves))
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


def _identity(directory: Path | str, segmenter: Segmenter) -> MethodIdentity:
    checkpoint = segmenter.checkpoint
    return MethodIdentity(
        method=checkpoint.method,
        digest=checkpoint.digest,
        description=checkpoint.description,
        directory=str(directory),
        grid_shape=checkpoint.grid_shape,
        spacing_mm=checkpoint.spacing_mm,
    )


def _device(device: str | torch.device) -> torch.device:
    """The torch device; an unavailable one is an input error, reported before any work."""
    if not isinstance(device, str):
        return device
    try:
        return resolve_device(device)
    except RuntimeError as error:  # CUDA asked for but absent
        raise EvaluationInputError(str(error)) from error


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
) -> dict[str, MethodResult]:
    """Evaluate each named checkpoint on the same cases and write the report into ``out_dir``.

    Cases are prepared on each checkpoint's own working grid, one at a time (a 144^3
    case is tens of MB), and cached under ``cache_dir`` when given. ``refine_window``
    evaluates 2S-ICR's windowed fast path instead of the exact refinement; ``autocast``
    runs every method's networks in reduced precision (default: exact float32).

    Each method's results are kept in ``out_dir/methods/`` with what produced them
    (checkpoint digest, cases, protocol, device); a rerun into the same ``out_dir``
    reuses those that match instead of recomputing them, so an interrupted evaluation
    resumes and a method can be added to a comparison without rerunning the others.
    """
    if not methods:
        raise EvaluationInputError("no methods to evaluate")
    if max_clicks < 0 or repetitions < 1:
        raise EvaluationInputError(f"need max_clicks >= 0 and repetitions >= 1, got {max_clicks}, {repetitions}")
    try:
        reference_name = choose_reference(list(methods), reference)
    except ValueError as error:
        raise EvaluationInputError(str(error)) from error
    cases = cases_to_evaluate(data_dir, case_ids)
    torch_device = _device(device)
    try:
        precision = precision_name(autocast_dtype(autocast, torch_device))
    except ValueError as error:
        raise EvaluationInputError(str(error)) from error
    cache = Path(cache_dir) if cache_dir is not None else None
    results: dict[str, MethodResult] = {}
    identities: dict[str, MethodIdentity] = {}
    for name, directory in tqdm(methods.items(), desc="methods", unit="method"):
        segmenter = load_segmenter(
            directory, torch_device, refine_window=refine_window, refine_margin=refine_margin, autocast=autocast
        )
        identities[name] = _identity(directory, segmenter)
        provenance = {
            "label": name, "checkpoint_digest": identities[name].digest, "case_ids": [case.id for case in cases],
            "max_clicks": max_clicks, "repetitions": repetitions, "seed": seed, "rule": rule.value,
            "device": str(torch_device), "precision": precision,
            "refine_window": refine_window if identities[name].method == "2s-icr" else None,
            "refine_margin": refine_margin if refine_window and identities[name].method == "2s-icr" else None,
        }
        saved = _method_results_path(out_dir, name)
        kept = _read_method_result(saved, provenance)
        if kept is not None:
            results[name] = kept
            log.info("reusing %s's results from %s", name, saved)
            continue
        grid_shape, spacing = segmenter.checkpoint.grid_shape, segmenter.checkpoint.spacing_mm
        prepared = (load_prepared(case, grid_shape, spacing, cache) for case in cases)
        progress = tqdm(prepared, total=len(cases), desc=name, unit="case", leave=False)
        results[name] = evaluate_method(
            segmenter, progress, max_clicks=max_clicks, repetitions=repetitions, seed=seed, rule=rule
        )
        _write_method_result(saved, provenance, results[name])
        log.info("evaluated %s (%s) on %d cases", name, identities[name].method, len(cases))
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
    )
    write_report(out_dir, config, identities, results)
    return results


def _method_results_path(out_dir: Path | str, name: str) -> Path:
    return Path(out_dir) / "methods" / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"


def _write_method_result(path: Path, provenance: dict, result: MethodResult) -> None:
    document = json.dumps({"provenance": provenance, "cases": cases_json(result)}) + "\n"
    write_whole(path, lambda file: file.write(document.encode()))


def _read_method_result(path: Path, provenance: dict) -> MethodResult | None:
    """The saved results at ``path`` if they came from exactly ``provenance``, else None."""
    try:
        saved = json.loads(path.read_text())
        if saved["provenance"] != provenance:
            return None
        return MethodResult(tuple(
            CaseResult(case["case_id"], tuple(
                Curve(
                    dsc=np.asarray(curve["dsc"], dtype=np.float64),
                    hd95=np.asarray(curve["hd95"], dtype=np.float64),
                    changed_voxels=np.asarray(curve["changed_voxels"], dtype=np.int64),
                    clicks=tuple(Click.from_dict(click) for click in curve["clicks"]),
                )
                for curve in case["repetitions"]
            ))
            for case in saved["cases"]
        ))
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
        )
    except (EvaluationInputError, CheckpointError, ImageError, FileNotFoundError) as error:
        log.error("evaluation failed: %s", error)
        return 2
    log.info("report written to %s", args.out)
    return 0


def register(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``evaluate`` to the ``icr`` subcommands."""
    parser = commands.add_parser(
        "evaluate",
        help="simulated-click evaluation of checkpoints (paper tables, curves, significance)",
        description="Evaluate checkpoints with a simulated user and write report.json, report.md and curves.png.",
    )
    parser.add_argument("--data", type=Path, required=True, help="case folder (HECKTOR 2021 or 2022 layout)")
    parser.add_argument("--cases", type=Path, default=None, help="file of case ids, one a line (default: all)")
    parser.add_argument(
        "--weights", type=_named_directory, action="append", required=True, metavar="NAME=DIR",
        help="a label and a checkpoint directory; repeat for each method (the method type comes from its manifest)",
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
    parser.set_defaults(run=_run_evaluate)
    return parser
