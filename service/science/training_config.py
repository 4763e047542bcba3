"""Training configurations: what a run trains, on which grid, with which budget and recipe.

``CONFIGS`` holds the named configurations (``paper``, ``reduced``, ``paper-cpu``,
``tiny``); ``icr train`` overrides single fields from its options.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from service.engine.checkpoints import METHOD_STAGES
from service.engine.clicks import DEFAULT_SIGMA_VOXELS
from service.engine.networks import PAPER_ARCHITECTURE, Architecture

METHODS = tuple(METHOD_STAGES)
MEMORY_SOURCES = ("fold", "held-out", "ensemble")  # where a 2S-ICR refinement sample's first memory comes from
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
    click_overlap: str = "sum"  # how overlapping click balls of one sign combine (clicks.CLICK_OVERLAPS)
    click_reach_sigma_voxels: Mapping[str, float] = field(default_factory=dict)  # per sign (clicks.click_maps)
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
    refinement_memory: str = "fold"  # or "held-out", or "ensemble": the mean of every initial member (MEMORY_SOURCES)
    # A net built from scratch starts by predicting this foreground share everywhere
    # (its output bias is the share's logit, as for detectors' rare classes): with
    # MONAI's zero bias it starts at 0.5, and at a small budget some seeds never left
    # that plateau (docs/results/unet-seed-variance.md). None: MONAI's initialisation.
    output_prior: float | None = 0.01
    # Mixed precision for training and validation (see fastpath.AUTOCAST_CHOICES): the
    # forward passes in this dtype, the loss and the weights in float32; float16 (CUDA)
    # with a gradient scaler. "off": float32 throughout.
    autocast: str = "off"
    # 2S-ICR refinement: weight of an extra BCE term over the voxels within
    # ``click_loss_radius_voxels`` of every click so far (0: the plain Dice + BCE), so
    # that giving each click its label counts for more than its few voxels in the patch.
    click_loss_weight: float = 0.0
    click_loss_radius_voxels: float = 3.0
    # 2S-ICR refinement, "what is right stays right": weight of a BCE term pulling the output
    # towards the memory's mask over the voxels farther than ``keep_loss_radius_mm`` from
    # every click so far (0: none); not where mask dropout hid the memory.
    keep_loss_weight: float = 0.0
    keep_loss_radius_mm: float = 20.0
    # 2S-ICR refinement, a click corrects around itself: when > 0, an interaction's target
    # is the truth within this many mm of any click so far and the memory's mask farther
    # away (the truth everywhere where mask dropout hid the memory). 0: the truth everywhere.
    local_target_mm: float = 0.0
    # 2S-ICR refinement: the chance that an interaction's click is a no-op click
    # (service.science.simulator.no_op_click: background, in the body, far from the memory's
    # mask and the truth) instead of one correcting an error, so the net sees clicks that
    # should change nothing.
    no_op_click_chance: float = 0.0
    # 2S-ICR refinement: each clicked interaction's output passes the service's click rules
    # (service.science.methods.behind_rules: the click guarantee, then what a click may change)
    # before it becomes the next interaction's memory and the mask the next click corrects,
    # so the net trains on the memories a session gives it. False: the raw ensemble output.
    memory_behind_rules: bool = False
    # 2S-ICR: refinement passes with no clicks after the initial ensemble, which make a
    # session's first mask and memory (written into the checkpoint; see
    # service.engine.ensemble.Engine.initial_pass). In training, each refinement sample
    # starts with as many click-free interactions, trained to the truth like the others.
    zero_click_passes: int = 0


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
