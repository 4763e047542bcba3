"""Where a checkpoint's first mask (no clicks) misses: the tumour's rim or elsewhere?

For each case, the session's first mask (the initial ensemble and the checkpoint's zero-click
refinement passes, thresholded at 0.5) on the checkpoint's working grid, against the truth:
its DSC, the mask's and the truth's voxels, and the false positives (of them, on the outer
rim: one voxel outside the truth) and false negatives (of them, on the inner rim: the
truth's voxels that touch its outside), as one JSON line per case and checkpoint. A network
that draws a whole tumour one voxel inside its edge shows a mask smaller than the truth with
nearly every false negative on the inner rim.

Usage: ``python docs/results/first_mask_rim_probe.py --weights service/weights/demo RUN/weights
--data runs/phantoms-test --cases 1 3 5 6``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from scipy import ndimage

from service.engine.checkpoints import load_checkpoint
from service.science.dataset import find_cases, load_prepared
from service.science.methods import segmenter_for
from service.science.metrics import dice


def rim_errors(mask: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """DSC, voxel counts, and false positives / negatives with those on the outer / inner rim."""
    outer = ndimage.binary_dilation(truth) & ~truth
    inner = truth & ~ndimage.binary_erosion(truth)
    false_positive, false_negative = mask & ~truth, truth & ~mask
    return {
        "dsc": dice(mask, truth),
        "truth_voxels": int(truth.sum()), "mask_voxels": int(mask.sum()),
        "false_positive": int(false_positive.sum()), "false_positive_outer_rim": int((false_positive & outer).sum()),
        "false_negative": int(false_negative.sum()), "false_negative_inner_rim": int((false_negative & inner).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", nargs="+", required=True, help="checkpoint directories")
    parser.add_argument("--data", required=True, help="a folder of cases (HECKTOR layout)")
    parser.add_argument("--cases", type=int, nargs="*", help="case indices in the folder's order (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = find_cases(args.data)
    chosen = args.cases if args.cases else range(len(cases))
    for weights in args.weights:
        checkpoint = load_checkpoint(weights)
        segmenter = segmenter_for(checkpoint, torch.device("cpu"))
        for index in chosen:
            case = load_prepared(cases[index], checkpoint.grid_shape, checkpoint.spacing_mm)
            mask = segmenter.initial_probability(case.images) > 0.5
            row = {"weights": weights, "digest": checkpoint.digest[:12], "case": case.id}
            print(json.dumps(row | rim_errors(mask, case.truth.astype(bool))))


if __name__ == "__main__":
    main()
