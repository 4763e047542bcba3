"""Export a checkpoint directory as a MONAI Bundle, for MONAI Deploy and MONAI Label users.

Layout (made by MONAI's own ``init_bundle``)::

    configs/metadata.json   versions, task, network_data_format of both stages
    configs/inference.json  ``network_def`` (the initial UNet), ``refinement_network_def``,
                            the member files of each stage, grid and click sigma
    models/model.pt         the first initial member: what single-network tools load
    models/<stage>-<n>.pt   every member, byte for byte as in the checkpoint directory
    docs/README.md          the input contract and how to run the ensemble
    LICENSE

The configs build the networks and name the weights; the preprocessing (resampling
onto the grid, CT window, PET z-score) and the ensemble mean are described in the
README rather than written as a MONAI pipeline, so the bundle states exactly what the
service computes instead of approximating it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.bundle import init_bundle

from service.engine.checkpoints import (
    MANIFEST,
    SERVED_METHODS,
    STAGE_CHANNELS,
    LoadedCheckpoint,
    load_checkpoint,
)
from service.engine.networks import Architecture
from service.engine.weights_import import staged_directory
from service.imaging.grid import CT_WINDOW_HU

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
CHANNEL_NAMES = {
    0: f"CT: HU windowed to [{CT_WINDOW_HU[0]:g}, {CT_WINDOW_HU[1]:g}] and scaled to [-1, 1]",
    1: "PET: SUV, z-scored over the grid",
    2: "previous probability: the last ensemble output (0.5 where unknown)",
    3: "positive clicks: Gaussian-smoothed balls, min-max scaled to [0, 1]",
    4: "negative clicks: Gaussian-smoothed balls, min-max scaled to [0, 1]",
}


class BundleError(RuntimeError):
    """The bundle cannot be written; the message says why."""


def _network_def(in_channels: int, architecture: Architecture) -> dict[str, Any]:
    return {
        "_target_": "monai.networks.nets.UNet",
        "spatial_dims": 3,
        "in_channels": in_channels,
        "out_channels": 1,
        "channels": list(architecture.channels),
        "strides": list(architecture.strides),
        "num_res_units": architecture.num_res_units,
    }


def _data_format(in_channels: int, grid_shape: tuple[int, int, int]) -> dict[str, Any]:
    shape = list(grid_shape)
    return {
        "inputs": {"image": {
            "type": "image", "format": "magnitude", "modality": "CT+PET", "num_channels": in_channels,
            "spatial_shape": shape, "dtype": "float32", "value_range": [], "is_patch_data": False,
            "channel_def": {str(c): CHANNEL_NAMES[c] for c in range(in_channels)},
        }},
        "outputs": {"pred": {
            "type": "image", "format": "segmentation", "num_channels": 1, "spatial_shape": shape,
            "dtype": "float32", "value_range": [], "is_patch_data": False,
            "channel_def": {"0": "GTVt logit: sigmoid, mean over the stage's members, > 0.5 is the mask"},
        }},
    }


def _metadata(checkpoint: LoadedCheckpoint, version: str, authors: str) -> dict[str, Any]:
    stages = ", ".join(f"{len(m)} {s}" for s, m in checkpoint.stages.items())
    metadata: dict[str, Any] = {
        "schema": SCHEMA,
        "version": version,
        "changelog": {version: f"exported from icr checkpoint {checkpoint.digest}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {},
        "task": "Primary tumour (GTVt) segmentation in head-and-neck FDG-PET/CT, refined by clicks (2S-ICR)",
        "description": f"A {checkpoint.method} ensemble ({stages} members) of MONAI 3D UNets. "
                       f"{checkpoint.description}".strip(),
        "authors": authors,
        "copyright": f"Copyright (c) {authors}",
        "intended_use": "Research. Not a medical device; a clinic validates its own weights (docs/README.md).",
        "data_type": "nifti",
        "image_classes": "CT and PET, resampled onto one isotropic grid",
        "label_classes": "single channel: GTVt",
        "pred_classes": "single channel: GTVt",
        "icr_checkpoint_digest": checkpoint.digest,
        "icr_method": checkpoint.method,
        "network_data_format": _data_format(STAGE_CHANNELS["initial"], checkpoint.grid_shape),
    }
    if "refinement" in checkpoint.stages:
        metadata["refinement_network_data_format"] = _data_format(STAGE_CHANNELS["refinement"], checkpoint.grid_shape)
    return metadata


def _inference(checkpoint: LoadedCheckpoint, files: dict[str, list[str]]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "network_def": _network_def(STAGE_CHANNELS["initial"], checkpoint.architecture),
        "network": "$@network_def.to(@device)",
        "initial_members": [f"$@bundle_root + '/models/{name}'" for name in files["initial"]],
        "grid_shape": list(checkpoint.grid_shape),
        "spacing_mm": checkpoint.spacing_mm,
        "click_sigma_voxels": checkpoint.click_sigma_voxels,
        "click_overlap": checkpoint.click_overlap,
        "click_reach_sigma_voxels": dict(checkpoint.click_reach_sigma_voxels),
    }
    if "refinement" in files:
        config["refinement_network_def"] = _network_def(STAGE_CHANNELS["refinement"], checkpoint.architecture)
        config["refinement_members"] = [f"$@bundle_root + '/models/{name}'" for name in files["refinement"]]
        config["zero_click_passes"] = checkpoint.zero_click_passes
    return config


def _readme(checkpoint: LoadedCheckpoint, files: dict[str, list[str]]) -> str:
    shape = "x".join(map(str, checkpoint.grid_shape))
    stages = "\n".join(f"- {stage} ({STAGE_CHANNELS[stage]} input channels): "
                       + ", ".join(f"`models/{f}`" for f in names) for stage, names in files.items())
    channels = "\n".join(f"{c}. {CHANNEL_NAMES[c]}" for c in range(STAGE_CHANNELS["refinement"]))
    refinement = ("" if "refinement" in files else
                  "\nThis bundle has no refinement stage: it gives the automatic mask only.\n")
    return f"""# 2S-ICR GTVt ensemble ({checkpoint.method})

Exported by `icr weights export` from checkpoint `{checkpoint.digest}`.
{checkpoint.description}

## Networks
`configs/inference.json` builds each stage's MONAI `UNet` (`network_def`, `refinement_network_def`)
and lists its member state_dicts:

{stages}

`models/model.pt` is a copy of the first initial member, for tools that load one network.
{refinement}
## Input ({shape} voxels at {checkpoint.spacing_mm:g} mm, isotropic, axis-aligned with RAS)
CT and PET resampled by their affines onto one grid around the region of interest, then:

{channels}

The initial stage takes channels 0-1; the refinement stage takes 0-4, with all clicks so far
(sigma {checkpoint.click_sigma_voxels:g} voxels, as MONAI's DeepGrow `AddGuidanceSignald`{_overlap_text(checkpoint)}).\
{_reach_text(checkpoint)}\
{_zero_click_text(checkpoint)}

## Output
Each member gives one logit channel; the stage's probability is the mean of the members'
sigmoids, and the mask is probability > 0.5.

## Loading one member with MONAI

```python
import torch
from monai.bundle import ConfigParser

parser = ConfigParser()
parser.read_config("configs/inference.json")
net = parser.get_parsed_content("network_def")
net.load_state_dict(torch.load("models/initial-0.pt", weights_only=True))
```

## Serving with 2S-ICR
This command turns the bundle back into a checkpoint directory for `ICR_WEIGHTS=DIR icr serve`:

```
{_import_command(checkpoint, files)}
```
"""


def _overlap_text(checkpoint: LoadedCheckpoint) -> str:
    if checkpoint.click_overlap == "sum":
        return ""
    return (", except that where two clicks' Gaussians overlap the larger is kept instead of their sum, "
            "so every click peaks at 1 after scaling: `click_overlap` \"max\" in `configs/inference.json`")


def _reach_text(checkpoint: LoadedCheckpoint) -> str:
    reach = checkpoint.click_reach_sigma_voxels
    if not reach:
        return ""
    signs = ", ".join(f"each {sign} click's ball is the mean of that Gaussian and one of sigma {sigma:g} voxels"
                      for sign, sigma in reach.items())
    return (f"\nWith a reach ({signs}), both scaled to peak 1 before the maps are scaled "
            "(`click_reach_sigma_voxels` in `configs/inference.json`).")


def _zero_click_text(checkpoint: LoadedCheckpoint) -> str:
    passes = checkpoint.zero_click_passes
    if not passes:
        return ""
    return (f"\nThe first mask (and the first memory) is the initial stage's probability followed by {passes} "
            "refinement pass(es) with empty click maps, each on the previous one's output "
            "(`zero_click_passes` in `configs/inference.json`).")


def _import_command(checkpoint: LoadedCheckpoint, files: dict[str, list[str]]) -> str:
    architecture = checkpoint.architecture
    stages = " ".join(f"--{stage} '{stage}-*.pt'" for stage in files)
    return (f"icr weights import BUNDLE/models --out DIR {stages} "
            f"--channels {','.join(map(str, architecture.channels))} "
            f"--strides {','.join(map(str, architecture.strides))} --res-units {architecture.num_res_units} "
            f"--grid {','.join(map(str, checkpoint.grid_shape))} --spacing {checkpoint.spacing_mm:g} "
            f"--click-sigma {checkpoint.click_sigma_voxels:g}"
            + (f" --click-overlap {checkpoint.click_overlap}" if checkpoint.click_overlap != "sum" else "")
            + "".join(f" --click-reach {sign}={sigma:g}" for sign, sigma in checkpoint.click_reach_sigma_voxels.items())
            + (f" --zero-click-passes {checkpoint.zero_click_passes}" if checkpoint.zero_click_passes else ""))


def _member_files(directory: Path) -> dict[str, list[str]]:
    manifest = json.loads((directory / MANIFEST).read_text())
    return {stage: [str(m["file"]) for m in entry["members"]] for stage, entry in manifest["stages"].items()}


def export_bundle(directory: Path, out: Path, *, version: str = "0.1.0", authors: str = "unknown") -> Path:
    """Write ``directory`` (a checkpoint the service serves) as the MONAI Bundle ``out``; returns ``out``."""
    if out.exists():
        raise BundleError(f"{out} exists; choose a new --bundle folder")
    checkpoint = load_checkpoint(directory, method=SERVED_METHODS)  # verifies every member's sha256
    files = {stage: names for stage, names in _member_files(directory).items() if stage in checkpoint.stages}
    with staged_directory(out) as staging:
        init_bundle(staging, ckpt_file=directory / files["initial"][0],
                    metadata_str=_metadata(checkpoint, version, authors),
                    inference_str=_inference(checkpoint, files))
        for names in files.values():
            for name in names:
                shutil.copyfile(directory / name, staging / "models" / name)
        (staging / "docs" / "README.md").write_text(_readme(checkpoint, files))
        (staging / "LICENSE").write_text(
            "The license of these weights is set by whoever trained them; state it here before sharing.\n")
    return out
