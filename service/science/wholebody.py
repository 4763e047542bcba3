"""Synthetic whole-body (head-to-thigh) FDG PET-CT cases in the HECKTOR file layout.

A clinical head-and-neck PET-CT covers the patient from the vertex to the thighs
(800-1000 mm). These cases keep the head-and-neck model of :mod:`service.science.phantoms`
(same world frame: z = 0 near the oropharynx, superior positive; the same renderer, noise
and partial volume) and add the trunk below it: lungs, heart with a myocardium of variable
uptake, liver, spleen, kidneys with urine in the collecting system, patchy bowel, the
bladder, pelvic bones and the thighs. The primary tumour (GTVt) sits on the oropharyngeal
wall at a varied level and side, with a volume drawn log-uniformly from about 1 to 200 ml;
lymph nodes (and, optionally, one bulky node) are FDG-avid but are not GTVt.

Everything is seeded: the same seed gives the same files. ``scale`` coarsens both grids
(2 means twice the voxel size on each axis, an eighth of the voxels) for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from service.science.phantoms import (
    BodyOutline,
    Ellipsoid,
    Grid,
    HeadNeckAnatomy,
    PhantomCase,
    Spine,
    Tumour,
    UptakeOrgan,
    Vector3,
    _render_ct,
    _render_pet,
    case_seed,
    sample_anatomy,
    save_case,
)

WHOLE_BODY_CT_SPACING_MM: Vector3 = (0.98, 0.98, 3.0)
WHOLE_BODY_PET_SPACING_MM: Vector3 = (4.0, 4.0, 4.0)
CT_IN_PLANE_EXTENT_MM = (280.0, 210.0)  # the trunk is ~250 mm wide; the head ~180 mm deep
PET_IN_PLANE_EXTENT_MM = (300.0, 230.0)
HEIGHT_RANGE_MM = (800.0, 1000.0)
TUMOUR_VOLUME_RANGE_ML = (1.0, 200.0)
LOBULATION = 1.25  # a lobulated, rippled tumour holds about this much more than its main ellipsoid


@dataclass(frozen=True)
class WholeBodyOutline(BodyOutline):
    """The head-and-neck skin surface, capped over the vertex and split into two thighs below the hips."""

    vertex_centre: Vector3
    vertex_semi_axes: Vector3
    hip_z: float
    thigh_x: float
    thigh_semi_axes: tuple[float, float]

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, inset_mm: float = 0.0) -> np.ndarray:
        with np.errstate(over="ignore"):  # the logistic transitions saturate far from the neck
            trunk = super().contains(x, y, z, inset_mm)
        cx, cy, cz = self.vertex_centre
        ax, ay, az = (a - inset_mm for a in self.vertex_semi_axes)
        head = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0
        tx, ty = (a - inset_mm for a in self.thigh_semi_axes)
        thighs = ((np.abs(x) - self.thigh_x) / tx) ** 2 + (y / ty) ** 2 <= 1.0
        return np.where(z > cz, head, np.where(z < self.hip_z, thighs, trunk))


@dataclass(frozen=True)
class TruncatedSpine(Spine):
    """The spine ending at the sacrum instead of running on below the hips."""

    bottom_z: float

    def _levels(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        in_range, body_r2, canal_r2 = super()._levels(x, y, z)
        return in_range & (z >= self.bottom_z), body_r2, canal_r2


@dataclass(frozen=True)
class WholeBodyAnatomy:
    """One patient: the head-and-neck model (trunk organs included) and the scanned range."""

    anatomy: HeadNeckAnatomy
    top_z: float
    height_mm: float
    second_lesion: UptakeOrgan | None


def _organ(name: str, centre: Vector3, semi_axes: Vector3, hu: float, suv: float) -> UptakeOrgan:
    return UptakeOrgan(name, Ellipsoid(centre, semi_axes), hu, suv)


def _trunk_organs(rng: np.random.Generator, shoulder_z: float, bone_hu: float) -> tuple[UptakeOrgan, ...]:
    """Trunk organs below the shoulders, listed in painting order (later ones overwrite)."""
    s = shoulder_z
    u = rng.uniform
    organs = [
        _organ("lung", (-60.0, -8.0, s - 110.0), (45.0, 45.0, 120.0), u(-880, -820), u(0.3, 0.6)),
        _organ("lung", (60.0, -8.0, s - 110.0), (45.0, 45.0, 120.0), u(-880, -820), u(0.3, 0.6)),
        _organ("myocardium", (15.0, 15.0, s - 160.0), (50.0, 42.0, 50.0), u(35, 45), u(1.5, 12.0)),
        _organ("blood_pool", (15.0, 15.0, s - 160.0), (37.0, 30.0, 37.0), u(35, 45), u(1.4, 2.2)),
        _organ("liver", (-45.0, 5.0, s - 285.0), (80.0, 55.0, 70.0), u(50, 65), u(1.8, 2.8)),
        _organ("spleen", (70.0, -25.0, s - 270.0), (25.0, 25.0, 45.0), u(40, 50), u(1.6, 2.4)),
    ]
    for side in (-1.0, 1.0):
        centre = (side * 60.0, -38.0, s - 345.0 + u(-10, 10))
        organs.append(_organ("kidney", centre, (24.0, 20.0, 48.0), u(30, 40), u(2.5, 4.0)))
        organs.append(_organ("renal_pelvis", centre, (9.0, 8.0, 22.0), u(0, 15), u(4.0, 25.0)))
    for _ in range(int(rng.integers(18, 30))):  # bowel loops: patchy uptake, some gas-filled
        gas = rng.random() < 0.2
        centre = (u(-85, 85), u(-5, 40), u(s - 480, s - 380))
        organs.append(_organ("bowel", centre, tuple(u(10, 22, 3)), u(-700, -400) if gas else u(10, 35),
                             u(0.3, 0.8) if gas else u(1.2, 5.0)))
    for side in (-1.0, 1.0):
        organs.append(_organ("ilium", (side * 75.0, -15.0, s - 470.0), (40.0, 14.0, 45.0), bone_hu, u(0.8, 1.2)))
        organs.append(_organ("femur", (side * 85.0, 0.0, s - 800.0), (13.0, 13.0, 260.0), bone_hu, u(0.6, 1.0)))
    organs.append(_organ("bladder", (0.0, 30.0, s - 520.0), tuple(u(25, 45, 3)), u(0, 15), u(8.0, 50.0)))
    return tuple(organs)


def _resized_tumour(tumour: Tumour, volume_ml: float, airway_xy: np.ndarray) -> Tumour:
    """The tumour scaled to about ``volume_ml``, moved along its direction from the airway so it still abuts the wall."""
    main = tumour.lobes[0]
    radius = float(np.cbrt(np.prod(main.semi_axes)))
    target = (3.0 * volume_ml * 1000.0 / (4.0 * math.pi * LOBULATION)) ** (1.0 / 3.0)
    factor = target / radius
    old_centre = np.asarray(main.centre)
    direction = old_centre[:2] - airway_xy
    gap = float(np.linalg.norm(direction))
    direction = direction / max(gap, 1e-6)
    shift = np.zeros(3)
    shift[:2] = direction * 0.6 * radius * (factor - 1.0)
    new_centre = old_centre + shift
    lobes = tuple(Ellipsoid(tuple(new_centre + (np.asarray(lobe.centre) - old_centre) * factor),
                            tuple(np.asarray(lobe.semi_axes) * factor))
                  for lobe in tumour.lobes)
    necrosis = None
    if tumour.necrosis is not None:
        necrosis = Ellipsoid(tuple(new_centre), tuple(np.asarray(tumour.necrosis.semi_axes) * factor))
    return replace(tumour, lobes=lobes, necrosis=necrosis)


def _second_lesion(rng: np.random.Generator, tumour: Tumour, neck_x: float,
                   soft_tissue_hu: float) -> UptakeOrgan | None:
    """One bulky FDG-avid neck node (level II-III), clear of the tumour; None if none fits."""
    low, high = (np.asarray(b) for b in tumour.bounds())
    for _ in range(50):
        radius = rng.uniform(10.0, 18.0)
        centre = np.array([rng.choice([-1.0, 1.0]) * rng.uniform(28.0, max(30.0, neck_x - radius)),
                           rng.uniform(-10.0, 15.0), rng.uniform(-70.0, -25.0)])
        gap = np.maximum(low - centre, 0) + np.maximum(centre - high, 0)
        if np.linalg.norm(gap) >= radius + 8.0:
            return _organ("bulky_node", tuple(centre), (radius,) * 3, soft_tissue_hu - rng.uniform(0, 10),
                          rng.uniform(4.0, 15.0))
    return None


def sample_whole_body(rng: np.random.Generator, second_lesion_probability: float = 0.3) -> WholeBodyAnatomy:
    """Draw one patient: the head-and-neck anatomy, a resized tumour, the trunk and the scanned range."""
    anatomy = sample_anatomy(rng)
    body, brain, skull = anatomy.body, anatomy.brain, anatomy.skull
    airway_xy = np.array([float(anatomy.airway.centre_x(np.asarray(anatomy.tumour.centre[2]))), anatomy.airway.centre_y])
    low_ml, high_ml = TUMOUR_VOLUME_RANGE_ML
    volume_ml = float(np.exp(rng.uniform(np.log(low_ml), np.log(high_ml))))
    tumour = _resized_tumour(anatomy.tumour, volume_ml, airway_xy)
    second = None
    if rng.random() < second_lesion_probability:
        second = _second_lesion(rng, tumour, body.neck_semi_axes[0], anatomy.soft_tissue_hu)
    fat = body.fat_thickness
    hip_z = body.shoulder_z - rng.uniform(530.0, 560.0)
    outline = WholeBodyOutline(
        neck_semi_axes=body.neck_semi_axes, head_semi_axes=body.head_semi_axes,
        head_transition_z=body.head_transition_z, shoulder_z=body.shoulder_z, fat_thickness=fat,
        vertex_centre=(0.0, float(body.centre_y(np.asarray(brain.centre[2]))), brain.centre[2]),
        vertex_semi_axes=(body.head_semi_axes[0], body.head_semi_axes[1], skull.semi_axes[2] + fat + 4.0),
        hip_z=hip_z, thigh_x=rng.uniform(80.0, 90.0), thigh_semi_axes=(rng.uniform(65.0, 75.0), rng.uniform(65.0, 75.0)),
    )
    trunk = _trunk_organs(rng, body.shoulder_z, anatomy.bone_hu)
    nodes = anatomy.lymph_nodes + ((second,) if second is not None else ())
    spine = TruncatedSpine(**{f: getattr(anatomy.spine, f) for f in Spine.__dataclass_fields__}, bottom_z=hip_z + 40.0)
    whole = replace(anatomy, body=outline, spine=spine, tumour=tumour, organs=trunk + anatomy.organs, lymph_nodes=nodes)
    top_z = brain.centre[2] + outline.vertex_semi_axes[2] + rng.uniform(5.0, 15.0)
    return WholeBodyAnatomy(anatomy=whole, top_z=float(top_z), height_mm=float(rng.uniform(*HEIGHT_RANGE_MM)),
                            second_lesion=second)


def _scan_grid(centre_xy: tuple[float, float], top_z: float, height_mm: float, spacing: Vector3,
               in_plane_mm: tuple[float, float]) -> Grid:
    centre = (centre_xy[0], centre_xy[1], top_z - height_mm / 2.0)
    return Grid.centred(centre, spacing, (*in_plane_mm, height_mm))


def make_whole_body_case(seed: int, *, scale: float = 1.0, second_lesion_probability: float = 0.3) -> PhantomCase:
    """One whole-body case; ``scale`` multiplies both grids' voxel sizes (coarser, for tests)."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive, got {scale!r}")
    rng = np.random.default_rng(seed)
    whole = sample_whole_body(rng, second_lesion_probability)
    ct_spacing: Vector3 = tuple(s * scale for s in (*WHOLE_BODY_CT_SPACING_MM[:2],  # type: ignore[assignment]
                                                    float(rng.choice([2.0, 2.5, 3.0]))))
    pet_spacing: Vector3 = tuple(s * scale for s in WHOLE_BODY_PET_SPACING_MM)  # type: ignore[assignment]
    ct_xy = (float(rng.uniform(-5, 5)), float(rng.uniform(5, 15)))
    pet_offset = rng.uniform(-8.0, 8.0, 3)
    ct_grid = _scan_grid(ct_xy, whole.top_z, whole.height_mm, ct_spacing, CT_IN_PLANE_EXTENT_MM)
    pet_grid = _scan_grid((ct_xy[0] + pet_offset[0], ct_xy[1] + pet_offset[1]), whole.top_z + 8.0 + pet_offset[2],
                          whole.height_mm + 16.0, pet_spacing, PET_IN_PLANE_EXTENT_MM)
    ct, gtvt = _render_ct(whole.anatomy, ct_grid, rng)
    pet = _render_pet(whole.anatomy, pet_grid, rng)
    return PhantomCase(ct=ct, ct_affine=ct_grid.affine, pet=pet, pet_affine=pet_grid.affine, gtvt=gtvt,
                       anatomy=whole.anatomy)


def write_whole_body_cases(out_dir: str | Path, n: int, seed: int, *, scale: float = 1.0) -> list[str]:
    """Write ``n`` whole-body cases as ``<case>_ct/_pt/_gtvt.nii.gz`` (HECKTOR layout); return their ids."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = []
    for index in range(n):
        case_id = f"wholebody_s{seed}_{index:03d}"
        save_case(make_whole_body_case(case_seed(seed, index), scale=scale), out, case_id)
        ids.append(case_id)
    return ids
