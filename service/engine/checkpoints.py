"""Checkpoint directories: a manifest plus one plain MONAI UNet state_dict per member.

``manifest.json``::

    {
      "format": "icr-checkpoint/1",
      "method": "2s-icr",
      "architecture": {"channels": [...], "strides": [...], "num_res_units": 2},
      "grid": {"shape": [144, 144, 144], "spacing_mm": 1.0},
      "click_sigma_voxels": 3.0,
      "click_overlap": "sum",
      "click_reach_sigma_voxels": {"foreground": 6.0},
      "zero_click_passes": 1,
      "stages": {
        "initial":    {"in_channels": 2, "members": [{"file": "initial-0.pt", "sha256": "..."}, ...]},
        "refinement": {"in_channels": 5, "members": [...]}
      },
      "description": "free text: data, training command"
    }

``click_overlap`` (absent: "sum", MONAI DeepEdit's guidance signal) is how overlapping click
balls of one sign combine in the click maps (:func:`service.engine.clicks.click_maps`).
``click_reach_sigma_voxels`` (absent: none) gives a click sign a second, wider Gaussian in
its balls (see :mod:`service.engine.clicks`).

``zero_click_passes`` (2S-ICR only; absent: 0, the paper's method) is how many refinement
passes with no clicks follow the initial ensemble to make a session's first mask and first
memory (see :meth:`service.engine.ensemble.Engine.initial_pass`). It is part of what the
weights were validated with, so it lives in the manifest (and its digest), not in a setting.

A member entry may carry provenance next to ``file`` and ``sha256``: ``icr weights
import`` records ``source`` and ``source_sha256``, the file it came from.

``method`` says which stages exist: ``2s-icr`` (initial + refinement) and ``unet``
(initial only), which the service serves (a click on ``unet`` is answered 409), and
the DeepGrow/DeepEdit baselines ``deepgrow``, ``deepedit-25``, ``deepedit-50`` (one
``interactive`` stage taking CT, PET and the two click maps).

Member files are ``torch.save(unet.state_dict())`` (any float dtype; loaded as
float32), read with ``weights_only=True``, so a state_dict of the same MONAI UNet
trained elsewhere loads unchanged. Anything missing, corrupt or mismatched raises
:class:`CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import UNet

from service.engine.clicks import CLICK_OVERLAPS, DEFAULT_SIGMA_VOXELS, ClickEncoding, check_reach
from service.engine.networks import (
    INITIAL_CHANNELS,
    INTERACTIVE_CHANNELS,
    REFINEMENT_CHANNELS,
    Architecture,
    build_unet,
)

FORMAT = "icr-checkpoint/1"
MAX_ZERO_CLICK_PASSES = 4
MANIFEST = "manifest.json"
STAGE_CHANNELS = {"initial": INITIAL_CHANNELS, "refinement": REFINEMENT_CHANNELS, "interactive": INTERACTIVE_CHANNELS}
SERVED_METHODS = ("2s-icr", "unet")  # what an Engine serves: the initial stage, with or without refinement
METHOD_STAGES = {
    "2s-icr": ("initial", "refinement"),
    "unet": ("initial",),
    "deepgrow": ("interactive",),
    "deepedit-25": ("interactive",),
    "deepedit-50": ("interactive",),
}


class CheckpointError(RuntimeError):
    """The checkpoint directory cannot be used; the message says why."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    method: str
    architecture: Architecture
    grid_shape: tuple[int, int, int]
    spacing_mm: float
    click_sigma_voxels: float
    stages: dict[str, list[UNet]]
    digest: str  # sha256 of the manifest: identifies the weights a worker serves
    description: str
    zero_click_passes: int = 0  # refinement passes with no clicks that make the first mask (2S-ICR)
    click_overlap: str = "sum"  # how overlapping click balls of one sign combine (clicks.CLICK_OVERLAPS)
    click_reach_sigma_voxels: Mapping[str, float] = field(default_factory=dict)  # per sign (clicks.click_maps)

    @property
    def click_encoding(self) -> ClickEncoding:
        """The click maps' sigma, overlap and reach: ``click_maps``'s last three arguments."""
        return self.click_sigma_voxels, self.click_overlap, self.click_reach_sigma_voxels


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class MemberState:
    """One member's state_dict as it is saved, and where it came from (recorded in the manifest)."""

    state_dict: dict[str, torch.Tensor]
    provenance: dict[str, str] = field(default_factory=dict)


def write_checkpoint(
    directory: Path,
    stages: Mapping[str, Sequence[UNet | MemberState]],
    *,
    method: str = "2s-icr",
    architecture: Architecture,
    grid_shape: tuple[int, int, int],
    spacing_mm: float = 1.0,
    click_sigma_voxels: float = DEFAULT_SIGMA_VOXELS,
    click_overlap: str = "sum",
    click_reach_sigma_voxels: Mapping[str, float] | None = None,
    zero_click_passes: int = 0,
    description: str = "",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save ensembles in the service's checkpoint format; returns the manifest path.

    A network member is saved as its state_dict in ``dtype``; a :class:`MemberState` is
    saved as it is (its dtype kept) with its provenance in the manifest.
    """
    if set(stages) != set(METHOD_STAGES[method]):
        raise ValueError(f"method {method} needs stages {METHOD_STAGES[method]}, got {sorted(stages)}")
    if zero_click_passes and method != "2s-icr" or not 0 <= zero_click_passes <= MAX_ZERO_CLICK_PASSES:
        raise ValueError(f"zero_click_passes must be 0-{MAX_ZERO_CLICK_PASSES}, and 0 unless the method is 2s-icr; "
                         f"got {zero_click_passes} for {method}")
    if click_overlap not in CLICK_OVERLAPS:
        raise ValueError(f"click_overlap must be one of {', '.join(CLICK_OVERLAPS)}, got {click_overlap!r}")
    if not click_sigma_voxels > 0:  # also refuses nan
        raise ValueError(f"click_sigma_voxels must be a number > 0, got {click_sigma_voxels!r}")
    reach = dict(click_reach_sigma_voxels or {})
    check_reach(reach)
    directory.mkdir(parents=True, exist_ok=True)
    manifest_stages: dict[str, Any] = {}
    for stage, members in stages.items():
        entries = []
        for index, net_or_state in enumerate(members):
            member = net_or_state if isinstance(net_or_state, MemberState) else MemberState(
                {k: v.detach().to("cpu", dtype) for k, v in net_or_state.state_dict().items()})
            path = directory / f"{stage}-{index}.pt"
            torch.save(member.state_dict, path)
            entries.append({"file": path.name, "sha256": sha256_file(path), **member.provenance})
        manifest_stages[stage] = {"in_channels": STAGE_CHANNELS[stage], "members": entries}
    manifest = {
        "format": FORMAT,
        "method": method,
        "architecture": architecture.to_dict(),
        "grid": {"shape": list(grid_shape), "spacing_mm": spacing_mm},
        "click_sigma_voxels": click_sigma_voxels,
        "click_overlap": click_overlap,
        **({"click_reach_sigma_voxels": reach} if reach else {}),
        **({"zero_click_passes": zero_click_passes} if method == "2s-icr" else {}),
        "stages": manifest_stages,
        "description": description,
    }
    target = directory / MANIFEST
    target.write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def _read_manifest(directory: Path) -> tuple[dict[str, Any], str]:
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"no {MANIFEST} in checkpoint directory {directory}")
    text = path.read_bytes()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an {FORMAT} manifest")
    return manifest, hashlib.sha256(text).hexdigest()


def _load_member(directory: Path, stage: str, entry: dict[str, Any], architecture: Architecture) -> UNet:
    path = directory / str(entry.get("file", ""))
    if not path.is_file():
        raise CheckpointError(f"{stage} member file {path} is missing")
    if sha256_file(path) != entry.get("sha256"):
        raise CheckpointError(f"{path} does not match its sha256 in the manifest (corrupt or replaced)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path} is not a readable state_dict: {error}") from error
    net = build_unet(STAGE_CHANNELS[stage], architecture)
    try:
        net.load_state_dict({k: v.float() for k, v in state.items()})
    except (RuntimeError, AttributeError) as error:
        raise CheckpointError(f"{path} does not fit the manifest's {stage} architecture: {error}") from error
    return net.eval()


def load_checkpoint(directory: Path | str, *, method: str | tuple[str, ...] | None = "2s-icr") -> LoadedCheckpoint:
    """Load and verify a checkpoint; ``method`` is the one (or ones) the caller needs (None: any)."""
    directory = Path(directory)
    manifest, digest = _read_manifest(directory)
    found = manifest.get("method", "2s-icr")
    if found not in METHOD_STAGES:
        raise CheckpointError(f"{directory / MANIFEST} names an unknown method {found!r}")
    needed = (method,) if isinstance(method, str) else method
    if needed is not None and found not in needed:
        raise CheckpointError(f"{directory} holds a {found} checkpoint; a {' or '.join(needed)} checkpoint is needed")
    try:
        architecture = Architecture.from_dict(manifest["architecture"])
        shape = tuple(int(n) for n in manifest["grid"]["shape"])
        spacing = float(manifest["grid"]["spacing_mm"])
        sigma = float(manifest.get("click_sigma_voxels", DEFAULT_SIGMA_VOXELS))
        zero_click_passes = manifest.get("zero_click_passes", 0)
        overlap = manifest.get("click_overlap", "sum")
        reach = manifest.get("click_reach_sigma_voxels", {})
        stage_entries = {stage: manifest["stages"][stage] for stage in METHOD_STAGES[found]}
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{directory / MANIFEST} lacks a valid field: {error}") from error
    if len(shape) != 3 or min(shape) < 1 or spacing <= 0:
        raise CheckpointError(f"{directory / MANIFEST} has an invalid grid {manifest['grid']}")
    if type(zero_click_passes) is not int or not 0 <= zero_click_passes <= MAX_ZERO_CLICK_PASSES or (
            zero_click_passes and found != "2s-icr"):
        raise CheckpointError(f"{directory / MANIFEST}: zero_click_passes must be an integer 0-{MAX_ZERO_CLICK_PASSES} "
                              f"(and 0 unless the method is 2s-icr), got {zero_click_passes!r}")
    if overlap not in CLICK_OVERLAPS:
        raise CheckpointError(f"{directory / MANIFEST}: click_overlap must be one of {', '.join(CLICK_OVERLAPS)}, "
                              f"got {overlap!r}")
    if not sigma > 0:  # also refuses nan
        raise CheckpointError(f"{directory / MANIFEST}: click_sigma_voxels must be a number > 0, got {sigma!r}")
    try:
        check_reach(reach)
    except ValueError as error:
        raise CheckpointError(f"{directory / MANIFEST}: click_reach_sigma_voxels: {error}") from error
    stages: dict[str, list[UNet]] = {}
    for stage, entry in stage_entries.items():
        if entry.get("in_channels") != STAGE_CHANNELS[stage]:
            raise CheckpointError(f"{stage} stage must take {STAGE_CHANNELS[stage]} input channels")
        members = entry.get("members") or []
        if not members:
            raise CheckpointError(f"{stage} stage lists no members")
        stages[stage] = [_load_member(directory, stage, m, architecture) for m in members]
    return LoadedCheckpoint(
        method=found,
        architecture=architecture,
        grid_shape=(shape[0], shape[1], shape[2]),
        spacing_mm=spacing,
        click_sigma_voxels=sigma,
        click_overlap=overlap,
        click_reach_sigma_voxels={sign: float(value) for sign, value in reach.items()},
        zero_click_passes=zero_click_passes,
        stages=stages,
        digest=digest,
        description=str(manifest.get("description", "")),
    )
