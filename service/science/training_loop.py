"""The optimisation loop of one member (resumable), and how a stage's nets start and train.

:func:`fit` trains one network for a budget of units (optimizer steps or whole
samples, ``TrainConfig.budget``) with AdamW and a cosine schedule, validates every
``val_every`` units, keeps the best state, stops early after ``patience`` stale
validations and saves its progress at each validation so that a rerun resumes.
:func:`train_stage` trains one member per fold, from a shared warm start, from a
widened copy of an initial net (:func:`starting_net`) or from given members.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import UNet
from tqdm import tqdm

from service.engine.checkpoints import STAGE_CHANNELS
from service.engine.networks import build_unet
from service.science.dataset import PreparedCase
from service.science.training_config import TrainConfig
from service.science.training_samples import StageTrainer


@dataclass
class Member:
    """A fold's network being trained, and what selection keeps of it."""

    net: UNet
    best_state: dict[str, torch.Tensor] | None = None
    best_metric: float = -1.0
    history: list[dict[str, float]] = field(default_factory=list)


def _optimiser(net: UNet, config: TrainConfig, steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return optimiser, torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(steps, 1), eta_min=0.0)


def fit(
    trainer: StageTrainer,
    member: Member,
    fold: int,
    train_cases: Sequence[PreparedCase],
    val_cases: Sequence[PreparedCase],
    steps: int,
    state_path: Path,
    label: str,
) -> Member:
    """Train for ``steps`` budget units (see ``TrainConfig.budget``), validating every ``val_every``.

    The cosine schedule advances once per unit. Resumable from ``state_path``, which is
    written at every validation.
    """
    config = trainer.config
    if config.budget not in ("steps", "samples"):
        raise ValueError(f"budget must count 'steps' or 'samples', not {config.budget!r}")
    per_sample = config.budget == "samples"
    optimiser, schedule = _optimiser(member.net, config, steps)
    scaler = torch.amp.GradScaler(trainer.device.type, enabled=trainer.precision is torch.float16)
    done, stale = 0, 0
    if state_path.exists():
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        member.net.load_state_dict(saved["net"])
        optimiser.load_state_dict(saved["optimiser"])
        schedule.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved.get("scaler", {}))
        done, stale = saved["step"], saved["stale"]
        member.best_state, member.best_metric, member.history = saved["best_state"], saved["best_metric"], saved["history"]
        trainer.rng = saved["rng"]
    member.net.to(trainer.device).train()
    bar = tqdm(total=steps, initial=done, desc=label, unit="sample" if per_sample else "step", dynamic_ncols=True)
    losses: list[float] = []

    def count_unit() -> None:
        """One budget unit done: advance the schedule, validate and save when due."""
        nonlocal done, stale, losses
        schedule.step()
        done += 1
        bar.update(1)
        if done % config.val_every and done != steps:
            return
        entry = {"step": done, "loss": float(np.mean(losses))}
        if val_cases:  # a warm start has no validation: it keeps its last state
            metric = trainer.validate(member.net, fold, val_cases)
            entry["val_dsc"] = metric
            if metric > member.best_metric:
                member.best_metric, stale = metric, 0
                member.best_state = copy.deepcopy(member.net.state_dict())
            else:
                stale += 1
        member.history.append(entry)
        bar.set_postfix({k: f"{v:.3f}" for k, v in entry.items() if k != "step"})
        losses = []
        torch.save(
            {"net": member.net.state_dict(), "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
             "scaler": scaler.state_dict(), "step": done, "stale": stale, "best_state": member.best_state,
             "best_metric": member.best_metric, "history": member.history, "rng": trainer.rng},
            state_path,
        )

    while done < steps and stale < config.patience:
        for closure in trainer.steps(member.net, fold, train_cases):
            if done >= steps or stale >= config.patience:
                break
            optimiser.zero_grad()
            with trainer.reduced_precision():
                loss = closure()
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            losses.append(loss.item())
            if not per_sample:
                count_unit()
        if per_sample:
            count_unit()
    bar.close()
    if member.best_state is not None:
        member.net.load_state_dict(member.best_state)
    return member


def widen_inputs_from(net: UNet, source: UNet) -> None:
    """Copy ``source``'s weights into ``net``; input channels ``source`` lacks get zero weights."""
    target = net.state_dict()
    if set(target) != set(source.state_dict()):  # e.g. a residual projection only one of them needs
        raise ValueError("the initial net's layers differ from the widened net's: choose a first channel count "
                         "other than the input channel counts")
    for name, value in source.state_dict().items():
        if value.shape == target[name].shape:
            target[name] = value.clone()
        else:  # the first layer's (out, in, ...) kernels: same outputs, more inputs
            widened = torch.zeros_like(target[name])
            widened[:, : value.shape[1]] = value
            target[name] = widened
    net.load_state_dict(target)


def start_from_prior(net: UNet, prior: float) -> None:
    """Set the bias of ``net``'s last convolution to logit(``prior``), its output offset."""
    if not 0 < prior < 1:
        raise ValueError(f"output prior must be in (0, 1), got {prior}")
    last = [m for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))][-1]
    if last.bias is None:
        raise ValueError("the net's last convolution has no bias to carry the output prior")
    with torch.no_grad():
        last.bias.fill_(math.log(prior / (1 - prior)))


def starting_net(stage: str, config: TrainConfig, initial_members: list[UNet] | None = None) -> UNet:
    """A stage's net before training: a widened copy of the first initial member (see
    ``interactive_from_initial``, ``refinement_from_initial``), else built from scratch."""
    net = build_unet(STAGE_CHANNELS[stage], config.architecture)
    copy_initial = stage == "interactive" or (stage == "refinement" and config.refinement_from_initial)
    if copy_initial and config.interactive_from_initial and initial_members:
        widen_inputs_from(net, initial_members[0])
    elif config.output_prior is not None:
        start_from_prior(net, config.output_prior)
    return net


def train_stage(
    method: str,
    stage: str,
    config: TrainConfig,
    folds: list[dict[str, list[str]]],
    prepared: dict[str, PreparedCase],
    device: torch.device,
    seed: int,
    state_dir: Path,
    initial_members: list[UNet] | None = None,
    starting_members: list[UNet] | None = None,
    peer_members: list[UNet] | None = None,
    only_members: Sequence[int] | None = None,
) -> tuple[list[UNet], list[dict]]:
    """Train one member per fold; ``starting_members`` (one per fold): continue training those
    instead of a shared warm start. ``peer_members`` (one per fold, refinement only): each
    member trains and validates inside an ensemble of itself and the other folds' peers.
    ``only_members``: train just these folds' members (others may be trained by other
    processes on the same state folder); raises :class:`UnfinishedMembers` when a member left
    to others has not finished yet."""
    trainer = StageTrainer(method, stage, config, device, seed)
    if initial_members is not None:
        trainer.use_initial(initial_members, folds)
    if peer_members is not None:
        trainer.use_peers(peer_members)
    every = sorted({i for fold in folds for i in fold["train"] + fold["val"]})
    torch.manual_seed(seed)
    start = starting_net(stage, config, initial_members)
    if config.base_steps > 0 and starting_members is None:  # a refinement warm start takes its memories as fold 0 would
        base = fit(trainer, Member(start), 0, [prepared[i] for i in every], [],
                   config.base_steps, state_dir / f"{stage}-base.pt", f"{method} {stage} base")
        start = base.net

    def fit_member(index: int) -> tuple[UNet, dict]:
        fold = folds[index]
        trainer.rng = np.random.default_rng([seed, index])
        first = start if starting_members is None else starting_members[index]
        member = fit(trainer, Member(copy.deepcopy(first)), index, [prepared[i] for i in fold["train"]],
                     [prepared[i] for i in fold["val"]], _member_steps(config, fold), state_dir / f"{stage}-{index}.pt",
                     f"{method} {stage} {index + 1}/{len(folds)}")
        return member.net.cpu().eval(), {"fold": index, "best_val_dsc": member.best_metric, "history": member.history}

    mine = range(len(folds)) if only_members is None else sorted(set(only_members))
    trained = {index: fit_member(index) for index in mine}
    others = [index for index in range(len(folds)) if index not in trained]
    unfinished = [index for index in others
                  if not member_finished(state_dir / f"{stage}-{index}.pt", config, _member_steps(config, folds[index]))]
    if unfinished:
        raise UnfinishedMembers(stage, unfinished)
    trained.update({index: fit_member(index) for index in others})  # finished: their best states, no training
    return [trained[i][0] for i in range(len(folds))], [trained[i][1] for i in range(len(folds))]


class UnfinishedMembers(RuntimeError):
    """Members of a stage that other processes are still training."""

    def __init__(self, stage: str, folds: list[int]) -> None:
        super().__init__(f"{stage} members {', '.join(str(f) for f in folds)} have not finished training")
        self.stage, self.folds = stage, folds


def _member_steps(config: TrainConfig, fold: dict[str, list[str]]) -> int:
    return config.member_steps or (config.epochs or 1) * len(fold["train"])


def member_finished(state_path: Path, config: TrainConfig, steps: int) -> bool:
    """Whether the member saved at ``state_path`` has spent its budget or stopped early."""
    if not state_path.exists():
        return False
    saved = torch.load(state_path, map_location="cpu", weights_only=False)
    return bool(saved["step"] >= steps or saved["stale"] >= config.patience)
