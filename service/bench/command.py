"""``icr bench``: the optimised paths against a naive baseline, measured in the same run.

Engine only, on a preprocessed phantom case on the checkpoint's grid:

- ``baseline``: plain MONAI eager float32 forwards of the members one after another
  over the whole volume, MONAI click maps, no device tuning;
- ``engine``: the exact engine (full volume, float32);
- ``engine-autocast``: reduced precision (``--autocast``; by default float16 on CUDA,
  bfloat16 on a CPU with bfloat16 instructions);
- ``engine-window``: windowed refinement (``--window``/``--margin``), float32;
- ``engine-window-autocast``: both fast paths together.

Each path times the initial pass and one refinement pass (the first click), and
replays the baseline's sequence of simulated clicks from its own previous outputs:
the mask Dice against the baseline after every click shows how far a path moves
the result. Then the store codec, peak memory, and the click round trip over real
HTTP: ``icr serve`` alone (embedded), and ``icr serve`` + ``icr worker`` on a
redis-server started here. The served processes take every other ``ICR_*`` setting
from the environment, so ``ICR_REFINE_WINDOW=64 icr bench ...`` measures the service
with the window on, ``ICR_AUTOCAST=off icr bench ...`` the exact service. See
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import torch

from service.argtypes import positive_int
from service.bench.http import HttpCase, bench_embedded, bench_redis, http_case
from service.bench.paths import (
    bench_click_maps,
    bench_codec,
    bench_engine,
    engine_paths,
)
from service.bench.report import format_table
from service.bench.setup import choose_weights, int_list, machine
from service.bench.stats import BenchError, peak_rss_mib
from service.engine.checkpoints import (
    CheckpointError,
    load_checkpoint,
)
from service.engine.ensemble import resolve_device
from service.engine.fastpath import (
    AUTOCAST_DTYPES,
    DEFAULT_REFINE_MARGIN,
)
from service.science.dataset import find_cases, prepare_case
from service.science.phantoms import write_cases
from service.settings import DEMO_WEIGHTS, Settings

log = logging.getLogger(__name__)


REPORT_FORMAT = "icr-bench/1"







def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when every part ran, 1 when a part failed (the others are still reported)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the table
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except RuntimeError as error:
        print(f"icr bench: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="icr-bench-") as scratch_name:
        scratch = Path(scratch_name)
        try:
            report = measure(args, device, scratch)
        except BenchError as error:
            print(f"icr bench: {error}", file=sys.stderr)
            return 2
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}")
    failed = any("error" in entry for entry in report.get("http", {}).values())
    return 1 if failed else 0


def measure(args: argparse.Namespace, device: torch.device, scratch: Path) -> dict[str, Any]:
    weights, weights_label = choose_weights(args, scratch)
    try:
        checkpoint = load_checkpoint(weights)
    except CheckpointError as error:
        raise BenchError(str(error)) from error
    write_cases(scratch / "cases", 1, args.seed)
    (case,) = find_cases(scratch / "cases")
    prepared = prepare_case(case, checkpoint.grid_shape, checkpoint.spacing_mm)

    paths = engine_paths(args, checkpoint, device)
    engine_report, clicks, versions = bench_engine(paths, prepared, device, args.repeats, args.clicks, args.seed)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not callable(v)},
        "machine": machine(device),
        "config": {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "dtype": {path.name: getattr(path.segmenter, "precision", "float32") for path in paths},
            "weights": weights_label,
            "architecture": checkpoint.architecture.to_dict(),
            "members": {stage: len(nets) for stage, nets in checkpoint.stages.items()},
            "grid": list(checkpoint.grid_shape),
            "spacing_mm": checkpoint.spacing_mm,
            "click_sigma_voxels": checkpoint.click_sigma_voxels,
            "click_overlap": checkpoint.click_overlap,
            "click_reach_sigma_voxels": dict(checkpoint.click_reach_sigma_voxels),
            "repeats": args.repeats,
            "clicks": args.clicks,
            "clicks_made": len(clicks),
            "window": {"size": args.window, "margin": args.margin} if args.window else None,
            "service_refine_window": os.environ.get("ICR_REFINE_WINDOW"),
            "service_autocast": os.environ.get("ICR_AUTOCAST", Settings.model_fields["autocast"].default),
            "phantom": {"case": prepared.id, "seed": args.seed, "gtvt_voxels": int(prepared.truth.sum())},
        },
        "engine": engine_report,
        "click_maps": bench_click_maps(clicks, checkpoint.grid_shape, checkpoint.click_encoding, args.repeats),
        "codec": bench_codec(prepared.images, versions, args.repeats),
        "memory": {"bench_peak_rss_mib": peak_rss_mib()},
    }
    del paths
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU to the served processes
    if not args.skip_http:
        report["http"] = bench_http(weights, http_case(case, prepared), args, scratch)
    return report


def bench_http(weights: Path, data: HttpCase, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    modes: list[tuple[str, Callable[..., dict[str, Any]]]] = [("embedded", bench_embedded)]
    if args.skip_redis:
        results["redis"] = {"skipped": "--skip-redis"}
    else:
        modes.append(("redis", bench_redis))
    for mode, bench in modes:
        log.info("http: %s", mode)
        work = scratch / mode
        work.mkdir()
        try:
            results[mode] = bench(weights, data, args, work)
        except (BenchError, httpx.HTTPError) as error:
            log.error("http %s failed: %s", mode, error)
            results[mode] = {"error": f"{type(error).__name__}: {error}"}
    return results


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``bench`` to the ``icr`` command."""
    bench = commands.add_parser(
        "bench",
        help="time the optimised paths against a naive baseline (engine, codec, HTTP in both modes)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, default=None,
                        help=f"checkpoint directory (default: the demo weights at {DEMO_WEIGHTS}, if present)")
    source.add_argument("--random", action="store_true",
                        help="randomly initialised networks (architecture, grid and members from the options below)")
    bench.add_argument("--grid", type=positive_int, default=144, help="--random: grid edge in voxels (144)")
    bench.add_argument("--members", type=positive_int, default=5, help="--random: members per stage (5)")
    bench.add_argument("--channels", type=int_list, default=(16, 32, 64, 128, 256),
                       help="--random: UNet channels (16,32,64,128,256)")
    bench.add_argument("--strides", type=int_list, default=(1, 2, 2, 2), help="--random: UNet strides (1,2,2,2)")
    bench.add_argument("--res-units", type=int, default=2, help="--random: residual units per block (2)")
    bench.add_argument("--repeats", type=positive_int, default=5,
                       help="timed runs per engine measurement, and HTTP sessions per mode (5)")
    bench.add_argument("--clicks", type=int, default=10, help="simulated clicks per session (10)")
    bench.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    bench.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    bench.add_argument("--window", type=int, default=64,
                       help="refinement window edge of the engine-window path; 0 leaves that path out (64)")
    bench.add_argument("--margin", type=int, default=DEFAULT_REFINE_MARGIN,
                       help=f"voxels per window side whose outputs are discarded ({DEFAULT_REFINE_MARGIN})")
    bench.add_argument("--autocast", choices=["off", *AUTOCAST_DTYPES], default=None,
                       help="dtype of the reduced-precision paths; off leaves them out (default: float16 on CUDA, "
                       "bfloat16 on a CPU with bfloat16 instructions, none on other CPUs)")
    bench.add_argument("--seed", type=int, default=0, help="phantom, click and --random weight seed (0)")
    bench.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    bench.add_argument("--skip-http", action="store_true", help="engine, codec and memory only")
    bench.add_argument("--skip-redis", action="store_true", help="HTTP in the embedded mode only")
    bench.set_defaults(run=run)
    return bench
