"""``icr localise-eval``: how often the found centre's working window holds the tumour.

For every case (HECKTOR layouts, as :func:`service.science.dataset.find_cases` reads them)
the tumour is localised with no centre given (:func:`service.imaging.localise.localise_tumour`),
and the GTVt's centre of mass is compared with the working window (a cube of
``grid-mm`` edge centred on the found point): a hit when it lies inside. The distance
from the found centre to the centre of mass is reported too.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from service.argtypes import positive_int
from service.imaging.localise import localise_tumour
from service.imaging.nifti import load_nifti_file
from service.science.dataset import Case, find_cases


@dataclass(frozen=True)
class LocalisationResult:
    case: str
    found_mm: tuple[float, float, float]
    truth_mm: tuple[float, float, float]
    distance_mm: float
    hit: bool
    candidates: int
    seconds: float
    reason: str


def gtvt_centre_of_mass(case: Case) -> np.ndarray:
    """World centre of mass (mm) of the case's GTVt."""
    label = load_nifti_file(case.gtvt, role="gtvt")
    mask = label.array == case.gtvt_label if case.gtvt_label is not None else label.array > 0
    if not mask.any():
        raise ValueError(f"{case.id}: empty GTVt")
    index = np.argwhere(mask).mean(axis=0)
    return label.affine[:3, :3] @ index + label.affine[:3, 3]


def evaluate_case(case: Case, window_mm: float) -> LocalisationResult:
    ct = load_nifti_file(case.ct, role="ct")
    pet = load_nifti_file(case.pet, role="pet")
    started = time.perf_counter()
    found = localise_tumour(ct, pet, window_mm=window_mm)
    seconds = time.perf_counter() - started
    truth = gtvt_centre_of_mass(case)
    offset = truth - np.asarray(found.centre_mm)
    return LocalisationResult(
        case=case.id, found_mm=found.centre_mm, truth_mm=tuple(round(float(v), 1) for v in truth),  # type: ignore[arg-type]
        distance_mm=round(float(np.linalg.norm(offset)), 1), hit=bool(np.all(np.abs(offset) <= window_mm / 2)),
        candidates=len(found.candidates), seconds=round(seconds, 2), reason=found.reason,
    )


def summarise(results: list[LocalisationResult], window_mm: float) -> dict[str, object]:
    distances = np.array([r.distance_mm for r in results]) if results else np.zeros(0)
    return {
        "cases": len(results),
        "window_mm": window_mm,
        "hits": sum(r.hit for r in results),
        "hit_rate": round(sum(r.hit for r in results) / len(results), 3) if results else None,
        "distance_mm_median": round(float(np.median(distances)), 1) if results else None,
        "distance_mm_p90": round(float(np.percentile(distances, 90)), 1) if results else None,
        "distance_mm_max": round(float(distances.max()), 1) if results else None,
        "seconds_median": round(float(np.median([r.seconds for r in results])), 2) if results else None,
    }


def _run(args: argparse.Namespace) -> int:
    cases = find_cases(args.data)
    if not cases:
        print(f"no cases in {args.data}")
        return 2
    window_mm = float(args.grid_mm)
    results = []
    for case in cases:
        result = evaluate_case(case, window_mm)
        results.append(result)
        mark = "hit " if result.hit else "MISS"
        print(f"{mark} {case.id}: found {list(result.found_mm)} truth {list(result.truth_mm)} "
              f"distance {result.distance_mm} mm", flush=True)
    summary = summarise(results, window_mm)
    print(json.dumps(summary))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "cases": [asdict(r) for r in results]}, indent=1) + "\n")
    return 0


def register(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``localise-eval`` to the ``icr`` subcommands."""
    parser = commands.add_parser(
        "localise-eval", help="hit rate of tumour localisation with no centre given",
        description="Localise the tumour in every case and report how often its centre of mass lies in the window.",
    )
    parser.add_argument("--data", type=Path, required=True, help="case folder (HECKTOR 2021 or 2022 layout)")
    parser.add_argument("--grid-mm", type=positive_int, default=128,
                        help="working window edge in mm (the checkpoint's grid: 64 voxels x 2 mm for the demo)")
    parser.add_argument("--out", type=Path, default=None, help="write per-case results and the summary as JSON")
    parser.set_defaults(run=_run)
    return parser
