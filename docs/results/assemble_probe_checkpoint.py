"""Assemble a probe checkpoint: an initial ensemble (the shipped one unless ``--initial``) and chosen
refinement members.

Usage: ``python docs/results/assemble_probe_checkpoint.py OUT [--initial CHECKPOINT] [--zero-click-passes N]
MEMBER...`` where MEMBER is ``shipped:K`` (the shipped refinement member K) or a training state file
(``RUN/state/refinement-K.pt``, whose best state is used); ``--initial`` takes the initial members of
another checkpoint (e.g. ``icr train --method unet``'s weights). Float16, as the shipped weights.
"""

import sys
from pathlib import Path

import torch

from service.engine.checkpoints import STAGE_CHANNELS, load_checkpoint, write_checkpoint
from service.engine.networks import build_unet

shipped = load_checkpoint("service/weights/demo")
specs = sys.argv[2:]
initial = shipped
if specs[:1] == ["--initial"]:
    initial, specs = load_checkpoint(specs[1], method=None), specs[2:]
zero_click_passes = 0
if specs[:1] == ["--zero-click-passes"]:
    zero_click_passes, specs = int(specs[1]), specs[2:]
members = []
for spec in specs:
    if spec.startswith("shipped:"):
        members.append(shipped.stages["refinement"][int(spec.split(":")[1])])
    else:
        net = build_unet(STAGE_CHANNELS["refinement"], shipped.architecture)
        saved = torch.load(spec, map_location="cpu", weights_only=False)
        net.load_state_dict(saved["best_state"] or saved["net"])
        print(spec, "step", saved["step"], "best", saved["best_metric"])
        members.append(net.eval())
write_checkpoint(Path(sys.argv[1]), {"initial": initial.stages["initial"], "refinement": members},
                 architecture=shipped.architecture, grid_shape=shipped.grid_shape, spacing_mm=shipped.spacing_mm,
                 click_sigma_voxels=shipped.click_sigma_voxels, zero_click_passes=zero_click_passes,
                 description=f"probe: {' '.join(sys.argv[2:])}",
                 dtype=torch.float16)
print(load_checkpoint(sys.argv[1]).digest)
