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
a rerun of the same command continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from tqdm import tqdm

from service.engine.checkpoints import (
    METHOD_STAGES,
    STAGE_CHANNELS,
    LoadedCheckpoint,
    load_checkpoint,
    write_checkpoint,
)
from service.engine.clicks import DEFAULT_SIGMA_VOXELS, click_maps
from service.engine.ensemble import Engine, resolve_device
from service.engine.fastpath import AUTOCAST_CHOICES, autocast_dtype
from service.engine.networks import PAPER_ARCHITECTURE, Architecture, build_unet
from service.science.augment import augmented_sample, training_transforms
from service.science.dataset import (
    PreparedCase,
    find_cases,
    load_prepared,
    make_folds,
    read_case_list,
    read_folds,
    select,
    write_folds,
)
from service.science.evaluation import interaction_curve
from service.science.methods import ClickGuided, NonInteractive, Segmenter
from service.science.simulator import next_click
from service.store.contract import Click

log = logging.getLogger(__name__)

METHODS = tuple(METHOD_STAGES)
CLICK_FREE_FRACTION = {"deepgrow": 0.0, "deepedit-25": 0.25, "deepedit-50": 0.5}


@dataclass(frozen=True)
class TrainConfig:
    name: str
    architecture: Architecture
    grid_shape: tuple[int, int, int]
    spacing_mm: float
    patch_shape: tuple[int, int, int] | None
    lr: float
    member_steps: int  # budget units per fold member; 0 with ``epochs`` set: epochs x training cases
    base_steps: int = 0
    epochs: int | None = None
    # What the budget (``base_steps``, ``member_steps``, ``epochs``) counts: "samples" (a
    # training sample with all its interactions is one unit, as the paper's epochs) or
    # "steps" (optimizer steps: an interaction of 2S-ICR is one). The same for the other
    # methods, which take one optimizer step per sample.
    budget: str = "steps"
    weight_decay: float = 1e-5
    val_every: int = 100
    patience: int = 10
    max_train_clicks: int = 15
    val_clicks: int = 10
    p_drop: float = 0.2
    folds: int = 5
    click_sigma_voxels: float = DEFAULT_SIGMA_VOXELS
    save_dtype: str = "float32"
    # Start every click-taking net (the 2S-ICR refinement net, DeepGrow/DeepEdit) from
    # a trained initial net (extra input channels at zero): it begins by reproducing the
    # initial mask and only has to learn to use memory and clicks. DeepGrow/DeepEdit
    # then train that click-free initial net first (or reuse one, ``--initial-from``),
    # so every method gets the same steps. Not in the paper; it is what makes a CPU
    # budget enough.
    interactive_from_initial: bool = False
    # False: 2S-ICR's refinement net starts from scratch (as in the paper) all the same.
    # A copy of the initial net computes its memory itself; a net from scratch sees its
    # own, at first uninformative, outputs as memory. At the reduced budget neither
    # learned to use the memory (docs/results/phantom-eval-equal-lineage.md).
    refinement_from_initial: bool = True
    # Whose output is a 2S-ICR refinement sample's first memory: "fold", the frozen initial
    # member of the fold being trained, which has seen most of its training cases (its
    # masks there are better than at test time, and its errors, which the clicks mark, are
    # smaller); "held-out", the initial member whose validation fold holds the case, i.e.
    # a mask made without that case, as the initial ensemble's masks are at test time.
    # On phantoms "fold" did better (docs/results/phantom-eval-samples-budget.md).
    refinement_memory: str = "fold"
    # A net built from scratch starts by predicting this foreground share everywhere
    # (its output bias is the share's logit, as for detectors' rare classes): with
    # MONAI's zero bias it starts at 0.5, and at a small budget some seeds never left
    # that plateau (docs/results/unet-seed-variance.md). None: MONAI's initialisation.
    output_prior: float | None = 0.01
    # Mixed precision for training and validation (see fastpath.AUTOCAST_CHOICES): the
    # forward passes in this dtype, the loss and the weights in float32; float16 (CUDA)
    # with a gradient scaler. "off": float32 throughout.
    autocast: str = "off"


CONFIGS = {
    # The paper: full 144^3 volumes at 1 mm, 300 epochs (passes over the training cases), lr 1e-4. For GPUs.
    "paper": TrainConfig(
        name="paper", architecture=PAPER_ARCHITECTURE, grid_shape=(144, 144, 144), spacing_mm=1.0,
        patch_shape=None, lr=1e-4, member_steps=0, epochs=300, budget="samples", val_every=500, patience=20,
    ),
    # Fits every method on a 2-core CPU in well under an hour each: half-width UNet,
    # 64^3 grid at 2 mm (128 mm field), 48^3 patches, a shared warm start, lr 5e-4.
    "reduced": TrainConfig(
        name="reduced", architecture=Architecture(channels=(8, 16, 32, 64, 128)), grid_shape=(64, 64, 64),
        spacing_mm=2.0, patch_shape=(48, 48, 48), lr=5e-4, base_steps=400, member_steps=60, val_every=30,
        patience=4, save_dtype="float16", interactive_from_initial=True,
    ),
    # The paper's network and grid (144^3 at 1 mm) on 64^3 patches, in bfloat16 where the
    # CPU has it, with a step budget a 2-core CPU trains 2S-ICR in about half an hour:
    # trained paper-size weights to measure the service's fast paths (windowed
    # refinement, stored bytes) with. Not the paper's training; validation at 0-2 clicks
    # only, as full-volume passes cost seconds here.
    "paper-cpu": TrainConfig(
        name="paper-cpu", architecture=PAPER_ARCHITECTURE, grid_shape=(144, 144, 144), spacing_mm=1.0,
        patch_shape=(64, 64, 64), lr=5e-4, base_steps=1200, member_steps=80, val_every=40, patience=4,
        val_clicks=2, save_dtype="float16", interactive_from_initial=True, autocast="auto",
    ),
    # A few steps on tiny volumes: for tests and smoke runs only.
    "tiny": TrainConfig(
        name="tiny", architecture=Architecture(channels=(4, 8, 16), strides=(1, 2), num_res_units=1),
        grid_shape=(24, 24, 24), spacing_mm=4.0, patch_shape=None, lr=3e-3, member_steps=6, val_every=3,
        patience=2, val_clicks=2, max_train_clicks=3, folds=2,
    ),
}


@dataclass
class Member:
    """A fold's network being trained, and what selection keeps of it."""

    net: UNet
    best_state: dict[str, torch.Tensor] | None = None
    best_metric: float = -1.0
    history: list[dict[str, float]] = field(default_factory=list)


def _loss() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Dice + BCE on the logits, in float32 whatever the forward pass computed in."""
    loss = DiceCELoss(sigmoid=True, lambda_dice=1.0, lambda_ce=1.0)
    return lambda logits, target: loss(logits.float(), target)


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None].to(device)


class StageTrainer:
    """Optimises one network of one stage; ``step_source`` yields (loss closure) steps."""

    def __init__(self, method: str, stage: str, config: TrainConfig, device: torch.device, seed: int) -> None:
        self.method, self.stage, self.config, self.device = method, stage, config, device
        self.rng = np.random.default_rng(seed)
        self.transforms = training_transforms(config.spacing_mm, config.patch_shape)
        self.loss = _loss()
        self.initial_nets: dict[int, UNet] = {}  # frozen initial member per fold (2S-ICR refinement)
        self.held_out_by: dict[str, int] = {}  # case id -> the fold that validates on it
        self.precision = autocast_dtype(config.autocast, device)
        if config.refinement_memory not in ("fold", "held-out"):
            raise ValueError(f"refinement memory comes from 'fold' or 'held-out', not {config.refinement_memory!r}")

    def reduced_precision(self) -> torch.autocast:
        """The forward passes' autocast context (a no-op for float32 training)."""
        return torch.autocast(self.device.type, dtype=self.precision, enabled=self.precision is not None)

    def _infer(self, net: UNet, inputs: np.ndarray) -> torch.Tensor:
        """A gradient-free pass (frozen initial net, simulated clicks) in the training precision; float32 logits."""
        with torch.inference_mode(), self.reduced_precision():
            return net(_tensor(inputs, self.device)).float()

    # -- one optimisation step (or several, for 2S-ICR interactions) ---------------
    def _sample(self, cases: Sequence[PreparedCase]) -> tuple[str, np.ndarray, np.ndarray]:
        case = cases[int(self.rng.integers(len(cases)))]
        return case.id, *augmented_sample(self.transforms, case.images, case.truth, int(self.rng.integers(2**31)))

    def steps(self, net: UNet, fold: int, cases: Sequence[PreparedCase]) -> list[Callable[[], torch.Tensor]]:
        """The loss closures of one training sample (several for interactive training)."""
        case_id, images, truth = self._sample(cases)
        target = _tensor(truth[None].astype(np.float32), self.device)
        if self.stage == "initial":
            return [lambda: self.loss(net(_tensor(images, self.device)), target)]
        if self.stage == "refinement":
            return self._refinement_steps(net, self.memory_net(case_id, fold), images, truth, target)
        return [self._click_guided_step(net, images, truth, target)]

    def use_initial(self, members: Sequence[UNet], folds: Sequence[dict[str, list[str]]]) -> None:
        """The frozen initial ensemble (one member per fold) that refinement samples start from."""
        self.initial_nets = {f: net.to(self.device).eval() for f, net in enumerate(members)}
        self.held_out_by = {case_id: f for f, fold in enumerate(folds) for case_id in fold["val"]}

    def memory_net(self, case_id: str, fold: int) -> UNet:
        """The frozen initial member whose output is a refinement sample's first memory."""
        if self.config.refinement_memory == "held-out":
            return self.initial_nets[self.held_out_by.get(case_id, fold)]
        return self.initial_nets[fold]

    def _refinement_steps(
        self, net: UNet, initial: UNet, images: np.ndarray, truth: np.ndarray, target: torch.Tensor
    ) -> list[Callable[[], torch.Tensor]]:
        """1-15 interactions; each is a forward/backward on the last output (memory)."""
        state = {"previous": torch.sigmoid(self._infer(initial, images))[0, 0].cpu().numpy()}
        clicks: list[Click] = []
        interactions = int(self.rng.integers(1, self.config.max_train_clicks + 1))

        def interaction() -> torch.Tensor:
            click = next_click(state["previous"] > 0.5, truth, self.rng)
            if click is not None:
                clicks.append(Click(click.label, click.voxel))
            memory = state["previous"]
            if self.rng.random() < self.config.p_drop:  # mask dropout: no memory this time
                memory = np.full_like(memory, 0.5)
            maps = click_maps(clicks, truth.shape, self.config.click_sigma_voxels)
            logits = net(_tensor(np.concatenate([images, memory[None], maps]), self.device))
            state["previous"] = torch.sigmoid(logits.detach().float())[0, 0].cpu().numpy()
            return self.loss(logits, target)

        return [interaction] * interactions

    def _click_guided_step(
        self, net: UNet, images: np.ndarray, truth: np.ndarray, target: torch.Tensor
    ) -> Callable[[], torch.Tensor]:
        """DeepEdit: click-free with probability p, else clicks simulated without gradients."""
        clicks: list[Click] = []
        if self.rng.random() >= CLICK_FREE_FRACTION[self.method]:
            prediction = np.zeros_like(truth)
            for _ in range(int(self.rng.integers(1, self.config.max_train_clicks + 1))):
                click = next_click(prediction, truth, self.rng)
                if click is None:
                    break
                clicks.append(Click(click.label, click.voxel))
                maps = click_maps(clicks, truth.shape, self.config.click_sigma_voxels)
                prediction = (self._infer(net, np.concatenate([images, maps])) > 0)[0, 0].cpu().numpy()
        maps = click_maps(clicks, truth.shape, self.config.click_sigma_voxels)
        return lambda: self.loss(net(_tensor(np.concatenate([images, maps]), self.device)), target)

    # -- validation -------------------------------------------------------------------
    def segmenter(self, net: UNet, fold: int) -> Segmenter:
        stages = {"initial": [net]} if self.stage == "initial" else {self.stage: [net]}
        if self.stage == "refinement":
            stages["initial"] = [self.initial_nets[fold]]
        checkpoint = LoadedCheckpoint(
            method=self.method, architecture=self.config.architecture, grid_shape=self.config.grid_shape,
            spacing_mm=self.config.spacing_mm, click_sigma_voxels=self.config.click_sigma_voxels,
            stages=stages, digest="training", description="",
        )
        if self.stage == "refinement":
            return Engine(checkpoint, self.device, autocast=self.config.autocast)
        if self.stage == "initial":
            return NonInteractive(checkpoint, self.device, self.config.autocast)
        return ClickGuided(checkpoint, self.device, self.config.autocast)

    def validate(self, net: UNet, fold: int, cases: Sequence[PreparedCase]) -> float:
        """Mean DSC over 0..val_clicks clicks (0 clicks for an initial net)."""
        net.eval()
        clicks = 0 if self.stage == "initial" else self.config.val_clicks
        segmenter = self.segmenter(net, fold)
        scores = [
            float(np.mean(interaction_curve(segmenter, case, np.random.default_rng([fold, n]), max_clicks=clicks).dsc))
            for n, case in enumerate(cases)
        ]
        net.train()
        return float(np.mean(scores))


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
) -> tuple[list[UNet], list[dict]]:
    trainer = StageTrainer(method, stage, config, device, seed)
    if initial_members is not None:
        trainer.use_initial(initial_members, folds)
    every = sorted({i for fold in folds for i in fold["train"] + fold["val"]})
    torch.manual_seed(seed)
    start = starting_net(stage, config, initial_members)
    if config.base_steps > 0:  # a refinement warm start takes its memories as fold 0 would
        base = fit(trainer, Member(start), 0, [prepared[i] for i in every], [],
                   config.base_steps, state_dir / f"{stage}-base.pt", f"{method} {stage} base")
        start = base.net
    members, reports = [], []
    for index, fold in enumerate(folds):
        steps = config.member_steps or (config.epochs or 1) * len(fold["train"])
        trainer.rng = np.random.default_rng([seed, index])
        member = fit(trainer, Member(copy.deepcopy(start)), index, [prepared[i] for i in fold["train"]],
                     [prepared[i] for i in fold["val"]], steps, state_dir / f"{stage}-{index}.pt",
                     f"{method} {stage} {index + 1}/{len(folds)}")
        members.append(member.net.cpu().eval())
        reports.append({"fold": index, "best_val_dsc": member.best_metric, "history": member.history})
    return members, reports


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
) -> Path:
    """Train every stage of ``method``; writes ``out_dir/weights`` (checkpoint) and ``training.json``."""
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
    for stage in order:
        if stage in stages:
            continue
        stages[stage], reports[stage] = train_stage(
            method, stage, config, folds, prepared, device, seed, state_dir,
            initial_members=stages.get("initial") if stage != "initial" else None,
        )
    stages = {stage: stages[stage] for stage in METHOD_STAGES[method]}
    description = (
        f"{method}, '{config.name}' configuration, {len(ids)} training cases from {data_dir.name}, "
        f"seed {seed}. Command: {command or 'icr train'}"
    )
    weights = out_dir / "weights"
    write_checkpoint(
        weights, stages, method=method, architecture=config.architecture, grid_shape=config.grid_shape,
        spacing_mm=config.spacing_mm, click_sigma_voxels=config.click_sigma_voxels, description=description,
        dtype=getattr(torch, config.save_dtype),
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
    if "initial" not in checkpoint.stages:
        raise ValueError(f"{directory} has no initial stage")
    if checkpoint.grid_shape != config.grid_shape or checkpoint.spacing_mm != config.spacing_mm:
        raise ValueError(f"{directory} was trained on another grid than the '{config.name}' configuration")
    if checkpoint.architecture != config.architecture:
        raise ValueError(f"{directory} holds another network architecture than the '{config.name}' configuration")
    members = checkpoint.stages["initial"]
    if len(members) != folds:
        raise ValueError(f"{directory} has {len(members)} initial members for {folds} folds")
    return members, [{"reused_from": str(directory), "digest": checkpoint.digest}]


# -- command line ---------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    config = CONFIGS[args.config]
    overrides = {k: v for k, v in (("base_steps", args.base_steps), ("member_steps", args.steps),
                                   ("p_drop", args.p_drop), ("folds", args.folds), ("budget", args.budget),
                                   ("lr", args.lr), ("autocast", args.autocast),
                                   ("refinement_from_initial", None if args.refinement_from is None
                                    else args.refinement_from == "initial"),
                                   ("refinement_memory", args.memory_from))
                 if v is not None}
    config = replace(config, **overrides)
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
    )
    print(f"checkpoint written to {weights}")
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
    parser.add_argument("--memory-from", choices=("fold", "held-out"),
                        help="2S-ICR: the first memory of a refinement sample is the output of the fold's own initial "
                        "member (default) or of the initial member that never trained on the case (as at test time)")
    parser.add_argument("--lr", type=float, help="peak learning rate of the cosine schedule (overrides the configuration)")
    parser.add_argument("--p-drop", type=float, help="mask dropout probability for 2S-ICR refinement (default 0.2)")
    parser.add_argument("--initial-from", help="reuse this checkpoint's initial ensemble instead of training one: 2s-icr refines on it "
                        "(frozen), deepgrow/deepedit start from it (reduced configuration)")
    parser.add_argument("--autocast", choices=AUTOCAST_CHOICES,
                        help="mixed-precision forward passes (default: the configuration's, off = float32 except "
                        "paper-cpu's auto; bfloat16 on CPUs with bfloat16 instructions is about 2.5x faster; "
                        "float16 on CUDA uses a gradient scaler)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="CPU threads")
    parser.add_argument("--cache", help="folder for prepared cases (default OUT/cache)")
    parser.set_defaults(run=_run)
