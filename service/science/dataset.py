"""Cases on disk, case lists, folds, and the one preprocessing the service also uses.

Layouts read as they come:

- ``hecktor2021`` (and the phantoms): ``<case>_ct.nii.gz``, ``<case>_pt.nii.gz``,
  ``<case>_gtvt.nii.gz`` in one folder, each modality on its own grid;
- ``hecktor2022`` (HECKTOR 2022, which also carries the MD Anderson cases):
  ``imagesTr/<case>__CT.nii.gz``, ``imagesTr/<case>__PT.nii.gz`` and
  ``labelsTr/<case>.nii.gz`` where label 1 is the primary tumour (GTVp = GTVt).

A prepared case is CT and PET run through :func:`service.imaging.grid.preprocess` onto
a working grid centred on the GTVt (as the paper crops its data), with the GTVt
resampled by affine onto the same grid. Prepared cases are cached as ``.npz``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from service.imaging.grid import WorkingGrid, overlap_centre, preprocess, resample
from service.imaging.nifti import load_nifti_file
from service.imaging.volume import Volume


@dataclass(frozen=True)
class Case:
    id: str
    ct: Path
    pet: Path
    gtvt: Path
    gtvt_label: int | None = None  # the label value that is GTVt; None: any non-zero voxel


@dataclass(frozen=True)
class PreparedCase:
    id: str
    images: np.ndarray  # (2, *grid.shape) float32: normalised CT, PET
    truth: np.ndarray  # grid.shape bool: GTVt
    grid: WorkingGrid


def find_cases(data_dir: Path | str) -> list[Case]:
    """Every complete case under ``data_dir``, in either layout, sorted by id."""
    root = Path(data_dir)
    cases = []
    for ct in sorted(root.glob("*_ct.nii.gz")):
        case_id = ct.name[: -len("_ct.nii.gz")]
        pet, gtvt = root / f"{case_id}_pt.nii.gz", root / f"{case_id}_gtvt.nii.gz"
        if pet.exists() and gtvt.exists():
            cases.append(Case(case_id, ct, pet, gtvt))
    for ct in sorted((root / "imagesTr").glob("*__CT.nii.gz")):
        case_id = ct.name[: -len("__CT.nii.gz")]
        pet, label = root / "imagesTr" / f"{case_id}__PT.nii.gz", root / "labelsTr" / f"{case_id}.nii.gz"
        if pet.exists() and label.exists():
            cases.append(Case(case_id, ct, pet, label, gtvt_label=1))
    return sorted(cases, key=lambda c: c.id)


def select(cases: list[Case], ids: list[str]) -> list[Case]:
    by_id = {c.id: c for c in cases}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise KeyError(f"cases not found: {', '.join(missing[:5])}")
    return [by_id[i] for i in ids]


def write_case_list(path: Path, ids: list[str]) -> None:
    path.write_text("".join(f"{i}\n" for i in ids))


def read_case_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def make_folds(ids: list[str], k: int, seed: int) -> list[dict[str, list[str]]]:
    """k folds of a seeded permutation: fold f validates on its slice, trains on the rest."""
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    slices = np.array_split(np.arange(len(order)), k)
    return [
        {"train": sorted(order[i] for i in range(len(order)) if i not in set(part)), "val": sorted(order[i] for i in part)}
        for part in slices
    ]


def write_folds(path: Path, folds: list[dict[str, list[str]]]) -> None:
    path.write_text(json.dumps({"folds": folds}, indent=1) + "\n")


def read_folds(path: Path) -> list[dict[str, list[str]]]:
    return list(json.loads(path.read_text())["folds"])


def _gtvt_volume(case: Case) -> Volume:
    label = load_nifti_file(case.gtvt, role="gtvt")
    mask = label.array == case.gtvt_label if case.gtvt_label is not None else label.array > 0
    return Volume(array=mask.astype(np.float32), affine=label.affine)


def gtvt_centre(gtvt: Volume) -> np.ndarray:
    """World centre (mm) of the GTVt's bounding box (ValueError when empty)."""
    where = np.argwhere(gtvt.array > 0.5)
    if where.size == 0:
        raise ValueError("empty GTVt")
    middle = (where.min(axis=0) + where.max(axis=0)) / 2.0
    return gtvt.affine[:3, :3] @ middle + gtvt.affine[:3, 3]


def prepare_case(case: Case, grid_shape: tuple[int, int, int], spacing_mm: float) -> PreparedCase:
    ct = load_nifti_file(case.ct, role="ct")
    pet = load_nifti_file(case.pet, role="pet")
    gtvt = _gtvt_volume(case)
    try:
        centre = gtvt_centre(gtvt)
    except ValueError:
        centre = overlap_centre(ct, pet)
    grid = WorkingGrid.around(centre, grid_shape, spacing_mm)
    images = preprocess(ct, pet, grid)
    truth = resample(gtvt, grid, order=1, fill=0.0) > 0.5
    return PreparedCase(case.id, images.astype(np.float32), truth, grid)


def load_prepared(
    case: Case, grid_shape: tuple[int, int, int], spacing_mm: float, cache_dir: Path | None = None
) -> PreparedCase:
    """:func:`prepare_case`, cached under ``cache_dir`` keyed by files and grid."""
    if cache_dir is None:
        return prepare_case(case, grid_shape, spacing_mm)
    stamp = "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in (case.ct, case.pet, case.gtvt))
    key = hashlib.sha256(f"{stamp}|{grid_shape}|{spacing_mm}|{case.gtvt_label}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{case.id}-{key}.npz"
    if path.exists():
        with np.load(path) as data:
            grid = WorkingGrid(tuple(data["shape"]), float(data["spacing"]), tuple(data["origin"]))
            return PreparedCase(case.id, data["images"], data["truth"], grid)
    prepared = prepare_case(case, grid_shape, spacing_mm)
    write_whole(path, lambda file: np.savez(
        file, images=prepared.images, truth=prepared.truth,
        shape=np.asarray(prepared.grid.shape), spacing=prepared.grid.spacing_mm, origin=np.asarray(prepared.grid.origin_mm),
    ))
    return prepared


def write_whole(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a temporary file and a rename: readers (other runs sharing
    a folder, a rerun after a crash) see the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with partial.open("wb") as file:
        write(file)
    os.replace(partial, path)
