"""One training sample's optimisation steps, per stage, and the validation that selects a member.

:class:`StageTrainer` draws an augmented sample and returns its loss closures: one for
an initial net or a DeepGrow/DeepEdit net (clicks simulated without gradients first,
as MONAI's DeepEdit), 1-``max_train_clicks`` for a 2S-ICR refinement net (an
interaction each: simulated click on the last output, mask dropout, a forward pass on
that memory). It also validates a member by the evaluation protocol's simulated user.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from service.engine.checkpoints import LoadedCheckpoint
from service.engine.clicks import ClickEncoding, click_balls, click_maps
from service.engine.ensemble import Engine
from service.engine.fastpath import autocast_dtype
from service.engine.guarantee import honour_radius_voxels
from service.science.augment import augmented_sample, training_transforms
from service.science.dataset import PreparedCase
from service.science.evaluation import interaction_curve
from service.science.methods import ClickGuided, Guaranteed, NonInteractive, Segmenter, behind_rules
from service.science.simulator import body_mask, next_click, no_op_click
from service.science.training_config import CLICK_FREE_FRACTION, MEMORY_SOURCES, TrainConfig
from service.store.contract import Click


def _loss() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Dice + BCE on the logits, in float32 whatever the forward pass computed in."""
    loss = DiceCELoss(sigmoid=True, lambda_dice=1.0, lambda_ce=1.0)
    return lambda logits, target: loss(logits.float(), target)


def _ball_bce(logits: torch.Tensor, target: torch.Tensor, balls: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the voxels of ``balls`` (a 0/1 mask: the click balls, or the voxels far from them), float32."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (bce * balls).sum() / balls.sum().clamp(min=1.0)


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
        self.peer_nets: list[UNet] = []  # frozen refinement members, one per fold, that each member trains beside
        self.precision = autocast_dtype(config.autocast, device)
        if config.refinement_memory not in MEMORY_SOURCES:
            raise ValueError(f"refinement memory comes from one of {', '.join(MEMORY_SOURCES)}, "
                             f"not {config.refinement_memory!r}")

    @property
    def encoding(self) -> ClickEncoding:
        """The click maps' sigma, overlap and reach (``click_maps``'s last three arguments)."""
        return self.config.click_sigma_voxels, self.config.click_overlap, self.config.click_reach_sigma_voxels

    def reduced_precision(self) -> torch.autocast:
        """The forward passes' autocast context (a no-op for float32 training)."""
        return torch.autocast(self.device.type, dtype=self.precision, enabled=self.precision is not None)

    def _infer(self, net: UNet, inputs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A gradient-free pass (frozen initial net or peers, simulated clicks) in the training precision;
        float32 logits. ``inputs`` as an array, or already a tensor on the device."""
        if isinstance(inputs, np.ndarray):
            inputs = _tensor(inputs, self.device)
        with torch.inference_mode(), self.reduced_precision():
            return net(inputs).float()

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
            return self._refinement_steps(net, self.memory_nets(case_id, fold), self.peers(fold), images, truth, target)
        return [self._click_guided_step(net, images, truth, target)]

    def use_initial(self, members: Sequence[UNet], folds: Sequence[dict[str, list[str]]]) -> None:
        """The frozen initial ensemble (one member per fold) that refinement samples start from."""
        self.initial_nets = {f: net.to(self.device).eval() for f, net in enumerate(members)}
        self.held_out_by = {case_id: f for f, fold in enumerate(folds) for case_id in fold["val"]}

    def use_peers(self, members: Sequence[UNet]) -> None:
        """Frozen refinement members (one per fold): each member trains inside an ensemble of itself and
        the other folds' peers, whose mean output is every interaction's memory, as at test time."""
        self.peer_nets = [net.to(self.device).eval() for net in members]

    def peers(self, fold: int) -> list[UNet]:
        """The peers that member ``fold`` trains beside: every fold's but its own."""
        return [net for f, net in enumerate(self.peer_nets) if f != fold]

    def memory_nets(self, case_id: str, fold: int) -> list[UNet]:
        """The frozen initial members whose mean output is a refinement sample's first memory: the fold's
        own, the one that never trained on the case, or all of them (the ensemble, as at test time)."""
        if self.config.refinement_memory == "ensemble":
            return list(self.initial_nets.values())
        if self.config.refinement_memory == "held-out":
            return [self.initial_nets[self.held_out_by.get(case_id, fold)]]
        return [self.initial_nets[fold]]

    def _refinement_steps(
        self, net: UNet, initial: Sequence[UNet], peers: Sequence[UNet], images: np.ndarray, truth: np.ndarray,
        target: torch.Tensor,
    ) -> list[Callable[[], torch.Tensor]]:
        """The checkpoint's zero-click passes, then 1-15 clicked interactions; each is a
        forward/backward on the last output (memory): the member's own, or with ``peers`` the
        mean of the member's and theirs on the same inputs (the ensemble's, whose mask the
        next click corrects); with ``memory_behind_rules`` that output after the service's click
        rules over the last memory (the real one, also where mask dropout hid it from the net)."""
        first = np.mean([torch.sigmoid(self._infer(member, images))[0, 0].cpu().numpy() for member in initial], axis=0)
        state = {"previous": first.astype(np.float32)}
        click_free = [self.config.zero_click_passes]  # interactions left before the first click
        clicks: list[Click] = []
        interactions = self.config.zero_click_passes + int(self.rng.integers(1, self.config.max_train_clicks + 1))

        def interaction() -> torch.Tensor:
            click = None
            if click_free[0] > 0:
                click_free[0] -= 1
            else:
                click = self._training_click(state["previous"] > 0.5, images, truth)
            if click is not None:
                clicks.append(Click(click.label, click.voxel))
            memory = state["previous"]
            dropped = self.rng.random() < self.config.p_drop
            if dropped:  # mask dropout: no memory this time
                memory = np.full_like(memory, 0.5)
            maps = click_maps(clicks, truth.shape, *self.encoding)
            inputs = _tensor(np.concatenate([images, memory[None], maps]), self.device)  # once, for the peers too
            logits = net(inputs)
            outputs = [torch.sigmoid(logits.detach().float())] + [torch.sigmoid(self._infer(p, inputs)) for p in peers]
            output = torch.stack(outputs).mean(dim=0)[0, 0].cpu().numpy()
            if self.config.memory_behind_rules and click is not None:
                spacing = self.config.spacing_mm
                output = behind_rules(output, state["previous"], clicks, 1, honour_radius_voxels(spacing), spacing)
            state["previous"] = output
            wanted = target
            if self.config.local_target_mm > 0 and not dropped:
                near = click_balls(clicks, truth.shape, self.config.local_target_mm / self.config.spacing_mm)
                wanted = _tensor(np.where(near, truth, memory > 0.5)[None].astype(np.float32), self.device)
            loss = self.loss(logits, wanted)
            if self.config.click_loss_weight > 0 and clicks:
                balls = _tensor(click_balls(clicks, truth.shape, self.config.click_loss_radius_voxels)[None], self.device)
                loss = loss + self.config.click_loss_weight * _ball_bce(logits, target, balls)
            if self.config.keep_loss_weight > 0 and not dropped:
                radius = self.config.keep_loss_radius_mm / self.config.spacing_mm
                far = _tensor((~click_balls(clicks, truth.shape, radius))[None], self.device)
                kept = _tensor((memory > 0.5)[None].astype(np.float32), self.device)
                loss = loss + self.config.keep_loss_weight * _ball_bce(logits, kept, far)
            return loss

        return [interaction] * interactions

    def _training_click(self, mask: np.ndarray, images: np.ndarray, truth: np.ndarray) -> Click | None:
        """The simulated user's click on ``mask``; with ``no_op_click_chance``, a no-op click instead."""
        if self.config.no_op_click_chance > 0 and self.rng.random() < self.config.no_op_click_chance:
            click = no_op_click(mask, truth, body_mask(images[0]), self.config.spacing_mm)
            if click is not None:
                return click
        return next_click(mask, truth, self.rng)

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
                maps = click_maps(clicks, truth.shape, *self.encoding)
                prediction = (self._infer(net, np.concatenate([images, maps])) > 0)[0, 0].cpu().numpy()
        maps = click_maps(clicks, truth.shape, *self.encoding)
        return lambda: self.loss(net(_tensor(np.concatenate([images, maps]), self.device)), target)

    # -- validation -------------------------------------------------------------------
    def segmenter(self, net: UNet, fold: int) -> Segmenter:
        stages = {"initial": [net]} if self.stage == "initial" else {self.stage: [net]}
        if self.stage == "refinement":
            stages["initial"] = [self.initial_nets[fold]]
            stages["refinement"] = [net, *self.peers(fold)]
        checkpoint = LoadedCheckpoint(
            method=self.method, architecture=self.config.architecture, grid_shape=self.config.grid_shape,
            spacing_mm=self.config.spacing_mm, click_sigma_voxels=self.config.click_sigma_voxels,
            click_overlap=self.config.click_overlap, click_reach_sigma_voxels=self.config.click_reach_sigma_voxels,
            stages=stages, digest="training", description="",
            zero_click_passes=self.config.zero_click_passes if self.stage == "refinement" else 0,
        )
        if self.stage == "refinement":
            engine = Engine(checkpoint, self.device, autocast=self.config.autocast)
            if not self.config.memory_behind_rules:
                return engine
            spacing = self.config.spacing_mm
            return Guaranteed(engine, honour_radius_voxels(spacing), spacing)  # validated as trained
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
