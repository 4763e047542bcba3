"""Training of 2S-ICR and the methods it is compared with, into service checkpoints.

Methods: ``unet`` (non-interactive), ``2s-icr`` (initial net, then a refinement net
trained on the frozen initial net's output with 1-15 simulated clicks, a backward
pass at every interaction and mask dropout), ``deepgrow`` / ``deepedit-25`` /
``deepedit-50`` (DeepEdit with 0/25/50 % click-free iterations: clicks simulated
without gradients, then one backward pass with all of them, as MONAI's DeepEdit).

Every network: output bias at the logit of a small foreground share when built from
scratch (``output_prior``), Dice + BCE (equal weights), AdamW, cosine annealing to zero, batch 1,
the paper's augmentations, best state by validation mean DSC over 0-10 clicks (0
clicks for non-interactive nets), early stopping after ``patience`` validations
without improvement. One member per fold of a k-fold split (a file, so runs
are reproducible); ``base_steps`` > 0 first trains one network on every training
case and starts each fold's member from it (the reduced configuration's way to fit
five members into a CPU budget). The budget counts training samples (``budget =
"samples"``, the paper's epochs: 2S-ICR's refinement makes one optimizer step per
interaction, 1-15 per sample) or optimizer steps (``"steps"``: an interaction of 2S-ICR
counts as one step, so every method gets the same number of optimizer steps).

Training is resumable: each member's progress is saved after every validation and
a rerun of the same command continues where it stopped. Several processes can share
one run's folder, each training some members (``--members``); the one that finds
every member finished writes the checkpoint. ``--continue-refinement`` starts each
refinement member from a trained checkpoint's member of the same fold.

Modules: :mod:`~service.science.training_config` (configurations),
:mod:`~service.science.training_samples` (a sample's loss closures, validation),
:mod:`~service.science.training_loop` (one member's resumable optimisation, a stage's
members); this one runs a method's stages and is the ``icr train`` command.
"""


from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import UNet
from tqdm import tqdm

from service.argtypes import click_reach, int_between, non_negative_float, positive_float
from service.engine.checkpoints import (
    MAX_ZERO_CLICK_PASSES,
    METHOD_STAGES,
    LoadedCheckpoint,
    load_checkpoint,
    write_checkpoint,
)
from service.engine.clicks import CLICK_OVERLAPS, DEFAULT_SIGMA_VOXELS
from service.engine.ensemble import resolve_device
from service.engine.fastpath import AUTOCAST_CHOICES, autocast_dtype
from service.science.dataset import (
    find_cases,
    load_prepared,
    make_folds,
    read_case_list,
    read_folds,
    select,
    write_folds,
)
from service.science.training_config import CONFIGS, MEMORY_SOURCES, METHODS, TrainConfig
from service.science.training_loop import UnfinishedMembers, train_stage

log = logging.getLogger(__name__)


def train(
    method: str,
    data_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    *,
    seed: int = 0,
    device: torch.device,
    case_ids: list[str] | None = None,
    folds_path: Path | None = None,
    cache_dir: Path | None = None,
    command: str = "",
    initial_from: Path | None = None,
    refinement_from_checkpoint: Path | None = None,
    peers_from: Path | None = None,
    only_members: list[int] | None = None,
) -> Path | None:
    """Train every stage of ``method``; writes ``out_dir/weights`` (checkpoint) and ``training.json``.

    ``only_members``: train just those folds' members; the checkpoint is written (and
    returned) by the process that finds every member finished, else None. ``peers_from``
    (2s-icr): each refinement member trains inside an ensemble of itself and that checkpoint's
    other folds' refinement members (frozen), whose mean output is every interaction's memory.
    """
    started = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = find_cases(data_dir)
    if case_ids is not None:
        cases = select(cases, case_ids)
    if not cases:
        raise ValueError(f"no cases found under {data_dir}")
    ids = [c.id for c in cases]
    if folds_path is not None:
        folds = read_folds(folds_path)
    else:
        folds = make_folds(ids, min(config.folds, len(ids)), seed) if len(ids) > 1 else [{"train": ids, "val": []}]
    write_folds(out_dir / "folds.json", folds)
    prepared = {c.id: load_prepared(c, config.grid_shape, config.spacing_mm, cache_dir) for c in tqdm(cases, desc="preparing cases")}
    state_dir = out_dir / "state"
    state_dir.mkdir(exist_ok=True)
    order = list(METHOD_STAGES[method])
    if config.interactive_from_initial and "initial" not in order:
        order.insert(0, "initial")  # a click-guided net's warm start; not part of its checkpoint
    if initial_from is not None and (method == "unet" or "initial" not in order):
        raise ValueError(f"--initial-from needs a method that refines on or starts from an initial net, not {method}"
                         f" with the '{config.name}' configuration")
    stages: dict[str, list[UNet]] = {}
    reports: dict[str, list[dict]] = {}
    if initial_from is not None:
        stages["initial"], reports["initial"] = _frozen_initial(initial_from, config, len(folds))
    continued: dict[str, list[UNet]] = {}
    if refinement_from_checkpoint is not None:
        if method != "2s-icr":
            raise ValueError(f"--continue-refinement needs the 2s-icr method, not {method}")
        continued["refinement"] = _checkpoint_members(refinement_from_checkpoint, config, len(folds), "refinement")
    peers = None
    if peers_from is not None:
        if method != "2s-icr":
            raise ValueError(f"--peers needs the 2s-icr method, not {method}")
        peers = _checkpoint_members(peers_from, config, len(folds), "refinement")
    for stage in order:
        if stage in stages:
            continue
        try:
            stages[stage], reports[stage] = train_stage(
                method, stage, config, folds, prepared, device, seed, state_dir,
                initial_members=stages.get("initial") if stage != "initial" else None,
                starting_members=continued.get(stage), peer_members=peers if stage == "refinement" else None,
                only_members=only_members,
            )
        except UnfinishedMembers as unfinished:
            log.info("%s; the run that finishes them writes the checkpoint", unfinished)
            return None
        if stage in continued:
            reports[stage].insert(0, {"continued_from": str(refinement_from_checkpoint)})
        if stage == "refinement" and peers_from is not None:
            reports[stage].insert(0, {"peers_from": str(peers_from)})
    stages = {stage: stages[stage] for stage in METHOD_STAGES[method]}
    description = (
        f"{method}, '{config.name}' configuration, {len(ids)} training cases from {data_dir.name}, "
        f"seed {seed}. Command: {command or 'icr train'}"
    )
    weights = out_dir / "weights"
    write_checkpoint(
        weights, stages, method=method, architecture=config.architecture, grid_shape=config.grid_shape,
        spacing_mm=config.spacing_mm, click_sigma_voxels=config.click_sigma_voxels, click_overlap=config.click_overlap,
        click_reach_sigma_voxels=config.click_reach_sigma_voxels, description=description,
        zero_click_passes=config.zero_click_passes if method == "2s-icr" else 0, dtype=getattr(torch, config.save_dtype),
    )
    summary = {
        "method": method, "config": {**asdict(config), "architecture": config.architecture.to_dict()},
        "seed": seed, "cases": ids, "folds": folds, "device": str(device), "seconds": round(time.time() - started, 1),
        "command": command, "stages": reports,
    }
    (out_dir / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return weights


def _frozen_initial(directory: Path, config: TrainConfig, folds: int) -> tuple[list[UNet], list[dict]]:
    """A trained initial ensemble to refine on or start click-guided nets from (frozen)."""
    checkpoint = load_checkpoint(directory, method=None)
    return _checkpoint_members(directory, config, folds, "initial", checkpoint), [
        {"reused_from": str(directory), "digest": checkpoint.digest}]


def _checkpoint_members(directory: Path, config: TrainConfig, folds: int, stage: str,
                        checkpoint: LoadedCheckpoint | None = None) -> list[UNet]:
    """One stage's members of a trained checkpoint, checked against the configuration and the folds."""
    checkpoint = checkpoint or load_checkpoint(directory, method=None)
    if stage not in checkpoint.stages:
        raise ValueError(f"{directory} has no {stage} stage")
    if checkpoint.grid_shape != config.grid_shape or checkpoint.spacing_mm != config.spacing_mm:
        raise ValueError(f"{directory} was trained on another grid than the '{config.name}' configuration")
    if checkpoint.architecture != config.architecture:
        raise ValueError(f"{directory} holds another network architecture than the '{config.name}' configuration")
    members = checkpoint.stages[stage]
    if len(members) != folds:
        raise ValueError(f"{directory} has {len(members)} {stage} members for {folds} folds")
    return [member.float() for member in members]


# -- command line ---------------------------------------------------------------------
def config_from_arguments(args: argparse.Namespace) -> TrainConfig:
    """The named configuration with the fields that ``icr train``'s options set."""
    config = CONFIGS[args.config]
    overrides: dict[str, Any] = {k: v for k, v in (("base_steps", args.base_steps), ("member_steps", args.steps),
                                   ("p_drop", args.p_drop), ("folds", args.folds), ("budget", args.budget),
                                   ("lr", args.lr), ("autocast", args.autocast),
                                   ("refinement_from_initial", None if args.refinement_from is None
                                    else args.refinement_from == "initial"),
                                   ("refinement_memory", args.memory_from),
                                   ("click_loss_weight", args.click_loss),
                                   ("click_loss_radius_voxels", args.click_loss_radius),
                                   ("keep_loss_weight", args.keep_loss),
                                   ("local_target_mm", args.local_target),
                                   ("no_op_click_chance", args.no_op_clicks),
                                   ("memory_behind_rules", args.memory_behind_rules or None),
                                   ("zero_click_passes", args.zero_click_passes),
                                   ("click_overlap", args.click_overlap),
                                   ("click_sigma_voxels", args.click_sigma),
                                   ("click_reach_sigma_voxels", dict(args.click_reach) if args.click_reach else None))
                 if v is not None}
    return replace(config, **overrides)


def _run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    config = config_from_arguments(args)
    device = resolve_device(args.device)
    try:  # refuse a dtype the device lacks before preparing any case
        autocast_dtype(config.autocast, device)
    except ValueError as error:
        log.error("cannot train: %s", error)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = train(
        args.method, Path(args.data), Path(args.out), config, seed=args.seed, device=device,
        case_ids=read_case_list(Path(args.cases)) if args.cases else None,
        folds_path=Path(args.folds_file) if args.folds_file else None,
        cache_dir=Path(args.cache) if args.cache else Path(args.out) / "cache",
        command=shlex.join(["icr", *sys.argv[1:]]),
        initial_from=Path(args.initial_from) if args.initial_from else None,
        refinement_from_checkpoint=Path(args.continue_refinement) if args.continue_refinement else None,
        peers_from=Path(args.peers) if args.peers else None,
        only_members=args.members,
    )
    print("members trained; others still training" if weights is None else f"checkpoint written to {weights}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train a method's five-member ensemble(s) into a checkpoint")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--data", required=True, help="folder of cases (HECKTOR 2021 / 2022 layout or phantoms)")
    parser.add_argument("--out", required=True, help="output folder: weights/, folds.json, training.json, state/")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="reduced")
    parser.add_argument("--cases", help="file listing the case ids to use (default: all found)")
    parser.add_argument("--folds-file", help="folds.json to reuse (default: a seeded k-fold split, written to --out)")
    parser.add_argument("--folds", type=int, help="number of folds = ensemble members (default 5)")
    parser.add_argument("--steps", type=int, help="budget units (see --budget) per member (overrides the configuration)")
    parser.add_argument("--base-steps", type=int, help="budget units of the shared warm start (0: none)")
    parser.add_argument("--budget", choices=("steps", "samples"),
                        help="what --steps/--base-steps/epochs count: optimizer steps (an interaction of 2S-ICR is one; "
                        "'reduced' default) or training samples with all their interactions (the paper's epochs; "
                        "'paper' default)")
    parser.add_argument("--refinement-from", choices=("initial", "scratch"),
                        help="2S-ICR: start the refinement net as a copy of the initial net (extra inputs at zero) "
                        "or from scratch (the paper)")
    parser.add_argument("--memory-from", choices=MEMORY_SOURCES,
                        help="2S-ICR: the first memory of a refinement sample is the output of the fold's own initial "
                        "member (default), of the initial member that never trained on the case, or the mean of all "
                        "initial members (the ensemble's probability, as the service's first memory)")
    parser.add_argument("--lr", type=float, help="peak learning rate of the cosine schedule (overrides the configuration)")
    parser.add_argument("--p-drop", type=float, help="mask dropout probability for 2S-ICR refinement (default 0.2)")
    parser.add_argument("--initial-from", help="reuse this checkpoint's initial ensemble instead of training one: 2s-icr refines on it "
                        "(frozen), deepgrow/deepedit start from it (reduced configuration)")
    parser.add_argument("--continue-refinement", help="2s-icr: start each fold's refinement member from this checkpoint's "
                        "member of the same fold (continued training, no shared warm start)")
    parser.add_argument("--peers", metavar="CHECKPOINT",
                        help="2s-icr: train each refinement member inside an ensemble: after every interaction the "
                        "memory (whose mask the next simulated click corrects) is the mean of the member's output and "
                        "those of this checkpoint's other folds' refinement members, as the ensemble's memory at test "
                        "time; validation runs that ensemble too")
    parser.add_argument("--members", type=lambda text: [int(i) for i in text.split(",")],
                        help="train only these folds' members, e.g. 0,2 (several processes on one --out; the one "
                        "that finds all members finished writes the checkpoint; a shared warm start must be done first)")
    parser.add_argument("--click-loss", type=float, help="2s-icr: weight of the BCE over the click balls added to "
                        "Dice + BCE (default 0: none)")
    parser.add_argument("--click-loss-radius", type=non_negative_float, metavar="VOXELS",
                        help="2s-icr: radius of the click balls of --click-loss, in voxels of the training grid "
                        "(default 3; 0: the clicked voxel alone)")
    parser.add_argument("--keep-loss", type=float, help="2s-icr: weight of the BCE pulling the output towards the "
                        "memory's mask farther than 20 mm from every click (default 0: none)")
    parser.add_argument("--local-target", type=float, metavar="MM", help="2s-icr: train each interaction towards the "
                        "truth within MM of the clicks and the memory's mask beyond (default 0: the truth everywhere)")
    parser.add_argument("--no-op-clicks", type=float, help="2s-icr: chance that a training click is a no-op click "
                        "(background, far from mask and truth) instead of an error-correcting one (default 0)")
    parser.add_argument("--memory-behind-rules", action="store_true",
                        help="2s-icr: each clicked interaction's output passes the service's click rules (the "
                        "click guarantee, what a click may change) before it becomes the next memory")
    parser.add_argument("--zero-click-passes", type=int_between(0, MAX_ZERO_CLICK_PASSES),
                        help="2s-icr: refinement passes with no clicks that make a session's first mask and memory "
                        f"(0-{MAX_ZERO_CLICK_PASSES}; written into the checkpoint; default 0, the paper's method); each "
                        "training sample starts with as many click-free interactions")
    parser.add_argument("--click-overlap", choices=CLICK_OVERLAPS,
                        help="how overlapping click balls of one sign combine in the click maps (written into the "
                        "checkpoint; default sum, MONAI DeepEdit's; max: every click peaks at 1)")
    parser.add_argument("--click-sigma", type=positive_float, metavar="VOXELS",
                        help="sigma of the click maps' Gaussian balls, in voxels of the training grid (written into "
                        f"the checkpoint; default {DEFAULT_SIGMA_VOXELS:g}, MONAI DeepEdit's)")
    parser.add_argument("--click-reach", type=click_reach, action="append", metavar="SIGN=VOXELS",
                        help="give the clicks of SIGN (foreground or background) a reach: each of their balls is the "
                        "mean of the --click-sigma Gaussian and a wider one of sigma VOXELS, both peaking at 1 "
                        "(written into the checkpoint; repeat for both signs; default: none)")
    parser.add_argument("--autocast", choices=AUTOCAST_CHOICES,
                        help="mixed-precision forward passes (default: the configuration's, off = float32 except "
                        "paper-cpu's auto; bfloat16 on CPUs with bfloat16 instructions is about 2.5x faster; "
                        "float16 on CUDA uses a gradient scaler)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="CPU threads")
    parser.add_argument("--cache", help="folder for prepared cases (default OUT/cache)")
    parser.set_defaults(run=_run)
