"""Does a 2S-ICR refinement ensemble use its memory and its click?

For each case: the initial ensemble's mask, one click drawn by the click simulator from
its errors (the evaluation protocol's first click, same random stream), then the
refinement ensemble on four inputs:

- ``memory+click``: what the service computes (the protocol's 1-click DSC);
- ``memory``: the previous probability, no click;
- ``click``: the memory replaced by 0.5 everywhere (what mask dropout shows the net in
  training), with the click;
- ``neither``: memory 0.5 and no click: the refinement net as a plain segmenter.

If ``memory+click`` is no better than ``click``, the ensemble does not use its memory;
if it is no better than ``memory``, it does not use the click.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from service.engine.checkpoints import CheckpointError, load_checkpoint
from service.engine.clicks import click_maps
from service.engine.ensemble import Engine, resolve_device
from service.engine.fastpath import AUTOCAST_CHOICES
from service.imaging.volume import ImageError
from service.science.dataset import (
    PreparedCase,
    find_cases,
    load_prepared,
    read_case_list,
    select,
)
from service.science.evaluation import repetition_rng
from service.science.metrics import dice
from service.science.simulator import ClickRule, next_click
from service.store.contract import Click

log = logging.getLogger(__name__)

VARIANTS = ("initial", "memory+click", "memory", "click", "neither")


def ablate_case(engine: Engine, case: PreparedCase, rng: np.random.Generator,
                rule: ClickRule = ClickRule.DEEPGROW) -> dict[str, float]:
    """DSC of each variant on one case (see the module's docstring)."""
    previous = engine.initial_probability(case.images)
    mask = previous > 0.5
    scores = {"initial": dice(mask, case.truth)}
    click = next_click(mask, case.truth, rng, rule)
    clicks: tuple[Click, ...] = () if click is None else (click,)
    with_click = click_maps(clicks, previous.shape, *engine.checkpoint.click_encoding)
    without_click = click_maps((), previous.shape, *engine.checkpoint.click_encoding)
    no_memory = np.full_like(previous, 0.5)
    for name, memory, guidance in (("memory+click", previous, with_click), ("memory", previous, without_click),
                                   ("click", no_memory, with_click), ("neither", no_memory, without_click)):
        probability = engine.refinement_stage().probability(np.concatenate([case.images, memory[None], guidance], axis=0))
        scores[name] = dice(probability > 0.5, case.truth)
    return scores


def ablate(weights: Path, data_dir: Path, *, case_ids: list[str] | None = None, seed: int = 0, device: str = "cpu",
           autocast: str = "off", cache_dir: Path | None = None) -> dict:
    checkpoint = load_checkpoint(weights, method=None)
    if checkpoint.method != "2s-icr":
        raise CheckpointError(f"{weights} holds a {checkpoint.method} checkpoint; the ablation needs a 2s-icr one "
                              "(an initial and a refinement ensemble)")
    cases = find_cases(data_dir)
    if case_ids is not None:
        cases = select(cases, case_ids)
    if not cases:
        raise FileNotFoundError(f"no cases found under {data_dir}")
    engine = Engine(checkpoint, resolve_device(device), autocast=autocast)
    per_case = {}
    for index, case in enumerate(cases):
        prepared = load_prepared(case, checkpoint.grid_shape, checkpoint.spacing_mm, cache_dir)
        # the evaluation protocol's stream of repetition 0, so memory+click is its 1-click DSC
        per_case[case.id] = ablate_case(engine, prepared, repetition_rng(seed, 0, index))
    means = {name: float(np.mean([scores[name] for scores in per_case.values()])) for name in VARIANTS}
    return {"weights": str(weights), "digest": checkpoint.digest, "data": str(data_dir), "seed": seed,
            "device": device, "autocast": autocast, "mean_dsc": means, "cases": per_case}


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = ablate(args.weights, args.data, case_ids=read_case_list(args.cases) if args.cases else None,
                        seed=args.seed, device=args.device, autocast=args.autocast, cache_dir=args.cache)
    except (CheckpointError, ImageError, FileNotFoundError, ValueError) as error:
        log.error("ablation failed: %s", error)
        return 2
    print(f"{'':16}" + "".join(f"{name:>14}" for name in VARIANTS))
    for case_id, scores in result["cases"].items():
        print(f"{case_id:16}" + "".join(f"{scores[name]:14.3f}" for name in VARIANTS))
    print(f"{'mean DSC':16}" + "".join(f"{result['mean_dsc'][name]:14.3f}" for name in VARIANTS))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "ablate", help="does a 2S-ICR refinement ensemble use its memory and its click? (first-click DSC per input)",
        description="First-click DSC of a 2S-ICR checkpoint's refinement ensemble with and without its memory "
                    "(replaced by 0.5) and its click.",
    )
    parser.add_argument("--weights", type=Path, required=True, help="a 2s-icr checkpoint directory")
    parser.add_argument("--data", type=Path, required=True, help="case folder (HECKTOR layout or phantoms)")
    parser.add_argument("--cases", type=Path, default=None, help="file of case ids, one a line (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="as icr evaluate's: the same first clicks")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="off")
    parser.add_argument("--threads", type=int, help="CPU threads")
    parser.add_argument("--cache", type=Path, default=None, help="folder for prepared-case caches")
    parser.add_argument("--json", type=Path, default=None, help="write the per-case scores here")
    parser.set_defaults(run=_run)
