"""``icr weights``: import member checkpoints trained elsewhere, check them, export them as a MONAI Bundle.

Every refusal is one line on stderr naming the file and the problem, with exit code 2
and nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.argtypes import click_reach, int_between, positive_float
from service.engine.checkpoints import MAX_ZERO_CLICK_PASSES, CheckpointError
from service.engine.clicks import CLICK_OVERLAPS, DEFAULT_SIGMA_VOXELS
from service.engine.networks import PAPER_ARCHITECTURE, Architecture
from service.engine.weights_import import PAPER_GRID, ImportPlan, import_weights

REFUSED = 2


def _integers(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _grid(text: str) -> tuple[int, int, int]:
    values = _integers(text)
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three sizes 'D,H,W', got {text!r}")
    return values[0], values[1], values[2]


def _refuse(error: Exception) -> int:
    print(f"icr weights: refused: {error}", file=sys.stderr)
    return REFUSED


def _import(args: argparse.Namespace) -> int:
    architecture = Architecture(channels=args.channels, strides=args.strides, num_res_units=args.res_units)
    if len(architecture.strides) != len(architecture.channels) - 1:
        return _refuse(ValueError(f"--strides needs {len(architecture.channels) - 1} values for "
                                  f"{len(architecture.channels)} --channels, got {len(architecture.strides)}"))
    plan = ImportPlan(
        source=args.source, initial=args.initial, refinement=args.refinement, architecture=architecture,
        grid_shape=args.grid, spacing_mm=args.spacing, click_sigma_voxels=args.click_sigma,
        click_overlap=args.click_overlap, click_reach_sigma_voxels=dict(args.click_reach or ()),
        zero_click_passes=args.zero_click_passes, description=args.description,
    )
    try:
        manifest = import_weights(plan, args.out)
    except CheckpointError as error:
        return _refuse(error)
    stages = "initial only (clicks answered 409)" if args.refinement is None else "initial + refinement"
    print(f"imported {stages} into {args.out}; manifest {manifest}")
    print(f"next: icr weights check {args.out}, then ICR_WEIGHTS={args.out} icr serve")
    return 0


def _check(args: argparse.Namespace) -> int:
    from service.engine.weights_check import check_weights
    from service.settings import Settings

    overrides = {"torch_threads": args.threads} if args.threads is not None else {}
    settings = Settings(weights=args.directory, device=args.device, autocast=args.autocast, **overrides)
    try:
        report = check_weights(settings, phantom_seed=args.seed)
    except (CheckpointError, RuntimeError) as error:
        return _refuse(error)
    print("\n".join(report.lines()))
    return 0


def _export(args: argparse.Namespace) -> int:
    from service.engine.bundle import BundleError, export_bundle

    try:
        out = export_bundle(args.directory, args.bundle, version=args.version, authors=args.authors)
    except (CheckpointError, BundleError) as error:
        return _refuse(error)
    print(f"MONAI Bundle written to {out}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "weights", help="bring your own weights: import, check and export 2S-ICR ensembles",
        description="Import member checkpoints trained elsewhere (MONAI, PyTorch Lightning), check that the "
                    "service serves them, export them as a MONAI Bundle. See docs/weights.md.",
    )
    verbs = parser.add_subparsers(dest="weights_command", required=True)

    paper = PAPER_ARCHITECTURE
    imp = verbs.add_parser(
        "import", help="make a checkpoint directory from member .pt/.pth files",
        description="Each member is a state_dict of MONAI's UNet (bare, or under state_dict/model/net/network; "
                    "'module.'/'model.' prefixes removed), checked against the stage's network. Nothing is "
                    "written unless every member fits.",
    )
    imp.add_argument("source", type=Path, help="folder holding the member files")
    imp.add_argument("--out", type=Path, required=True, help="checkpoint directory to create (new or empty)")
    imp.add_argument("--initial", required=True, metavar="PATTERN",
                     help="glob under SOURCE for the initial-stage members (2 input channels), e.g. 'initial_*.pt'")
    imp.add_argument("--refinement", metavar="PATTERN", default=None,
                     help="glob for the refinement-stage members (5 input channels); omitted: an initial-only "
                          "import that serves the automatic mask and answers clicks 409")
    imp.add_argument("--channels", type=_integers, default=paper.channels, metavar="C,...",
                     help=f"UNet channels (default the paper's {','.join(map(str, paper.channels))})")
    imp.add_argument("--strides", type=_integers, default=paper.strides, metavar="S,...",
                     help=f"UNet strides (default {','.join(map(str, paper.strides))})")
    imp.add_argument("--res-units", type=int, default=paper.num_res_units,
                     help=f"UNet residual units (default {paper.num_res_units})")
    imp.add_argument("--grid", type=_grid, default=PAPER_GRID, metavar="D,H,W",
                     help="grid the members were trained on, voxels (default 144,144,144)")
    imp.add_argument("--spacing", type=float, default=1.0, help="isotropic grid spacing, mm (default 1)")
    imp.add_argument("--click-sigma", type=positive_float, default=DEFAULT_SIGMA_VOXELS,
                     help=f"click Gaussian sigma, voxels, as in training (default {DEFAULT_SIGMA_VOXELS:g})")
    imp.add_argument("--click-overlap", choices=CLICK_OVERLAPS, default="sum",
                     help="how overlapping click balls of one sign combine, as in training (default sum, MONAI "
                     "DeepEdit's; max: every click peaks at 1)")
    imp.add_argument("--click-reach", type=click_reach, action="append", metavar="SIGN=VOXELS",
                     help="the clicks of SIGN have a reach of sigma VOXELS, as in training (repeat for both signs; "
                     "default: none)")
    imp.add_argument("--zero-click-passes", type=int_between(0, MAX_ZERO_CLICK_PASSES), default=0,
                     help="refinement passes with no clicks after the initial ensemble, as the members were "
                     "trained and validated (default 0, the paper's method)")
    imp.add_argument("--description", default="", help="free text for the manifest: data, training command")
    imp.set_defaults(run=_import)

    check = verbs.add_parser(
        "check", help="load a checkpoint as the service does and run each stage once on a phantom",
        description="Prints digest, precision, device, memory and seconds per pass; exit 2 on anything the "
                    "service would refuse.",
    )
    check.add_argument("directory", type=Path, help="checkpoint directory")
    check.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (as ICR_DEVICE)")
    check.add_argument("--autocast", choices=["auto", "off", "float16", "bfloat16"], default="auto",
                       help="precision, as ICR_AUTOCAST (default auto)")
    check.add_argument("--threads", type=int, default=None, help="CPU threads (as ICR_TORCH_THREADS)")
    check.add_argument("--seed", type=int, default=0, help="phantom and click seed")
    check.set_defaults(run=_check)

    export = verbs.add_parser("export", help="write a checkpoint directory as a MONAI Bundle")
    export.add_argument("directory", type=Path, help="checkpoint directory")
    export.add_argument("--bundle", type=Path, required=True, help="bundle folder to create")
    export.add_argument("--version", default="0.1.0", help="bundle version for metadata.json")
    export.add_argument("--authors", default="unknown", help="who trained the weights, for metadata.json")
    export.set_defaults(run=_export)
