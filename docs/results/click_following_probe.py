"""Does a 2S-ICR checkpoint, alone (no click guarantee), follow clicks? A probe for training changes.

The evaluation protocol of ``icr evaluate`` (DeepGrow click rule on the system's own
mask, ``repetition_rng(seed, r, case_index)``, stop when the mask is perfect), on the
model alone, measuring after each click k:

- DSC at 0..max_clicks;
- clicks honoured: the share of the clicks so far (foreground and background apart)
  whose voxel has the click's label in the mask after click k;
- the new click honoured: whether click k itself has its label in the mask after it;
- for every click after every step, honoured or not: how many refinement members voted
  foreground at its voxel, and how far the voxel lies from the truth's other label (the
  tumour's edge), so that missed clicks can be told apart: members that disagree (the
  ensemble's mean loses the click) or agree, and clicks at the edge or deep in an error;
  and per session, each click's label, edge distance and whether the last mask honours it.

Usage (one thread): ``OMP_NUM_THREADS=1 python docs/results/click_following_probe.py
--weights W --data D --cache C --out result.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from service.engine.checkpoints import load_checkpoint
from service.engine.ensemble import Engine
from service.science.dataset import find_cases, load_prepared
from service.science.evaluation import repetition_rng
from service.science.metrics import clicks_honoured, dice
from service.science.simulator import next_click
from service.store.contract import Click


def probe(weights: Path, data: Path, cache: Path | None, clicks: int, repetitions: int, seed: int,
          autocast: str) -> dict:
    checkpoint = load_checkpoint(weights, method=None)
    engine = Engine(checkpoint, torch.device("cpu"), autocast=autocast)
    cases = [load_prepared(c, checkpoint.grid_shape, checkpoint.spacing_mm, cache) for c in find_cases(data)]
    dsc = np.zeros((len(cases), repetitions, clicks + 1))
    honoured = {s: np.zeros((clicks + 1, 2)) for s in ("foreground", "background")}  # [k] = (honoured, made)
    newest = {s: np.zeros(2) for s in ("foreground", "background")}
    members = len(checkpoint.stages["refinement"])
    # [label][honoured?][members voting for the click's label, 0..members] and edge distances (mm)
    votes = {s: np.zeros((2, members + 1), dtype=int) for s in ("foreground", "background")}
    edge_mm: dict[str, list[list[float]]] = {s: [[], []] for s in ("foreground", "background")}
    sessions = []  # per case and repetition: each click's label, edge distance and whether the last mask honours it
    for index, case in enumerate(cases):
        initial = engine.initial_probability(case.images)
        to_edge = {"background": ndimage.distance_transform_edt(~case.truth, sampling=checkpoint.spacing_mm),
                   "foreground": ndimage.distance_transform_edt(case.truth, sampling=checkpoint.spacing_mm)}
        for repetition in range(repetitions):
            rng = repetition_rng(seed, repetition, index)
            probability, made = initial, []
            mask = probability > 0.5
            dsc[index, repetition, :] = dice(mask, case.truth)
            for k in range(1, clicks + 1):
                simulated = next_click(mask, case.truth, rng)
                if simulated is None:
                    break
                made.append(Click(label=simulated.label, voxel=simulated.voxel))
                refined = engine.refine_pass(case.images, probability, tuple(made), new_clicks=1)
                probability = refined.probability
                mask = probability > 0.5
                dsc[index, repetition, k:] = dice(mask, case.truth)
                for click, kept in zip(made, clicks_honoured(mask, made)):
                    honoured[click.label][k] += (kept, 1)
                    foreground_votes = int(refined.votes[tuple(click.voxel)])
                    agreeing = foreground_votes if click.label == "foreground" else members - foreground_votes
                    votes[click.label][int(kept), agreeing] += 1
                    edge_mm[click.label][int(kept)].append(float(to_edge[click.label][tuple(click.voxel)]))
                newest[made[-1].label] += (clicks_honoured(mask, made[-1:])[0], 1)
            sessions.append({
                "case": case.id, "repetition": repetition, "labels": "".join(c.label[0] for c in made),
                "edge_mm": [round(float(to_edge[c.label][tuple(c.voxel)]), 1) for c in made],
                "honoured_at_end": "".join("+" if kept else "-" for kept in clicks_honoured(mask, made)),
            })
    mean = dsc.mean(axis=(0, 1))
    rate = {s: [round(float(h / n), 3) if n else None for h, n in table] for s, table in honoured.items()}
    return {
        "weights": str(weights), "digest": checkpoint.digest, "cases": len(cases), "repetitions": repetitions,
        "seed": seed, "autocast": autocast,
        "dsc": [round(float(v), 4) for v in mean], "dsc_0_10_mean": round(float(mean.mean()), 4),
        "honoured_so_far": rate,
        "newest_honoured": {s: round(float(h / n), 3) if n else None for s, (h, n) in newest.items()},
        # over all clicks after all steps: members voting for the click's label, 0..members
        "members_agreeing": {s: {"missed": table[0].tolist(), "honoured": table[1].tolist()} for s, table in votes.items()},
        "edge_distance_mm": {s: {kind: _quartiles(values) for kind, values in zip(("missed", "honoured"), pair)}
                             for s, pair in edge_mm.items()},
        "sessions": sessions,
    }


def _quartiles(values: list[float]) -> dict[str, float | int]:
    """Count, quartiles and share within one voxel diagonal (<= 2.9 mm at 2 mm) of a list of distances."""
    if not values:
        return {"clicks": 0}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"clicks": len(values), "q1": round(float(q1), 2), "median": round(float(median), 2),
            "q3": round(float(q3), 2), "within_2.9_mm": round(float(np.mean(np.asarray(values) <= 2.9)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--autocast", default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = probe(args.weights, args.data, args.cache, args.clicks, args.repetitions, args.seed, args.autocast)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
