"""``icr whole-scan-eval``: whole-scan sessions as a user meets them, over HTTP.

For every case (HECKTOR layout) two sessions are made through the public API: one with no
centre (the service finds the tumour) and one centred on the GTVt's centre of mass (the
paper's protocol). Each is then corrected by the simulated user of
:mod:`service.science.simulator` for up to ``--clicks`` clicks, sent as ``world_mm``
anywhere in the scan. Everything is measured on the uploaded CT's grid, from
``GET /mask?space=original`` (every window the session computed), so tumour outside the
working window counts as missed:

- *hit*: the GTVt's centre of mass lies in the first working window of the found session;
- Dice after 0..N clicks for both sessions, and their ratio at 0 clicks;
- *honoured*: the share of clicks whose CT voxel has the click's label in every mask that
  follows;
- each click's round trip, split by whether it moved the working window, and how many
  windows the session holds at the end.

With ``--url`` the evaluation talks to a running service; without, it starts the
embedded service in this process on ``--weights``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np

from service.argtypes import positive_int
from service.imaging.nifti import load_nifti_file
from service.science.dataset import Case, find_cases
from service.science.localisation_eval import gtvt_centre_of_mass
from service.science.simulator import next_click
from service.settings import DEMO_WEIGHTS

KINDS = ("found", "truth_centred")


@dataclass
class SessionTrace:
    """One session's course: Dice per click count, click round trips, whether each moved the window."""

    dice: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    moved: list[bool] = field(default_factory=list)
    honoured: list[bool] = field(default_factory=list)  # per click, in every mask after it
    create_seconds: float = 0.0
    windows: int = 1


@dataclass
class CaseResult:
    case: str
    hit: bool
    placement_mm: list[float]
    truth_mm: list[float]
    gtvt_ml: float
    sessions: dict[str, SessionTrace]


def _ct_truth(case: Case) -> tuple[np.ndarray, np.ndarray, float]:
    """(GTVt mask on the CT grid, CT affine, CT voxel volume in ml)."""
    ct = load_nifti_file(case.ct, role="ct")
    label = load_nifti_file(case.gtvt, role="gtvt")
    truth = np.asarray(label.array == case.gtvt_label if case.gtvt_label is not None else label.array > 0)
    if truth.shape != ct.shape or not np.allclose(label.affine, ct.affine, atol=1e-3):
        raise ValueError(f"{case.id}: the GTVt is not on the CT's grid")
    return truth, ct.affine, float(abs(np.linalg.det(ct.affine[:3, :3]))) / 1000.0


def _original_mask(client: httpx.Client, session_id: str) -> np.ndarray:
    response = client.get(f"/v1/sessions/{session_id}/mask", params={"space": "original"})
    response.raise_for_status()
    image = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    return np.asarray(image.dataobj) > 0


def _dice(mask: np.ndarray, truth: np.ndarray) -> float:
    total = int(mask.sum()) + int(truth.sum())
    return 1.0 if total == 0 else round(2.0 * int(np.count_nonzero(mask & truth)) / total, 4)


def _inside(window: dict[str, Any], point_mm: np.ndarray) -> bool:
    low = np.asarray(window["origin_mm"]) - window["spacing_mm"] / 2
    high = low + window["spacing_mm"] * np.asarray(window["shape"])
    return bool(np.all(point_mm >= low) and np.all(point_mm <= high))


def run_session(client: httpx.Client, files: dict[str, tuple[str, bytes]], centre: np.ndarray | None,
                truth: np.ndarray, affine: np.ndarray, clicks: int, seed: int) -> tuple[SessionTrace, dict[str, Any]]:
    trace = SessionTrace()
    data = {} if centre is None else {"centre": ",".join(f"{v:.3f}" for v in centre)}
    started = time.perf_counter()
    created = client.post("/v1/sessions", files=files, data=data)
    trace.create_seconds = round(time.perf_counter() - started, 3)
    if created.status_code != 201:
        raise RuntimeError(f"POST /v1/sessions: {created.status_code} {created.text[:300]}")
    body = created.json()
    session_id, window = body["id"], body["window"]
    mask = _original_mask(client, session_id)
    trace.dice.append(_dice(mask, truth))
    rng = np.random.default_rng(seed)
    made: list[tuple[str, tuple[int, int, int]]] = []
    for _ in range(clicks):
        click = next_click(mask, truth, rng)
        if click is None:
            break
        world = affine[:3, :3] @ np.asarray(click.voxel, dtype=np.float64) + affine[:3, 3]
        started = time.perf_counter()
        answer = client.post(f"/v1/sessions/{session_id}/clicks",
                             json={"clicks": [{"label": click.label, "world_mm": [float(v) for v in world]}]})
        trace.seconds.append(round(time.perf_counter() - started, 3))
        if answer.status_code != 200:
            raise RuntimeError(f"POST clicks: {answer.status_code} {answer.text[:300]}")
        result = answer.json()
        trace.moved.append(result["window"]["offset"] != window["offset"])
        window = result["window"]
        made.append((click.label, click.voxel))
        mask = _original_mask(client, session_id)
        trace.dice.append(_dice(mask, truth))
        trace.honoured = [ok and bool(mask[voxel]) == (label == "foreground")
                          for ok, (label, voxel) in zip([*trace.honoured, True], made)]
    trace.windows = int(window["windows"])
    client.delete(f"/v1/sessions/{session_id}")
    return trace, body


def evaluate_case(client: httpx.Client, case: Case, clicks: int, seed: int) -> CaseResult:
    truth, affine, voxel_ml = _ct_truth(case)
    files = {"ct": ("ct.nii.gz", Path(case.ct).read_bytes()), "pet": ("pt.nii.gz", Path(case.pet).read_bytes())}
    centre = gtvt_centre_of_mass(case)
    found, body = run_session(client, files, None, truth, affine, clicks, seed)
    centred, _ = run_session(client, files, centre, truth, affine, clicks, seed)
    return CaseResult(
        case=case.id, hit=_inside(body["grid"], centre), placement_mm=list(body["placement"]["centre_mm"]),
        truth_mm=[round(float(v), 1) for v in centre], gtvt_ml=round(float(truth.sum()) * voxel_ml, 2),
        sessions={"found": found, "truth_centred": centred},
    )


def _mean_curve(traces: list[SessionTrace], clicks: int) -> list[float]:
    """Mean Dice after 0..clicks clicks; a session that stopped early (no error left) keeps its last Dice."""
    padded = [t.dice + [t.dice[-1]] * (clicks + 1 - len(t.dice)) for t in traces]
    return [round(float(v), 4) for v in np.asarray(padded, dtype=np.float64).mean(axis=0)]


def _seconds(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None}
    return {"n": len(values), "p50": round(float(np.percentile(values, 50)), 3),
            "p95": round(float(np.percentile(values, 95)), 3)}


def summarise(results: list[CaseResult], clicks: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"cases": len(results), "hits": sum(r.hit for r in results),
                               "hit_rate": round(sum(r.hit for r in results) / len(results), 3)}
    for kind in KINDS:
        traces = [r.sessions[kind] for r in results]
        curve = _mean_curve(traces, clicks)
        honoured = [ok for t in traces for ok in t.honoured]
        moved = [s for t in traces for s, m in zip(t.seconds, t.moved) if m]
        stayed = [s for t in traces for s, m in zip(t.seconds, t.moved) if not m]
        summary[kind] = {
            "dice_mean": curve,
            "largest_drop": round(max([0.0, *(a - b for a, b in zip(curve, curve[1:]))]), 4),
            "honoured": round(sum(honoured) / len(honoured), 4) if honoured else None,
            "create_seconds": _seconds([t.create_seconds for t in traces]),
            "click_seconds_window_moved": _seconds(moved),
            "click_seconds_window_kept": _seconds(stayed),
            "windows_at_end_mean": round(float(np.mean([t.windows for t in traces])), 2),
        }
    found, centred = summary["found"]["dice_mean"], summary["truth_centred"]["dice_mean"]
    summary["dice0_ratio_found_to_centred"] = round(found[0] / centred[0], 3) if centred[0] > 0 else None
    return summary


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[httpx.Client]:
    if args.url is not None:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with httpx.Client(base_url=args.url, headers=headers, timeout=600) as client:
            yield client
        return
    import torch
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    torch.set_num_threads(args.threads)
    for name in ("service", "icr", "httpx"):  # one line per request would bury the per-case lines
        logging.getLogger(name).setLevel(logging.WARNING)
    settings = Settings(weights=args.weights, device="cpu", max_upload_mb=1024, max_image_mb=4096, job_timeout_s=600)
    with TestClient(create_app(settings)) as client:
        yield client


def _run(args: argparse.Namespace) -> int:
    cases = find_cases(args.data)
    if not cases:
        print(f"no cases in {args.data}")
        return 2
    results = []
    with _client(args) as client:
        for n, case in enumerate(cases):
            result = evaluate_case(client, case, args.clicks, args.seed + n)
            results.append(result)
            found, centred = result.sessions["found"], result.sessions["truth_centred"]
            print(f"{'hit ' if result.hit else 'MISS'} {case.id} ({result.gtvt_ml} ml): dice found "
                  f"{found.dice[0]} -> {found.dice[-1]}, centred {centred.dice[0]} -> {centred.dice[-1]}; "
                  f"windows {found.windows}/{centred.windows}", flush=True)
    summary = summarise(results, args.clicks)
    print(json.dumps(summary, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"summary": summary, "options": {"clicks": args.clicks, "seed": args.seed, "url": args.url,
                                                   "weights": None if args.url else str(args.weights)},
                   "cases": [asdict(r) for r in results]}
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``whole-scan-eval`` to the ``icr`` subcommands."""
    parser = commands.add_parser(
        "whole-scan-eval", help="whole-scan sessions over HTTP: found vs centred window, clicks anywhere",
        description=(__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("--data", type=Path, required=True, help="case folder (HECKTOR layout; GTVt on the CT grid)")
    parser.add_argument("--url", default=None, help="a running service; default: the embedded one, in this process")
    parser.add_argument("--api-key", default=None, help="bearer key for --url")
    parser.add_argument("--weights", type=Path, default=DEMO_WEIGHTS, help="checkpoint for the in-process service (demo)")
    parser.add_argument("--clicks", type=int, default=10, help="simulated clicks per session (10)")
    parser.add_argument("--seed", type=int, default=0, help="click seed; case n uses seed + n (0)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads for the in-process service")
    parser.add_argument("--out", type=Path, default=None, help="write per-case results and the summary as JSON")
    parser.set_defaults(run=_run)
    return parser

