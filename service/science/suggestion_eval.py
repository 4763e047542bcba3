"""``icr evaluate-suggestions``: does accepting the service's suggested click help?

On held-out cases, the 2S-ICR engine (the service's own passes: mean probability and
member votes) meets three simulated users, each for up to ``max_clicks`` clicks:

- ``error``: the evaluation protocol's simulator (:func:`service.science.simulator.next_click`,
  the DeepGrow rule), which sees the truth and clicks into the larger error region;
- ``suggestion``: accepts the service's ``suggested_click`` blindly, voxel and label
  (:mod:`service.engine.uncertainty`); it never sees the truth;
- ``suggestion-located``: clicks the suggested voxel but gives it the truth's label there,
  a user who looks where the service points and says what is there.

A user with nothing to click (perfect mask, or members that agree everywhere) stops and
its curve stays flat. Reported per user: mean DSC after 0, 1, 5 and 10 clicks, NoC to DSC
0.75 / 0.85 (a failure counts as ``max_clicks``) and the failure share, with the same
conventions as :func:`service.science.metrics.noc_summary`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from service.argtypes import positive_int
from service.engine.checkpoints import load_checkpoint
from service.engine.ensemble import Engine, Pass, resolve_device
from service.engine.guarantee import honour_radius_voxels
from service.engine.uncertainty import suggested_click, votes_after_clicks
from service.science.dataset import PreparedCase, find_cases, load_prepared
from service.science.metrics import dice, noc_summary
from service.science.simulator import ClickRule, next_click
from service.store.contract import Click

log = logging.getLogger(__name__)

DSC_THRESHOLDS = (0.75, 0.85)
REPORTED_CLICKS = (0, 1, 5, 10)
# a user: (current pass, clicks so far, case, rng) -> the next click, or None to stop
User = Callable[[Pass, Sequence[Click], PreparedCase, np.random.Generator], Click | None]


def _suggestion(result: Pass, clicks: Sequence[Click], case: PreparedCase) -> Click | None:
    votes = votes_after_clicks(result.votes, result.members, clicks, honour_radius_voxels(case.grid.spacing_mm))
    return suggested_click(votes, result.members, result.probability)


def error_user(result: Pass, clicks: Sequence[Click], case: PreparedCase, rng: np.random.Generator) -> Click | None:
    simulated = next_click(result.probability > 0.5, case.truth, rng, ClickRule.DEEPGROW)
    return None if simulated is None else Click(simulated.label, simulated.voxel)


def suggestion_user(result: Pass, clicks: Sequence[Click], case: PreparedCase, rng: np.random.Generator) -> Click | None:
    return _suggestion(result, clicks, case)


def located_user(result: Pass, clicks: Sequence[Click], case: PreparedCase, rng: np.random.Generator) -> Click | None:
    suggestion = _suggestion(result, clicks, case)
    if suggestion is None:
        return None
    return Click("foreground" if case.truth[suggestion.voxel] else "background", suggestion.voxel)


USERS: dict[str, User] = {"error": error_user, "suggestion": suggestion_user, "suggestion-located": located_user}


def dsc_curve(engine: Engine, case: PreparedCase, initial: Pass, user: User, max_clicks: int, seed: int) -> list[float]:
    """DSC after 0..max_clicks clicks of ``user`` (flat after it stops)."""
    rng = np.random.default_rng(seed)
    result = initial
    clicks: list[Click] = []
    curve = [dice(result.probability > 0.5, case.truth)]
    for _ in range(max_clicks):
        click = user(result, clicks, case, rng)
        if click is None:
            break
        clicks.append(click)
        result = engine.refine_pass(case.images, result.probability, tuple(clicks), new_clicks=1)
        curve.append(dice(result.probability > 0.5, case.truth))
    return curve + [curve[-1]] * (max_clicks + 1 - len(curve))


def summarise_curves(curves: Sequence[Sequence[float]], max_clicks: int) -> dict:
    stacked = np.asarray(curves, dtype=np.float64)
    noc = noc_summary(curves, DSC_THRESHOLDS, higher_is_better=True, max_clicks=max_clicks)
    return {
        "dsc_at": {str(k): float(stacked[:, k].mean()) for k in REPORTED_CLICKS if k <= max_clicks},
        "noc": {str(t): {"mean": v["noc_mean"], "failures": int(v["failures"])} for t, v in noc.items()},
        "cases": len(curves),
    }


def evaluate_suggestions(
    weights: Path, data_dir: Path, *, max_clicks: int = 10, seed: int = 0, device: str = "cpu",
    autocast: str | None = None,
) -> dict:
    checkpoint = load_checkpoint(weights)
    engine = Engine(checkpoint, resolve_device(device), autocast=autocast)
    curves: dict[str, list[list[float]]] = {name: [] for name in USERS}
    cases = find_cases(data_dir)
    for index, found in enumerate(cases):
        case = load_prepared(found, checkpoint.grid_shape, checkpoint.spacing_mm)
        initial = engine.initial_pass(case.images)
        for name, user in USERS.items():
            curves[name].append(dsc_curve(engine, case, initial, user, max_clicks, seed + index))
        log.info("case %s: %s", case.id, {n: round(c[-1][-1], 3) for n, c in curves.items()})
    return {
        "weights": str(weights),
        "digest": checkpoint.digest,
        "data": str(data_dir),
        "case_ids": [c.id for c in cases],
        "max_clicks": max_clicks,
        "precision": engine.precision,
        "users": {name: summarise_curves(c, max_clicks) for name, c in curves.items()},
        "curves": curves,
    }


def markdown(report: dict) -> str:
    provenance = (
        f"Cases: {len(report['case_ids'])} from `{report['data']}`; weights `{report['weights']}` "
        f"(digest {report['digest'][:12]}), {report['precision']}, up to {report['max_clicks']} clicks."
    )
    lines = [
        provenance,
        "",
        "| user | DSC@0 | DSC@1 | DSC@5 | DSC@10 | NoC@0.75 (fail) | NoC@0.85 (fail) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, user in report["users"].items():
        dsc = [f"{user['dsc_at'].get(str(k), float('nan')):.3f}" for k in REPORTED_CLICKS]
        noc = [f"{user['noc'][str(t)]['mean']:.2f} ({user['noc'][str(t)]['failures']})" for t in DSC_THRESHOLDS]
        lines.append(f"| {name} | " + " | ".join(dsc + noc) + " |")
    return "\n".join(lines) + "\n"


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    report = evaluate_suggestions(
        Path(args.weights), Path(args.data), max_clicks=args.max_clicks, seed=args.seed, device=args.device,
        autocast=args.autocast,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suggestions.json").write_text(json.dumps(report, indent=1))
    (out / "suggestions.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "evaluate-suggestions",
        help="simulated users who accept the service's suggested click, against the error-based simulator",
    )
    parser.add_argument("--weights", default=str(Path(__file__).resolve().parents[1] / "weights" / "demo"),
                        help="a 2S-ICR checkpoint directory (default: the shipped demo)")
    parser.add_argument("--data", required=True, help="held-out cases (HECKTOR layout, with GTVt)")
    parser.add_argument("--out", required=True, help="folder for suggestions.json and suggestions.md")
    parser.add_argument("--max-clicks", type=positive_int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the error simulator's random stream")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", default=None, help="as icr evaluate's --autocast (default: exact float32)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.set_defaults(run=_run)
    return parser
