"""``icr localise-eval``: how often the found centre's working window holds the tumour.

For every case (HECKTOR layouts, as :func:`service.science.dataset.find_cases` reads them)
the tumour is localised with no centre given (:func:`service.imaging.localise.localise_tumour`),
and the GTVt's centre of mass is compared with the working window (a cube of
``grid-mm`` edge centred on the found point): a hit when it lies inside. The distance
from the found centre to the centre of mass is reported too.

With ``--weights``, the checkpoint's initial ensemble also segments each case with no
clicks twice: in the window at the found centre and in the window centred on the GTVt
(as the paper's crops are, :func:`service.science.dataset.prepare_case`). Both Dice
scores count the whole GTVt as the truth (its voxels in the ground-truth-centred window),
so tumour left outside the found window counts as missed.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from service.argtypes import positive_int
from service.imaging.grid import WorkingGrid, preprocess, resample
from service.imaging.localise import localise_tumour
from service.imaging.nifti import load_nifti_file
from service.imaging.volume import Volume
from service.science.dataset import Case, find_cases, prepare_case


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
    dice_found: float | None = None
    dice_truth_centred: float | None = None


class InitialSegmenter(Protocol):
    def initial_probability(self, images: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class DiceProbe:
    """The initial ensemble and its grid, for 0-click Dice at a given centre."""

    segmenter: InitialSegmenter
    grid_shape: tuple[int, int, int]
    spacing_mm: float

    def dice_pair(self, case: Case, ct: Volume, pet: Volume, found_mm: np.ndarray) -> tuple[float, float]:
        """0-click Dice with the window at ``found_mm`` and with the paper's GTVt-centred window."""
        centred = prepare_case(case, self.grid_shape, self.spacing_mm)
        truth_voxels = int(centred.truth.sum())
        centred_mask = self.segmenter.initial_probability(centred.images) > 0.5
        grid = WorkingGrid.around(found_mm, self.grid_shape, self.spacing_mm)
        label = load_nifti_file(case.gtvt, role="gtvt")
        gtvt = Volume((label.array == case.gtvt_label if case.gtvt_label is not None else label.array > 0)
                      .astype(np.float32), label.affine)
        truth = resample(gtvt, grid, order=1, fill=0.0) > 0.5
        found_mask = self.segmenter.initial_probability(preprocess(ct, pet, grid).astype(np.float32)) > 0.5
        return (_dice(found_mask, truth, int(found_mask.sum()) + truth_voxels),
                _dice(centred_mask, centred.truth, int(centred_mask.sum()) + truth_voxels))


def _dice(mask: np.ndarray, truth: np.ndarray, denominator: int) -> float:
    return 1.0 if denominator == 0 else round(2.0 * float(np.count_nonzero(mask & truth)) / denominator, 4)


def load_probe(weights: Path, threads: int) -> DiceProbe:
    import torch

    from service.engine.checkpoints import load_checkpoint
    from service.science.methods import segmenter_for

    torch.set_num_threads(threads)
    checkpoint = load_checkpoint(weights, method=None)
    segmenter = segmenter_for(checkpoint, torch.device("cpu"))
    return DiceProbe(segmenter, checkpoint.grid_shape, checkpoint.spacing_mm)


def gtvt_centre_of_mass(case: Case) -> np.ndarray:
    """World centre of mass (mm) of the case's GTVt."""
    label = load_nifti_file(case.gtvt, role="gtvt")
    mask = label.array == case.gtvt_label if case.gtvt_label is not None else label.array > 0
    if not mask.any():
        raise ValueError(f"{case.id}: empty GTVt")
    index = np.argwhere(mask).mean(axis=0)
    return label.affine[:3, :3] @ index + label.affine[:3, 3]


def evaluate_case(case: Case, window_mm: float, probe: DiceProbe | None = None) -> LocalisationResult:
    ct = load_nifti_file(case.ct, role="ct")
    pet = load_nifti_file(case.pet, role="pet")
    started = time.perf_counter()
    found = localise_tumour(ct, pet, window_mm=window_mm)
    seconds = time.perf_counter() - started
    truth = gtvt_centre_of_mass(case)
    offset = truth - np.asarray(found.centre_mm)
    dice_found = dice_centred = None
    if probe is not None:
        dice_found, dice_centred = probe.dice_pair(case, ct, pet, np.asarray(found.centre_mm))
    return LocalisationResult(
        case=case.id, found_mm=found.centre_mm, truth_mm=tuple(round(float(v), 1) for v in truth),  # type: ignore[arg-type]
        distance_mm=round(float(np.linalg.norm(offset)), 1), hit=bool(np.all(np.abs(offset) <= window_mm / 2)),
        candidates=len(found.candidates), seconds=round(seconds, 2), reason=found.reason,
        dice_found=dice_found, dice_truth_centred=dice_centred,
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
        **_dice_summary(results),
    }


def _dice_summary(results: list[LocalisationResult]) -> dict[str, object]:
    pairs = [(r.dice_found, r.dice_truth_centred) for r in results
             if r.dice_found is not None and r.dice_truth_centred is not None]
    if not pairs:
        return {}
    found, centred = (float(np.mean(values)) for values in zip(*pairs))
    return {"dice_found_mean": round(found, 4), "dice_truth_centred_mean": round(centred, 4),
            "dice_ratio": round(found / centred, 3) if centred > 0 else None}


def _run(args: argparse.Namespace) -> int:
    cases = find_cases(args.data)
    if not cases:
        print(f"no cases in {args.data}")
        return 2
    window_mm = float(args.grid_mm)
    probe = load_probe(args.weights, args.threads) if args.weights is not None else None
    if probe is not None and abs(probe.grid_shape[0] * probe.spacing_mm - window_mm) > 1e-6:
        print(f"note: the checkpoint's window is {probe.grid_shape[0] * probe.spacing_mm:g} mm; "
              f"hits are counted for --grid-mm {window_mm:g}")
    results = []
    for case in cases:
        result = evaluate_case(case, window_mm, probe)
        results.append(result)
        mark = "hit " if result.hit else "MISS"
        dice_note = "" if result.dice_found is None else f" dice {result.dice_found} (centred {result.dice_truth_centred})"
        print(f"{mark} {case.id}: found {list(result.found_mm)} truth {list(result.truth_mm)} "
              f"distance {result.distance_mm} mm{dice_note}", flush=True)
    summary = summarise(results, window_mm)
    print(json.dumps(summary))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "cases": [asdict(r) for r in results]}, indent=1) + "\n")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``localise-eval`` to the ``icr`` subcommands."""
    parser = commands.add_parser(
        "localise-eval", help="hit rate of tumour localisation with no centre given",
        description="Localise the tumour in every case and report how often its centre of mass lies in the window.",
    )
    parser.add_argument("--data", type=Path, required=True, help="case folder (HECKTOR 2021 or 2022 layout)")
    parser.add_argument("--grid-mm", type=positive_int, default=128,
                        help="working window edge in mm (the checkpoint's grid: 64 voxels x 2 mm for the demo)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoint folder: also report the initial ensemble's 0-click Dice at the found centre "
                             "and at a ground-truth centre")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads for --weights")
    parser.add_argument("--out", type=Path, default=None, help="write per-case results and the summary as JSON")
    parser.set_defaults(run=_run)
    return parser
