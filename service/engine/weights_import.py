"""Import member checkpoints trained elsewhere as a checkpoint directory the service serves.

A member file is whatever ``torch.save`` wrote for the paper's MONAI ``UNet``: a bare
state_dict, or a dict holding it under ``state_dict`` (PyTorch Lightning), ``model``,
``net`` or ``network``; keys may carry ``module.`` (DataParallel) or ``model.`` (a
wrapping module) prefixes. Every file is read with ``weights_only=True`` and checked
tensor by tensor against the UNet that :func:`~service.engine.networks.build_unet`
builds for its stage (2 input channels initial, 5 refinement) and the given
:class:`~service.engine.networks.Architecture`. Nothing is written unless every member
passes; the written state_dicts hold the very tensors read (same dtype and values),
only unwrapped and with the prefixes removed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from service.engine.checkpoints import (
    STAGE_CHANNELS,
    CheckpointError,
    MemberState,
    sha256_file,
    write_checkpoint,
)
from service.engine.clicks import DEFAULT_SIGMA_VOXELS
from service.engine.networks import PAPER_ARCHITECTURE, Architecture, build_unet

WRAPPER_KEYS = ("state_dict", "model", "net", "network")
PREFIXES = ("module.", "model.")
PAPER_GRID = (144, 144, 144)
LISTED = 3  # keys named per kind of mismatch; the rest are counted


class ImportRefused(CheckpointError):
    """A member checkpoint cannot be imported; the message names the file, the key and the shapes."""


@dataclass(frozen=True)
class ImportPlan:
    """What to import: glob patterns under ``source`` per stage, and the grid the weights were trained on."""

    source: Path
    initial: str
    refinement: str | None = None
    architecture: Architecture = PAPER_ARCHITECTURE
    grid_shape: tuple[int, int, int] = PAPER_GRID
    spacing_mm: float = 1.0
    click_sigma_voxels: float = DEFAULT_SIGMA_VOXELS
    click_overlap: str = "sum"
    click_reach_sigma_voxels: Mapping[str, float] = field(default_factory=dict)
    zero_click_passes: int = 0
    description: str = ""


Shapes = dict[str, tuple[int, ...]]


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in tensor.shape)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in a member file, unwrapped; ImportRefused when there is none."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for damaged or foreign files
        raise ImportRefused(
            f"{path}: not a readable PyTorch checkpoint (corrupt, truncated, or holding objects "
            f"weights_only loading refuses): {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    state = _unwrap(loaded)
    if state is None:
        found = f"a dict with keys {sorted(map(str, loaded))[:8]}" if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ImportRefused(
            f"{path}: no state_dict found; it holds {found}. Expected a state_dict of tensors, "
            f"or one under {', '.join(WRAPPER_KEYS)}"
        )
    return state


def _is_state_dict(value: object) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _unwrap(loaded: object) -> dict[str, torch.Tensor] | None:
    if _is_state_dict(loaded):
        assert isinstance(loaded, Mapping)
        return dict(loaded)
    if isinstance(loaded, Mapping):
        for key in WRAPPER_KEYS:
            if _is_state_dict(loaded.get(key)):
                return dict(loaded[key])
    return None


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes shared by every key until the keys are the UNet's.

    MONAI's own UNet keys begin with ``model.``, so a prefix is removed only while the
    keys do not fit yet; with no exact fit, the candidate closest to the expected keys
    is returned (so the refusal names the keys that really differ).
    """
    candidate, best = state, state
    while set(candidate) != expected:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in candidate)), None)
        if prefix is None:
            return best
        candidate = {k[len(prefix):]: v for k, v in candidate.items()}
        if len(expected & set(candidate)) > len(expected & set(best)):
            best = candidate
    return candidate


def expected_shapes(stage: str, architecture: Architecture) -> Shapes:
    return {k: _shape(v) for k, v in build_unet(STAGE_CHANNELS[stage], architecture).state_dict().items()}


def _listed(keys: list[str], shapes: Mapping[str, tuple[int, ...]]) -> str:
    shown = ", ".join(f"{k} {shapes[k]}" for k in keys[:LISTED])
    return shown + (f" and {len(keys) - LISTED} more" if len(keys) > LISTED else "")


def _input_key(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first convolution's weight, (out, in_channels, k, k, k): with and without residual units."""
    key = next((k for k in ("model.0.conv.unit0.conv.weight", "model.0.conv.weight") if k in state), None)
    return key if key is not None and state[key].ndim == 5 else None


def _stage_problem(path: Path, stage: str, state: Mapping[str, torch.Tensor], expected: Shapes) -> str | None:
    """A wrong input channel count, said as the stage it belongs to."""
    key, want = _input_key(state), STAGE_CHANNELS[stage]
    if key is None or key not in expected:
        return None
    found = int(state[key].shape[1])
    if found == want:
        return None
    other = next((s for s, n in STAGE_CHANNELS.items() if n == found), None)
    which = f"a member of the {other} stage" if other else "not a member of any stage"
    return (f"{path}: key {key}: takes {found} input channels (shape {_shape(state[key])}), "
            f"so {which}; the {stage} stage needs {want} (expected shape {expected[key]})")


def check_member(path: Path, stage: str, state: Mapping[str, torch.Tensor], architecture: Architecture) -> None:
    """ImportRefused naming the first problem: stage, missing/unexpected keys, shapes, dtypes, values."""
    expected = expected_shapes(stage, architecture)
    wrong_stage = _stage_problem(path, stage, state, expected)
    if wrong_stage:
        raise ImportRefused(wrong_stage)
    difference = _key_difference(state, expected) or _shape_difference(state, expected)
    if difference:
        raise ImportRefused(f"{path}: {difference}, for the {stage} UNet {_architecture_text(architecture)}"
                            + _architecture_hint(state, architecture))
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise ImportRefused(f"{path}: key {key}: dtype {tensor.dtype}; a UNet's tensors are floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise ImportRefused(f"{path}: key {key}: holds NaN or infinite values")


def _key_difference(state: Mapping[str, torch.Tensor], expected: Shapes) -> str:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing key{'s' if len(missing) > 1 else ''} {_listed(missing, expected)} (expected shapes)")
    if unexpected:
        found = {k: _shape(v) for k, v in state.items()}
        problems.append(f"unexpected key{'s' if len(unexpected) > 1 else ''} {_listed(unexpected, found)}")
    return "; ".join(problems)


def _shape_difference(state: Mapping[str, torch.Tensor], expected: Shapes) -> str:
    for key, shape in expected.items():
        if _shape(state[key]) != shape:
            return f"key {key}: expected shape {shape}, found {_shape(state[key])}"
    return ""


def _architecture_text(architecture: Architecture) -> str:
    return (f"channels={list(architecture.channels)}, strides={list(architecture.strides)}, "
            f"num_res_units={architecture.num_res_units}")


def _architecture_hint(state: Mapping[str, torch.Tensor], given: Architecture) -> str:
    found = infer_architecture(state)
    if found is None or found == given:
        return ""
    strides = (",".join(map(str, found.strides)) if found.num_res_units
               else "S,... (the training strides: without residual units the tensors do not show them)")
    return (f". These tensors fit channels={list(found.channels)}, num_res_units={found.num_res_units}: import "
            f"with --channels {','.join(map(str, found.channels))} --strides {strides} "
            f"--res-units {found.num_res_units} if that is how they were trained")


def infer_architecture(state: Mapping[str, torch.Tensor]) -> Architecture | None:
    """The Architecture whose UNet has exactly these keys and shapes, if it can be read from them.

    Channels and residual units show in the shapes; a stride shows only in a residual
    unit's shortcut (a 1-voxel kernel or none for stride 1, 3 voxels otherwise, read as
    2), and 2 is assumed where there are no residual units. Returns None unless the guess
    reproduces every key and shape.
    """
    key = _input_key(state)
    if key is None:
        return None
    in_channels = int(state[key].shape[1])
    channels: list[int] = []
    strides: list[int] = []
    level = "model."
    while True:
        bottom = not any(k.startswith(level + "1.submodule.") for k in state)
        block = level if bottom else level + "0."
        units = {k[len(block + "conv."):].split(".")[0] for k in state if k.startswith(block + "conv.unit")}
        weight = state.get(block + "conv.unit0.conv.weight" if units else block + "conv.weight")
        if weight is None or weight.ndim != 5:
            return None
        channels.append(int(weight.shape[0]))
        shortcut = state.get(block + "residual.weight")
        # no residual units: the stride cannot be read; no shortcut conv: same width at stride 1
        strides.append(2 if not units else 1 if shortcut is None or shortcut.shape[-1] == 1 else 2)
        if bottom:
            break
        level += "1.submodule."
    if len(channels) < 2:
        return None
    guess = Architecture(channels=tuple(channels), strides=tuple(strides[:-1]), num_res_units=len(units))
    try:
        shapes = {k: _shape(v) for k, v in build_unet(in_channels, guess).state_dict().items()}
    except (ValueError, AssertionError):
        return None
    return guess if shapes == {k: _shape(v) for k, v in state.items()} else None


def _members(plan: ImportPlan, stage: str, pattern: str) -> list[Path]:
    paths = sorted(p for p in plan.source.glob(pattern) if p.is_file())
    if not paths:
        raise ImportRefused(f"no file under {plan.source} matches the {stage} pattern {pattern!r}")
    return paths


def read_members(plan: ImportPlan) -> dict[str, list[MemberState]]:
    """Every member of every stage, read and checked; ImportRefused on the first that does not fit."""
    patterns = {"initial": plan.initial}
    if plan.refinement is not None:
        patterns["refinement"] = plan.refinement
    paths = {stage: _members(plan, stage, pattern) for stage, pattern in patterns.items()}
    shared = set(paths["initial"]) & set(paths.get("refinement", ()))
    if shared:
        raise ImportRefused(f"{min(shared)} matches both the initial and the refinement pattern")
    stages: dict[str, list[MemberState]] = {}
    for stage, files in paths.items():
        expected = set(expected_shapes(stage, plan.architecture))
        stages[stage] = []
        for path in files:
            state = _strip_prefixes(read_state_dict(path), expected)
            check_member(path, stage, state, plan.architecture)
            # clone: the saved file then holds these tensors alone, not a storage they shared with the source
            provenance = {"source": str(path.resolve()), "source_sha256": sha256_file(path)}
            stages[stage].append(MemberState({k: v.clone() for k, v in state.items()}, provenance))
    return stages


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A fresh path beside ``out`` to build in; renamed to ``out`` (absent or empty) only if the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        yield staging
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def import_weights(plan: ImportPlan, out: Path) -> Path:
    """Check every member, then write the checkpoint directory ``out`` (new or empty); returns its manifest."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ImportRefused(f"{out} exists and is not an empty directory; choose a new --out")
    stages = read_members(plan)
    method = "2s-icr" if "refinement" in stages else "unet"
    if plan.zero_click_passes and method != "2s-icr":
        raise ImportRefused("--zero-click-passes needs refinement members (--refinement)")
    description = plan.description or (
        f"imported from {plan.source.resolve()} by icr weights import "
        f"({', '.join(f'{len(m)} {s}' for s, m in stages.items())} members)"
    )
    with staged_directory(out) as staging:
        write_checkpoint(staging, stages, method=method, architecture=plan.architecture,
                          grid_shape=plan.grid_shape, spacing_mm=plan.spacing_mm,
                          click_sigma_voxels=plan.click_sigma_voxels, click_overlap=plan.click_overlap,
                          click_reach_sigma_voxels=plan.click_reach_sigma_voxels,
                          zero_click_passes=plan.zero_click_passes,
                          description=description)
    return out / "manifest.json"
