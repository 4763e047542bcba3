"""Synthetic head-and-neck PET-CT cases in the HECKTOR file layout.

Each case is one continuous anatomical model defined in world millimetres (RAS),
evaluated separately on the CT grid and on the PET grid. CT, PET and the GTVt mask
therefore stay co-registered the way scanner data are, although the two grids have
different spacings, origins and extents. The anatomy is a caricature, but the
difficulties of the real task are kept: a tumour with little CT contrast against
soft tissue, FDG-avid lymph nodes and physiological uptake (brain, tonsils,
salivary glands) that are *not* GTVt, partial-volume blur and noise in PET.

Two varieties. ``classic`` is the original generator (a set's cases are the same as
before ``wide`` existed). ``wide`` draws a :class:`Variety` per case from a separate
random stream and applies it to the same anatomy draws: tumour volume log-uniform in
about 1-200 ml, SUVmax log-uniform from faint (about 2.5) to very avid (about 40),
more and larger necrotic cores, a third of the tumours cut by the edge of the scanned
field of view (top or bottom of the CT and PET), body size 0.85-1.25 x, CT noise 5-40
HU with a smooth, standard or sharp reconstruction kernel, and PET resolution 4-7 mm
FWHM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

Vector3 = tuple[float, float, float]
Slices3 = tuple[slice, slice, slice]
Coordinates = tuple[np.ndarray, np.ndarray, np.ndarray]
RegionTest = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Modality = Literal["ct", "pet"]

DEFAULT_CT_SPACING_MM: Vector3 = (0.98, 0.98, 3.0)
DEFAULT_PET_SPACING_MM: Vector3 = (4.0, 4.0, 4.0)
DEFAULT_CT_EXTENT_MM: Vector3 = (200.0, 200.0, 240.0)
DEFAULT_PET_EXTENT_MM: Vector3 = (220.0, 220.0, 248.0)

AIR_HU = -1000.0
CT_SUFFIX = "_ct.nii.gz"
PET_SUFFIX = "_pt.nii.gz"
GTVT_SUFFIX = "_gtvt.nii.gz"
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
PET_SUPERSAMPLING = 2  # PET activity is modelled at half the PET voxel size, then binned
VARIETIES = ("classic", "wide")
VARIETY_STREAM = 1  # the wide variety's draws: SeedSequence([case seed, VARIETY_STREAM])
CT_KERNELS = ("smooth", "standard", "sharp")
LOBE_VOLUME_FACTOR = 0.65  # a tumour's volume over the sphere of its radius (lobes, axes and ripple; measured)


# --------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Grid:
    """A voxel lattice placed in world space by an axis-aligned voxel-to-RAS affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        linear = np.asarray(self.affine, dtype=np.float64)[:3, :3]
        if np.any(linear[~np.eye(3, dtype=bool)] != 0):
            raise ValueError("phantom grids must be axis-aligned (diagonal affine)")

    @classmethod
    def centred(cls, centre_mm: Sequence[float] | np.ndarray, spacing_mm: Sequence[float],
                extent_mm: Sequence[float]) -> Grid:
        """A grid covering ``extent_mm`` around ``centre_mm``, x/y flipped as DICOM LPS -> RAS gives."""
        spacing = np.asarray(spacing_mm, dtype=np.float64)
        shape = tuple(max(1, round(e / s)) for e, s in zip(extent_mm, spacing))
        steps = spacing * np.array([-1.0, -1.0, 1.0])
        affine = np.diag([*steps, 1.0])
        affine[:3, 3] = np.asarray(centre_mm, dtype=np.float64) - steps * (np.asarray(shape) - 1) / 2
        return cls(shape=shape, affine=affine)

    @property
    def spacing_mm(self) -> np.ndarray:
        return np.abs(np.diag(self.affine)[:3])

    def axis_mm(self, axis: int) -> np.ndarray:
        """World coordinate of every voxel centre along one axis."""
        return self.affine[axis, 3] + self.affine[axis, axis] * np.arange(self.shape[axis])

    def coordinates(self, window: Slices3 | None = None) -> Coordinates:
        """Broadcastable world x, y, z of the voxel centres (optionally of a sub-window)."""
        window = window or (slice(None),) * 3
        axes = [self.axis_mm(a)[window[a]].astype(np.float32) for a in range(3)]
        return (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])

    def window(self, low_mm: Sequence[float], high_mm: Sequence[float]) -> Slices3 | None:
        """Index slices of the voxels whose centres fall in a world box; None if none do."""
        slices = []
        for axis in range(3):
            inside = np.flatnonzero((self.axis_mm(axis) >= low_mm[axis]) & (self.axis_mm(axis) <= high_mm[axis]))
            if inside.size == 0:
                return None
            slices.append(slice(int(inside[0]), int(inside[-1]) + 1))
        return (slices[0], slices[1], slices[2])

    def supersampled(self, factor: int) -> Grid:
        """The grid whose ``factor``^3 sub-voxels tile each voxel of this one."""
        scale = np.diag([1.0 / factor] * 3 + [1.0])
        scale[:3, 3] = -0.5 + 0.5 / factor
        shape = tuple(n * factor for n in self.shape)
        return Grid(shape=shape, affine=self.affine @ scale)  # type: ignore[arg-type]


def _bin_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor``^3 blocks: sub-voxel activity back to scanner voxels (partial volume)."""
    nx, ny, nz = (n // factor for n in volume.shape)
    blocks = volume.reshape(nx, factor, ny, factor, nz, factor)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


# ------------------------------------------------------------------ world geometry


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid in world mm."""

    centre: Vector3
    semi_axes: Vector3

    def bounds(self) -> tuple[Vector3, Vector3]:
        c, r = np.asarray(self.centre), np.asarray(self.semi_axes)
        return tuple(c - r), tuple(c + r)

    def radius_squared(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Normalised squared radius: <= 1 inside."""
        (cx, cy, cz), (ax, ay, az) = self.centre, self.semi_axes
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.radius_squared(x, y, z) <= 1.0


@dataclass(frozen=True)
class RippleField:
    """Smooth random field in [-1, 1]: a sum of plane waves, identical on every grid."""

    wave_vectors: np.ndarray  # (k, 3) in rad/mm
    phases: np.ndarray  # (k,)

    @classmethod
    def sample(cls, rng: np.random.Generator, wavelength_mm: tuple[float, float], waves: int = 4) -> RippleField:
        directions = rng.normal(size=(waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(*wavelength_mm, size=(waves, 1))
        return cls(wave_vectors=directions * (2 * math.pi / wavelengths), phases=rng.uniform(0, 2 * math.pi, waves))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        total = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
        for (wx, wy, wz), phase in zip(self.wave_vectors, self.phases):
            total += np.cos(np.float32(wx) * x + np.float32(wy) * y + np.float32(wz) * z + np.float32(phase))
        return total / len(self.phases)


def _logistic(value: np.ndarray, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-value / width))


@dataclass(frozen=True)
class BodyOutline:
    """Skin surface: an elliptic neck widening into the head above and shoulders below."""

    neck_semi_axes: tuple[float, float]
    head_semi_axes: tuple[float, float]
    head_transition_z: float
    shoulder_z: float
    fat_thickness: float

    def semi_axes(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        head = _logistic(z - self.head_transition_z, 8.0)
        shoulders = _logistic(self.shoulder_z - z, 12.0)
        (nx, ny), (hx, hy) = self.neck_semi_axes, self.head_semi_axes
        return nx + (hx - nx) * head + 70.0 * shoulders, ny + (hy - ny) * head + 15.0 * shoulders

    def centre_y(self, z: np.ndarray) -> np.ndarray:
        return 12.0 * _logistic(z - self.head_transition_z, 8.0)

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, inset_mm: float = 0.0) -> np.ndarray:
        ax, ay = self.semi_axes(z)
        return (x / (ax - inset_mm)) ** 2 + ((y - self.centre_y(z)) / (ay - inset_mm)) ** 2 <= 1.0


@dataclass(frozen=True)
class Airway:
    """Air column of the pharynx and larynx, gently curving along z."""

    centre_y: float
    semi_axes: tuple[float, float]
    z_range: tuple[float, float]
    sway_mm: float
    sway_phase: float

    def centre_x(self, z: np.ndarray) -> np.ndarray:
        return self.sway_mm * np.sin(z / 40.0 + self.sway_phase)

    def bounds(self) -> tuple[Vector3, Vector3]:
        rx, ry = self.semi_axes
        reach = rx + abs(self.sway_mm)
        return (-reach, self.centre_y - ry, self.z_range[0]), (reach, self.centre_y + ry, self.z_range[1])

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        rx, ry = self.semi_axes
        inside_z = (z >= self.z_range[0]) & (z <= self.z_range[1])
        return (((x - self.centre_x(z)) / rx) ** 2 + ((y - self.centre_y) / ry) ** 2 <= 1.0) & inside_z


@dataclass(frozen=True)
class Spine:
    """Cervical vertebrae: bodies separated by discs, a posterior arch and the spinal canal."""

    centre_y: float
    body_radius: float
    top_z: float
    disc_period: float
    disc_phase: float

    @property
    def canal_centre_y(self) -> float:
        return self.centre_y - self.body_radius - 6.0

    def bounds(self) -> tuple[Vector3, Vector3]:
        reach = self.body_radius + 4.0
        return (-reach, self.canal_centre_y - 11.0, -math.inf), (reach, self.centre_y + self.body_radius, self.top_z)

    def _levels(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        below_top = z <= self.top_z
        body_r2 = x**2 + (y - self.centre_y) ** 2
        canal_r2 = x**2 + (y - self.canal_centre_y) ** 2
        return below_top, body_r2, canal_r2

    def bone(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        below_top, body_r2, canal_r2 = self._levels(x, y, z)
        in_disc = np.mod(z - self.disc_phase, self.disc_period) < 4.0
        vertebral_body = (body_r2 <= self.body_radius**2) & ~in_disc
        arch = (canal_r2 <= 10.5**2) & (canal_r2 > 6.5**2) & (y <= self.centre_y - self.body_radius + 2.0)
        return (vertebral_body | arch) & below_top

    def disc(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        below_top, body_r2, _ = self._levels(x, y, z)
        return (body_r2 <= self.body_radius**2) & (np.mod(z - self.disc_phase, self.disc_period) < 4.0) & below_top

    def canal(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        below_top, _, canal_r2 = self._levels(x, y, z)
        return (canal_r2 <= 6.5**2) & below_top


@dataclass(frozen=True)
class Mandible:
    """U-shaped bony arch around the anterior floor of mouth."""

    centre_y: float
    semi_axes: tuple[float, float]
    centre_z: float
    half_height: float
    thickness: float

    def bounds(self) -> tuple[Vector3, Vector3]:
        ax, ay = self.semi_axes
        t = self.thickness
        return ((-ax - t, self.centre_y - t, self.centre_z - self.half_height),
                (ax + t, self.centre_y + ay + t, self.centre_z + self.half_height))

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        ax, ay = self.semi_axes
        radius = np.sqrt((x / ax) ** 2 + ((y - self.centre_y) / ay) ** 2)
        in_arch = np.abs(radius - 1.0) * (ax + ay) / 2 <= self.thickness / 2
        return in_arch & (y >= self.centre_y) & (np.abs(z - self.centre_z) <= self.half_height)


@dataclass(frozen=True)
class Tumour:
    """Lobulated primary tumour (GTVt): union of ellipsoids with a rippled surface."""

    lobes: tuple[Ellipsoid, ...]
    surface_ripple: RippleField
    uptake_ripple: RippleField
    necrosis: Ellipsoid | None
    hu_excess: float
    suv_peak: float
    necrosis_suv: float
    necrosis_hu_drop: float

    RIPPLE_AMPLITUDE: ClassVar[float] = 0.12
    HETEROGENEITY: ClassVar[float] = 0.3

    @property
    def centre(self) -> Vector3:
        return self.lobes[0].centre

    def bounds(self) -> tuple[Vector3, Vector3]:
        lows, highs = zip(*(lobe.bounds() for lobe in self.lobes))
        low, high = np.min(lows, axis=0), np.max(highs, axis=0)
        margin = (high - low) * self.RIPPLE_AMPLITUDE
        return tuple(low - margin), tuple(high + margin)

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Implicit shape function: < 1 inside the tumour, ~0 at its core."""
        radius2 = np.minimum.reduce([lobe.radius_squared(x, y, z) for lobe in self.lobes])
        return np.sqrt(radius2) * (1.0 + self.RIPPLE_AMPLITUDE * self.surface_ripple(x, y, z))

    def uptake(self, level: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Heterogeneous FDG uptake, highest towards the core of viable tumour."""
        profile = 0.65 + 0.35 * np.clip(1.0 - level**2, 0.0, 1.0)
        return self.suv_peak * profile * (1.0 + self.HETEROGENEITY * self.uptake_ripple(x, y, z))


@dataclass(frozen=True)
class UptakeOrgan:
    """A non-target structure with its own CT density and FDG uptake (glands, tonsils, nodes)."""

    name: str
    shape: Ellipsoid
    hu: float
    suv: float


# ------------------------------------------------------------------- variety


@dataclass(frozen=True)
class Variety:
    """Per-case departures from the classic generator; ``Variety()`` is the classic generator.

    None keeps the classic draw (which is still made, so the classic stream is unchanged).
    """

    body_scale: float = 1.0
    tumour_radius_mm: float | None = None
    suv_peak: float | None = None
    necrosis_chance: float = 0.4
    necrosis_min_radius_mm: float = 12.0
    necrosis_scale: tuple[float, float] = (0.3, 0.45)
    edge_of_view: Literal["none", "top", "bottom"] = "none"
    edge_depth: float = 0.5  # where the field of view's edge cuts the tumour: 0 its low end, 1 its high end
    ct_noise_hu: float | None = None
    ct_kernel: str = "standard"
    pet_fwhm_mm: float | None = None

    @classmethod
    def wide(cls, rng: np.random.Generator) -> Variety:
        volume_ml = math.exp(rng.uniform(math.log(1.0), math.log(200.0)))
        radius = (3.0 * volume_ml * 1000.0 / (4.0 * math.pi * LOBE_VOLUME_FACTOR)) ** (1.0 / 3.0)
        edge = rng.choice(["top", "bottom"]) if rng.random() < 1 / 3 else "none"
        return cls(
            body_scale=float(rng.uniform(0.85, 1.25)),
            tumour_radius_mm=radius,
            suv_peak=float(math.exp(rng.uniform(math.log(2.5), math.log(40.0)))),
            necrosis_chance=0.6,
            necrosis_min_radius_mm=9.0,
            necrosis_scale=(0.3, 0.6),
            edge_of_view=str(edge),  # type: ignore[arg-type]
            edge_depth=float(rng.uniform(0.3, 0.7)),
            ct_noise_hu=float(rng.uniform(5.0, 40.0)),
            ct_kernel=str(rng.choice(CT_KERNELS)),
            pet_fwhm_mm=float(rng.uniform(4.0, 7.0)),
        )


def _drawn_or(drawn: float, override: float | None) -> float:
    """The classic draw, unless the variety sets the value (the draw is made either way)."""
    return float(drawn) if override is None else override


def draw_variety(seed: int, variety: str) -> Variety:
    """The case's :class:`Variety`: the classic one, or a ``wide`` draw from its own stream."""
    if variety not in VARIETIES:
        raise ValueError(f"phantom variety must be one of {', '.join(VARIETIES)}, not {variety!r}")
    if variety == "classic":
        return Variety()
    return Variety.wide(np.random.default_rng(np.random.SeedSequence([seed, VARIETY_STREAM])))


@dataclass(frozen=True)
class HeadNeckAnatomy:
    """One patient's world model and tissue properties; everything rendered comes from here."""

    body: BodyOutline
    airway: Airway
    spine: Spine
    mandible: Mandible
    brain: Ellipsoid
    skull: Ellipsoid
    tumour: Tumour
    organs: tuple[UptakeOrgan, ...]
    lymph_nodes: tuple[UptakeOrgan, ...]
    soft_tissue_hu: float
    fat_hu: float
    bone_hu: float
    brain_hu: float
    soft_tissue_suv: float
    fat_suv: float
    bone_suv: float
    brain_suv: float
    soft_tissue_texture: RippleField
    texture_hu: float
    variety: Variety = Variety()


# ------------------------------------------------------------------- sampling


def _sample_tumour(rng: np.random.Generator, airway: Airway, variety: Variety) -> Tumour:
    """A tumour abutting the oropharyngeal airway wall (anterior or lateral)."""
    centre_z = rng.uniform(-5.0, 20.0)
    radius = rng.uniform(8.0, 22.0)
    if variety.tumour_radius_mm is not None:
        radius = variety.tumour_radius_mm
    angle = rng.uniform(-2.1, 2.1)  # from anterior, avoiding the posterior (prevertebral) wall
    direction = np.array([math.sin(angle), math.cos(angle)])
    rx, ry = airway.semi_axes
    wall = 1.0 / math.sqrt((direction[0] / rx) ** 2 + (direction[1] / ry) ** 2)
    airway_x = float(airway.centre_x(np.asarray(centre_z)))
    centre_xy = np.array([airway_x, airway.centre_y]) + direction * (wall + 0.6 * radius)
    centre = np.array([centre_xy[0], centre_xy[1], centre_z])
    main = Ellipsoid(tuple(centre), tuple(radius * rng.uniform(0.75, 1.2, 3)))
    lobes = [main]
    for _ in range(rng.integers(2, 5)):
        offset = rng.normal(size=3)
        offset *= radius * rng.uniform(0.4, 0.8) / np.linalg.norm(offset)
        lobes.append(Ellipsoid(tuple(centre + offset), tuple(radius * rng.uniform(0.35, 0.7, 3))))
    necrosis = None
    if radius >= variety.necrosis_min_radius_mm and rng.random() < variety.necrosis_chance:
        necrosis = Ellipsoid(tuple(centre), tuple(radius * rng.uniform(*variety.necrosis_scale, 3)))
    return Tumour(
        lobes=tuple(lobes),
        surface_ripple=RippleField.sample(rng, (10.0, 22.0)),
        uptake_ripple=RippleField.sample(rng, (8.0, 16.0)),
        necrosis=necrosis,
        hu_excess=rng.uniform(10.0, 30.0),
        suv_peak=_drawn_or(rng.uniform(5.0, 20.0), variety.suv_peak),
        necrosis_suv=rng.uniform(0.8, 1.6),
        necrosis_hu_drop=rng.uniform(12.0, 25.0),
    )


def _sample_organs(rng: np.random.Generator, body: BodyOutline, airway: Airway, mandible: Mandible,
                   soft_tissue_hu: float) -> tuple[UptakeOrgan, ...]:
    """Bilateral parotid and submandibular glands and palatine tonsils: FDG-avid, not GTVt."""
    neck_x = body.neck_semi_axes[0]
    organs = []
    tonsil_z = rng.uniform(5.0, 20.0)
    for side in (-1.0, 1.0):
        parotid = Ellipsoid((side * (neck_x - 14.0), -5.0, body.head_transition_z + rng.uniform(-5, 5)),
                            (rng.uniform(8, 11), rng.uniform(12, 16), rng.uniform(15, 20)))
        submandibular = Ellipsoid((side * (neck_x - 24.0), mandible.centre_y + 18.0, mandible.centre_z - 12.0),
                                  (rng.uniform(7, 10),) * 3)
        tonsil = Ellipsoid((side * (airway.semi_axes[0] + 6.0), airway.centre_y, tonsil_z),
                           (rng.uniform(5, 7), rng.uniform(7, 9), rng.uniform(10, 14)))
        organs += [
            UptakeOrgan("parotid", parotid, rng.uniform(-15.0, 15.0), rng.uniform(1.8, 3.0)),
            UptakeOrgan("submandibular", submandibular, soft_tissue_hu + rng.uniform(-5, 5), rng.uniform(1.8, 3.0)),
            UptakeOrgan("tonsil", tonsil, soft_tissue_hu + rng.uniform(0, 8), rng.uniform(2.5, 4.5)),
        ]
    return tuple(organs)


def _sample_lymph_nodes(rng: np.random.Generator, body: BodyOutline, tumour: Tumour,
                        soft_tissue_hu: float) -> tuple[UptakeOrgan, ...]:
    """Two or three FDG-avid lateral neck nodes (level III, below the mandible), clear of the tumour."""
    tumour_low, tumour_high = (np.asarray(b) for b in tumour.bounds())
    wanted = int(rng.integers(2, 4))
    nodes: list[UptakeOrgan] = []
    for _ in range(200):
        if len(nodes) == wanted:
            break
        radius = rng.uniform(6.0, 10.0)
        side = rng.choice([-1.0, 1.0])
        centre = np.array([side * rng.uniform(30.0, body.neck_semi_axes[0] - radius - 8.0),
                           rng.uniform(-5.0, 15.0), rng.uniform(-75.0, -45.0)])
        gap = np.maximum(tumour_low - centre, 0) + np.maximum(centre - tumour_high, 0)
        clear_of_tumour = np.linalg.norm(gap) >= radius + 6.0
        clear_of_nodes = all(np.linalg.norm(centre - np.asarray(n.shape.centre)) >= radius + n.shape.semi_axes[0] + 4
                             for n in nodes)
        if clear_of_tumour and clear_of_nodes:
            sphere = Ellipsoid(tuple(centre), (radius, radius, radius))
            hu = soft_tissue_hu - rng.uniform(0, 10)
            nodes.append(UptakeOrgan("lymph_node", sphere, hu, rng.uniform(3.5, 10.0)))
    return tuple(nodes)


def sample_anatomy(rng: np.random.Generator, variety: Variety | None = None) -> HeadNeckAnatomy:
    """Draw one patient: body habitus, airway, bones, tumour, glands, nodes and tissue values."""
    variety = variety or Variety()
    scale = variety.body_scale
    neck = (rng.uniform(52.0, 62.0) * scale, rng.uniform(50.0, 60.0) * scale)
    body = BodyOutline(
        neck_semi_axes=neck,
        head_semi_axes=(rng.uniform(70.0, 78.0) * scale, rng.uniform(85.0, 95.0) * scale),
        head_transition_z=rng.uniform(25.0, 35.0),
        shoulder_z=rng.uniform(-125.0, -105.0),
        fat_thickness=rng.uniform(5.0, 12.0) * scale,
    )
    airway = Airway(
        centre_y=0.2 * neck[1],
        semi_axes=(rng.uniform(7.0, 11.0), rng.uniform(5.0, 9.0)),
        z_range=(-200.0, rng.uniform(30.0, 40.0)),
        sway_mm=rng.uniform(-3.0, 3.0),
        sway_phase=rng.uniform(0, 2 * math.pi),
    )
    spine = Spine(centre_y=-0.45 * neck[1], body_radius=rng.uniform(9.0, 12.0), top_z=rng.uniform(20.0, 30.0),
                  disc_period=rng.uniform(16.0, 19.0), disc_phase=rng.uniform(0, 19.0))
    mandible = Mandible(centre_y=airway.centre_y - 5.0, semi_axes=(0.78 * neck[0], 0.75 * neck[1]),
                        centre_z=rng.uniform(-25.0, -12.0), half_height=rng.uniform(7.0, 10.0),
                        thickness=rng.uniform(6.0, 9.0))
    head_x, head_y = body.head_semi_axes
    brain_bottom = body.head_transition_z + rng.uniform(15.0, 25.0)
    brain = Ellipsoid((0.0, 10.0, brain_bottom + 55.0), (head_x - 12.0, head_y - 16.0, 55.0))
    skull = Ellipsoid(brain.centre, (head_x - 5.0, head_y - 8.0, 62.0))
    soft_tissue_hu = rng.uniform(35.0, 50.0)
    tumour = _sample_tumour(rng, airway, variety)
    return HeadNeckAnatomy(
        body=body, airway=airway, spine=spine, mandible=mandible, brain=brain, skull=skull, tumour=tumour,
        organs=_sample_organs(rng, body, airway, mandible, soft_tissue_hu),
        lymph_nodes=_sample_lymph_nodes(rng, body, tumour, soft_tissue_hu),
        soft_tissue_hu=soft_tissue_hu, fat_hu=rng.uniform(-115.0, -85.0), bone_hu=rng.uniform(600.0, 900.0),
        brain_hu=rng.uniform(28.0, 38.0), soft_tissue_suv=rng.uniform(0.8, 1.2), fat_suv=rng.uniform(0.3, 0.5),
        bone_suv=rng.uniform(0.5, 0.9), brain_suv=rng.uniform(6.5, 10.0),
        soft_tissue_texture=RippleField.sample(rng, (15.0, 40.0), waves=6), texture_hu=rng.uniform(6.0, 12.0),
        variety=variety,
    )


# ------------------------------------------------------------------ rendering


@dataclass(frozen=True)
class TissueValues:
    """What one modality shows for each tissue class."""

    modality: Modality
    air: float
    fat: float
    soft_tissue: float
    bone: float
    disc: float
    canal: float
    brain: float

    def organ(self, organ: UptakeOrgan) -> float:
        return organ.hu if self.modality == "ct" else organ.suv


def _paint_region(volume: np.ndarray, grid: Grid, bounds: tuple[Sequence[float], Sequence[float]],
                  contains: RegionTest, value: float) -> None:
    """Set ``value`` where a world region covers voxel centres, evaluating only its bounding box."""
    window = grid.window(*bounds)
    if window is None:
        return
    x, y, z = grid.coordinates(window)
    sub = volume[window]
    sub[np.broadcast_to(contains(x, y, z), sub.shape)] = value


def _paint_anatomy(volume: np.ndarray, grid: Grid, anatomy: HeadNeckAnatomy, tissue: TissueValues) -> None:
    """Paint every non-tumour structure, deepest last (painter's algorithm)."""
    everywhere = ((-math.inf,) * 3, (math.inf,) * 3)
    body = anatomy.body
    _paint_region(volume, grid, everywhere, body.contains, tissue.fat)
    _paint_region(volume, grid, everywhere, lambda x, y, z: body.contains(x, y, z, body.fat_thickness),
                  tissue.soft_tissue)
    for organ in (*anatomy.organs, *anatomy.lymph_nodes):
        _paint_region(volume, grid, organ.shape.bounds(), organ.shape.contains, tissue.organ(organ))
    _paint_region(volume, grid, anatomy.skull.bounds(), anatomy.skull.contains, tissue.bone)
    _paint_region(volume, grid, anatomy.brain.bounds(), anatomy.brain.contains, tissue.brain)
    _paint_region(volume, grid, anatomy.mandible.bounds(), anatomy.mandible.contains, tissue.bone)
    spine = anatomy.spine
    _paint_region(volume, grid, spine.bounds(), spine.bone, tissue.bone)
    _paint_region(volume, grid, spine.bounds(), spine.disc, tissue.disc)
    _paint_region(volume, grid, spine.bounds(), spine.canal, tissue.canal)


def _tumour_window(grid: Grid, anatomy: HeadNeckAnatomy) -> tuple[Slices3, np.ndarray, Coordinates] | None:
    """Where the GTVt lies on a grid: window, tumour mask within it (air and outside-body removed), coordinates."""
    window = grid.window(*anatomy.tumour.bounds())
    if window is None:
        return None
    x, y, z = grid.coordinates(window)
    level = anatomy.tumour.level(x, y, z)
    mask = (level <= 1.0) & anatomy.body.contains(x, y, z, anatomy.body.fat_thickness) & ~anatomy.airway.contains(x, y, z)
    return window, np.broadcast_to(mask, level.shape), (x, y, z)


def _add_soft_tissue_texture(hu: np.ndarray, grid: Grid, anatomy: HeadNeckAnatomy) -> None:
    """Slow density variations (muscle, fascia) so the tumour is not the only non-uniform soft tissue."""
    soft = (hu > -50.0) & (hu < 150.0)
    x, y, z = grid.coordinates()
    texture = anatomy.soft_tissue_texture(x, y, z)
    hu[soft] += anatomy.texture_hu * texture[soft]


def _render_ct(anatomy: HeadNeckAnatomy, grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CT in HU (int16) and the GTVt mask (uint8) on the CT grid."""
    tissue = TissueValues(modality="ct", air=AIR_HU, fat=anatomy.fat_hu, soft_tissue=anatomy.soft_tissue_hu,
                          bone=anatomy.bone_hu, disc=anatomy.soft_tissue_hu + 40.0,
                          canal=anatomy.soft_tissue_hu - 15.0, brain=anatomy.brain_hu)
    hu = np.full(grid.shape, tissue.air, dtype=np.float32)
    _paint_anatomy(hu, grid, anatomy, tissue)
    gtvt = np.zeros(grid.shape, dtype=np.uint8)
    tumour = anatomy.tumour
    located = _tumour_window(grid, anatomy)
    if located is not None:
        window, mask, (x, y, z) = located
        hu[window][mask] = anatomy.soft_tissue_hu + tumour.hu_excess
        if tumour.necrosis is not None:
            necrotic = mask & tumour.necrosis.contains(x, y, z)
            hu[window][necrotic] = anatomy.soft_tissue_hu - tumour.necrosis_hu_drop
        gtvt[window][mask] = 1
    _paint_region(hu, grid, anatomy.airway.bounds(), anatomy.airway.contains, tissue.air)
    _add_soft_tissue_texture(hu, grid, anatomy)
    spacing = grid.spacing_mm
    variety = anatomy.variety
    if variety.ct_kernel == "standard":
        hu = ndimage.gaussian_filter(hu, sigma=tuple(0.6 / spacing), truncate=2.5)  # ~1.4 mm FWHM scanner blur
    noise_hu = _drawn_or(rng.uniform(8.0, 18.0), variety.ct_noise_hu)
    noise = rng.normal(0.0, 1.0, size=hu.shape).astype(np.float32)
    if variety.ct_kernel == "standard":
        hu += noise_hu * noise
    else:
        hu = _reconstruction_kernel(hu, noise, noise_hu, spacing, variety.ct_kernel)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), gtvt


def _reconstruction_kernel(hu: np.ndarray, noise: np.ndarray, noise_hu: float, spacing: np.ndarray,
                           kernel: str) -> np.ndarray:
    """CT through a smooth (soft-tissue, ~2.8 mm FWHM) or sharp (bone, edge-enhancing) kernel.

    The noise is shaped by the kernel too and then scaled to ``noise_hu``: a smooth kernel's
    noise is blotchy (neighbours correlate), a sharp kernel's grainy (neighbours anti-correlate).
    """
    def blur(volume: np.ndarray, sigma_mm: float) -> np.ndarray:
        return ndimage.gaussian_filter(volume, sigma=tuple(sigma_mm / spacing), truncate=2.5)

    if kernel == "smooth":
        image, texture = blur(hu, 1.2), blur(noise, 1.2)
    else:  # unsharp masking: edges overshoot and the noise loses its low frequencies, as bone kernels show
        image = blur(hu, 0.4)
        image = image + 0.7 * (image - blur(image, 1.5))
        texture = noise + (noise - blur(noise, 0.8))
    texture *= noise_hu / max(float(texture.std()), 1e-6)
    return (image + texture).astype(np.float32)


def _render_pet(anatomy: HeadNeckAnatomy, grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """PET in SUV (float32): activity binned from sub-voxels, blurred by the scanner PSF, then noisy."""
    fine = grid.supersampled(PET_SUPERSAMPLING)
    tissue = TissueValues(modality="pet", air=0.0, fat=anatomy.fat_suv, soft_tissue=anatomy.soft_tissue_suv,
                          bone=anatomy.bone_suv, disc=anatomy.soft_tissue_suv * 0.7,
                          canal=anatomy.soft_tissue_suv * 0.8, brain=anatomy.brain_suv)
    suv = np.full(fine.shape, tissue.air, dtype=np.float32)
    _paint_anatomy(suv, fine, anatomy, tissue)
    tumour = anatomy.tumour
    located = _tumour_window(fine, anatomy)
    if located is not None:
        window, mask, (x, y, z) = located
        uptake = np.broadcast_to(tumour.uptake(tumour.level(x, y, z), x, y, z), mask.shape)
        suv[window][mask] = uptake[mask]
        if tumour.necrosis is not None:
            suv[window][mask & tumour.necrosis.contains(x, y, z)] = tumour.necrosis_suv
    _paint_region(suv, fine, anatomy.airway.bounds(), anatomy.airway.contains, tissue.air)
    suv = _bin_mean(suv, PET_SUPERSAMPLING)
    fwhm_mm = _drawn_or(rng.uniform(5.0, 7.0), anatomy.variety.pet_fwhm_mm)
    suv = ndimage.gaussian_filter(suv, sigma=tuple(fwhm_mm / FWHM_PER_SIGMA / grid.spacing_mm))
    counts_scale = rng.uniform(0.02, 0.06)  # variance per SUV: Poisson-like, relatively noisier where uptake is low
    noise = rng.normal(size=suv.shape).astype(np.float32) * np.sqrt(np.maximum(suv, 0.0) * counts_scale)
    return np.maximum(suv + noise, 0.0).astype(np.float32)


# ------------------------------------------------------------------ cases & files


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic patient: CT (HU) and PET (SUV) on their own grids, GTVt on the CT grid."""

    ct: np.ndarray
    ct_affine: np.ndarray
    pet: np.ndarray
    pet_affine: np.ndarray
    gtvt: np.ndarray
    anatomy: HeadNeckAnatomy


def _scanner_spacing(rng: np.random.Generator, in_plane: tuple[float, float], slices: Sequence[float]) -> Vector3:
    pixel = rng.uniform(*in_plane)
    return (pixel, pixel, float(rng.choice(slices)))


def make_case(
    seed: int,
    *,
    ct_spacing: Vector3 | None = DEFAULT_CT_SPACING_MM,
    pet_spacing: Vector3 | None = DEFAULT_PET_SPACING_MM,
    ct_extent_mm: Vector3 = DEFAULT_CT_EXTENT_MM,
    pet_extent_mm: Vector3 = DEFAULT_PET_EXTENT_MM,
    variety: str | Variety = "classic",
) -> PhantomCase:
    """Generate one case; a spacing of None draws a scanner-like one for this case; ``variety``
    (see the module's doc): ``classic``, ``wide`` or a given :class:`Variety`."""
    rng = np.random.default_rng(seed)
    anatomy = sample_anatomy(rng, variety if isinstance(variety, Variety) else draw_variety(seed, variety))
    ct_spacing = ct_spacing or _scanner_spacing(rng, (0.9, 1.0), (2.0, 2.5, 3.0))
    pet_spacing = pet_spacing or _scanner_spacing(rng, (3.9, 4.1), (3.0, 3.27, 4.0))
    ct_centre = np.array([rng.uniform(-5, 5), rng.uniform(-5, 5), rng.uniform(-35, -20)])
    pet_centre = ct_centre + np.array([rng.uniform(-25, 25), rng.uniform(-25, 25), rng.uniform(-25, 25)])
    edge = anatomy.variety.edge_of_view
    if edge != "none":  # the scan's top (or bottom) slice cuts the tumour; PET ends at the same place
        low, high = anatomy.tumour.bounds()
        cut = low[2] + anatomy.variety.edge_depth * (high[2] - low[2])
        ct_centre[2] = cut - ct_extent_mm[2] / 2 if edge == "top" else cut + ct_extent_mm[2] / 2
        pet_centre[2] = cut - pet_extent_mm[2] / 2 if edge == "top" else cut + pet_extent_mm[2] / 2
    ct_grid = Grid.centred(ct_centre, ct_spacing, ct_extent_mm)
    pet_grid = Grid.centred(pet_centre, pet_spacing, pet_extent_mm)
    ct, gtvt = _render_ct(anatomy, ct_grid, rng)
    pet = _render_pet(anatomy, pet_grid, rng)
    return PhantomCase(ct=ct, ct_affine=ct_grid.affine, pet=pet, pet_affine=pet_grid.affine, gtvt=gtvt,
                       anatomy=anatomy)


def case_seed(seed: int, index: int) -> int:
    """Per-case seed from (run seed, case index): stable whatever the number of cases written."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_data_dtype(array.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))


def write_cases(out_dir: str | Path, n: int, seed: int, variety: str = "classic") -> list[str]:
    """Write ``n`` cases as ``<case>_ct/_pt/_gtvt.nii.gz`` (HECKTOR layout) and return their ids
    (``phantom_s<seed>_<index>``; ``phantom_wide_s<seed>_<index>`` for the wide variety)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = []
    prefix = "phantom" if variety == "classic" else f"phantom_{variety}"
    for index in range(n):
        case_id = f"{prefix}_s{seed}_{index:03d}"
        save_case(make_case(case_seed(seed, index), variety=variety), out, case_id)
        ids.append(case_id)
    return ids


def save_case(case: PhantomCase, out: Path, case_id: str) -> None:
    """One case's CT, PET and GTVt files in the HECKTOR layout."""
    _save_nifti(case.ct, case.ct_affine, out / f"{case_id}{CT_SUFFIX}")
    _save_nifti(case.pet, case.pet_affine, out / f"{case_id}{PET_SUFFIX}")
    _save_nifti(case.gtvt, case.ct_affine, out / f"{case_id}{GTVT_SUFFIX}")


def case_ids(data_dir: str | Path) -> list[str]:
    """Ids of the complete cases (CT, PET and GTVt files all present) in a directory, sorted."""
    directory = Path(data_dir)
    if not directory.is_dir():
        return []
    ids = (p.name[: -len(CT_SUFFIX)] for p in directory.glob(f"*{CT_SUFFIX}"))
    return sorted(i for i in ids
                  if (directory / f"{i}{PET_SUFFIX}").is_file() and (directory / f"{i}{GTVT_SUFFIX}").is_file())
