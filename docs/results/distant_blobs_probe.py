"""How often do a checkpoint's initial members segment a blob far from the tumour on training cases?

A refinement training sample's first memory comes from an initial member (``icr train
--memory-from``): the fold's own member, which trained on the case, or the held-out one,
which did not. This counts, over the training cases, the false-positive blobs in each
one's mask (connected components of the thresholded output that touch no tumour voxel and
have at least ``--min-voxels`` voxels farther than ``--beyond-mm`` from it), so that one
can tell whether the refinement sees background clicks on such blobs during training. With
the checkpoint's ``zero_click_passes``, a sample's first clicked interaction sees the memory
after that many click-free passes of the fold's refinement member: counted too
(``after_zero_click_passes``).

Usage: ``python docs/results/distant_blobs_probe.py --weights service/weights/demo
--data runs/phantoms-train --folds runs/RUN/folds.json --cache runs/cache``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from service.engine.checkpoints import load_checkpoint
from service.engine.clicks import click_maps
from service.engine.ensemble import Ensemble
from service.science.dataset import find_cases, load_prepared, read_folds


def distant_blobs(mask: np.ndarray, truth: np.ndarray, spacing_mm: float, beyond_mm: float, min_voxels: int) -> int:
    """False-positive components of ``mask`` that touch no truth voxel and reach beyond ``beyond_mm`` of it."""
    far = ndimage.distance_transform_edt(~truth, sampling=spacing_mm) > beyond_mm
    labels, count = ndimage.label(mask)
    far_voxels = np.bincount(labels[far], minlength=count + 1)  # per component, label 0 is the background
    touching = np.unique(labels[truth])
    return sum(1 for i in range(1, count + 1) if i not in touching and far_voxels[i] >= min_voxels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the training cases")
    parser.add_argument("--folds", type=Path, required=True, help="the run's folds.json")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--beyond-mm", type=float, default=10.0)
    parser.add_argument("--min-voxels", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = load_checkpoint(args.weights, method=None)
    cpu = torch.device("cpu")
    initial = [Ensemble([member], cpu) for member in checkpoint.stages["initial"]]
    refinement = [Ensemble([member], cpu) for member in checkpoint.stages["refinement"]]
    folds = read_folds(args.folds)
    cases = {case.id: case for case in find_cases(args.data)}
    counts = {kind: {"cases": 0, "blobs": 0, "cases_after_zero_click_passes": 0, "blobs_after_zero_click_passes": 0}
              for kind in ("own", "held-out")}
    for fold, split in enumerate(folds):
        for case_id in split["val"]:
            case = load_prepared(cases[case_id], checkpoint.grid_shape, checkpoint.spacing_mm, args.cache)
            no_clicks = click_maps((), case.truth.shape, checkpoint.click_sigma_voxels)
            # the held-out member never trained on the case; any other fold's member did
            for kind, member in (("held-out", fold), ("own", (fold + 1) % len(folds))):
                memory = initial[member].probability(case.images)
                first = distant_blobs(memory > 0.5, case.truth, checkpoint.spacing_mm, args.beyond_mm, args.min_voxels)
                for _ in range(checkpoint.zero_click_passes):  # the fold's refinement member, as in training
                    memory = refinement[member].probability(np.concatenate([case.images, memory[None], no_clicks]))
                later = distant_blobs(memory > 0.5, case.truth, checkpoint.spacing_mm, args.beyond_mm, args.min_voxels)
                for key, blobs in (("", first), ("_after_zero_click_passes", later)):
                    counts[kind][f"cases{key}"] += int(blobs > 0)
                    counts[kind][f"blobs{key}"] += blobs
    print(json.dumps({"weights": checkpoint.digest[:12], "training_cases": sum(len(s["val"]) for s in folds),
                      "beyond_mm": args.beyond_mm, "min_voxels": args.min_voxels, "zero_click_passes": checkpoint.zero_click_passes,
                      "with_distant_blobs": counts}, indent=1))


if __name__ == "__main__":
    main()
