"""Would a foreground click that the networks leave out do better adding its region of PET uptake?

A probe for a click rule the service does not have: behind the service's click rules
(:class:`service.science.methods.Guaranteed`), when a new foreground click lands where the
networks' probability (before the click guarantee) is below 0.5, the ``pet-threshold``
baseline's region at the click (the connected SUV >= 40 % of the SUVmax within 15 mm, at most
40 mm from the click, cavities filled; :meth:`service.science.pet_threshold.PetThreshold.region`)
is added to the probability before it is thresholded and kept as the next memory. The same
simulated user, click rule, seeds and repetitions as ``icr evaluate`` (so the sessions match
``icr evaluate --guarantee on`` case for case until the first such click).

``--protect``: the regions so added stay in the mask through later passes, except where a
background click cuts them locally (the voxels within 10 mm of it that are nearer to it than to
every foreground click, as the ``pet-threshold`` baseline cuts a clicked component).
``--every-click``: every foreground click adds its region, wherever the networks put it (with
``--protect`` the added regions are then a function of the clicks alone, no session history).

    python docs/results/pet_assisted_click_probe.py --weights service/weights/demo --data DIR \
        --repetitions 2 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from service.engine.checkpoints import load_checkpoint
from service.engine.guarantee import honour_clicks, honour_radius_voxels
from service.science.dataset import PreparedCase, load_prepared
from service.science.evaluation import cases_to_evaluate, interaction_curve, repetition_rng
from service.science.methods import Guaranteed, behind_rules, segmenter_for
from service.science.pet_threshold import SUV_CHANNEL, PetThreshold, with_suv
from service.store.contract import Click


class PetAssisted(Guaranteed):
    """Behind the click rules, and a new foreground click the networks leave out adds its PET region."""

    suv: np.ndarray  # the case's SUV on the working grid, set per case
    protect = False
    every_click = False
    added: np.ndarray  # --protect: the regions added so far in this session

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray:
        if len(clicks) == 1:  # a new session
            self.added = np.zeros(previous.shape, dtype=bool)
        raw = self.segmenter.refine(images, previous, clicks, new_clicks=new_clicks)
        baseline = PetThreshold(self.spacing_mm)
        newest = clicks[-1]
        if newest.label == "foreground" and (self.every_click or raw[newest.voxel] < 0.5):
            region, _ = baseline.region(self.suv, newest.voxel)
            raw = np.maximum(raw, region.astype(np.float32))
            self.added |= region
        kept = behind_rules(raw, previous, clicks, new_clicks, self.radius_voxels, self.spacing_mm)
        if not self.protect or not self.added.any():
            return kept
        protected = self.added.copy()
        foreground = [click.voxel for click in clicks if click.label == "foreground"]
        for click in clicks:  # the baseline's local cut of a clicked component, at each background click
            if click.label == "background":
                baseline._cut(protected, click, self.added, foreground, protected=True)
        return honour_clicks(np.maximum(kept, protected.astype(np.float32)), clicks, self.radius_voxels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--max-clicks", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--protect", action="store_true", help="keep the added regions through later passes")
    parser.add_argument("--every-click", action="store_true", help="every foreground click adds its region")
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = load_checkpoint(args.weights, method=None)
    spacing = checkpoint.spacing_mm
    segmenter = PetAssisted(segmenter_for(checkpoint, torch.device("cpu"), refine_window=None, refine_margin=16,
                                          autocast="off"), honour_radius_voxels(spacing), spacing)
    segmenter.protect, segmenter.every_click = args.protect, args.every_click
    cases = []
    for case_index, case in enumerate(cases_to_evaluate(args.data)):
        prepared: PreparedCase = load_prepared(case, checkpoint.grid_shape, spacing)
        segmenter.suv = with_suv(case, prepared).images[SUV_CHANNEL]
        initial = segmenter.initial_probability(prepared.images)
        curves = [interaction_curve(segmenter, prepared, repetition_rng(0, r, case_index), args.max_clicks,
                                    initial=initial) for r in range(args.repetitions)]
        dsc = np.mean([curve.dsc for curve in curves], axis=0)
        cases.append({"case_id": case.id, "dsc": dsc.tolist()})
        print(case.id, " ".join(f"{value:.3f}" for value in dsc), flush=True)
    mean = np.mean([case["dsc"] for case in cases], axis=0)
    args.out.write_text(json.dumps({"weights": checkpoint.digest, "data": str(args.data),
                                    "repetitions": args.repetitions, "protect": args.protect,
                                    "every_click": args.every_click,
                                    "mean_dsc": mean.tolist(), "cases": cases}, indent=1) + "\n")
    print("mean", " ".join(f"{value:.3f}" for value in mean))


if __name__ == "__main__":
    main()
