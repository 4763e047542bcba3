"""Wire schemas of the HTTP API (separate from the stored state)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Vector3 = tuple[float, float, float]
Index3 = tuple[int, int, int]


class ClickIn(BaseModel):
    """A click at a world position (RAS mm), a DICOM patient position (LPS mm) or a working-grid voxel."""

    model_config = ConfigDict(extra="forbid")

    label: Literal["foreground", "background"]
    world_mm: Vector3 | None = Field(None, description="World coordinates in mm (RAS), as nibabel reads the affine.")
    patient_mm: Vector3 | None = Field(
        None, description="DICOM patient coordinates in mm (LPS), as DICOM viewers show them."
    )
    voxel: Index3 | None = Field(
        None, description="Voxel index (i, j, k) on the session lattice: the session's `grid`, extended beyond its shape."
    )

    @model_validator(mode="after")
    def _one_position(self) -> ClickIn:
        given = [p for p in (self.world_mm, self.patient_mm, self.voxel) if p is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of world_mm, patient_mm or voxel")
        for name in ("world_mm", "patient_mm"):
            point = getattr(self, name)
            if point is not None and not all(abs(v) < 1e9 for v in point):
                raise ValueError(f"{name} must be finite")
        return self


class ClicksIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clicks: list[ClickIn] = Field(min_length=1, max_length=1024, description="At most ICR_MAX_CLICKS_PER_REQUEST.")


class ClickOut(BaseModel):
    label: Literal["foreground", "background"]
    voxel: Index3
    world_mm: Vector3 = Field(description="RAS mm.")
    patient_mm: Vector3 = Field(description="DICOM patient coordinates (LPS mm) of the same point.")


class SeriesOut(BaseModel):
    """A DICOM series a session was made from (identifying attributes are never returned)."""

    modality: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    slices: int


class SuvOut(BaseModel):
    factor: float = Field(description="SUVbw per stored Bq/ml (1 for Units GML).")
    units: str
    tags: dict[str, str | float] = Field(description="The header values the factor was computed from.")


class SourceOut(BaseModel):
    ct: SeriesOut | None
    pet: SeriesOut | None
    suv: SuvOut | None


class GridOut(BaseModel):
    shape: Index3
    spacing_mm: float
    origin_mm: Vector3
    affine: list[list[float]] = Field(description="Working-grid voxel to world (mm) affine.")


class WindowOut(GridOut):
    """The working window a version's `mask` and probability are on."""

    offset: Index3 = Field(description="Session-lattice index of the window's voxel (0, 0, 0).")
    windows: int = Field(description="How many windows the session's probability is stitched from.")


class ExtentOut(BaseModel):
    """Where clicks are accepted: the CT's extent."""

    low: Index3 = Field(description="First session-lattice voxel inside the CT.")
    high: Index3 = Field(description="Last session-lattice voxel inside the CT (inclusive).")
    world_low_mm: Vector3 = Field(description="The CT's world box (RAS mm), low corner.")
    world_high_mm: Vector3 = Field(description="The CT's world box (RAS mm), high corner.")


class OriginalOut(BaseModel):
    shape: Index3
    affine: list[list[float]] = Field(description="The uploaded CT's voxel to world (mm) affine.")


class MaskSummary(BaseModel):
    voxels: int
    volume_ml: float
    bbox_min: Index3 | None = Field(
        description="Inclusive bounding box of the whole session's mask (every window), on the session lattice; "
        "null when empty."
    )
    bbox_max: Index3 | None


class EncodedMask(BaseModel):
    encoding: Literal["packbits-zlib"]
    shape: Index3
    order: Literal["C"]
    data: str = Field(description="base64 of zlib-compressed numpy.packbits of the C-order flattened mask.")


class SuggestedClickOut(BaseModel):
    label: Literal["foreground", "background"]
    voxel: Index3
    world_mm: Vector3


class UncertaintyOut(BaseModel):
    """Where the ensemble's members disagree (service/engine/uncertainty.py gives the rules)."""

    members: int
    uncertain_voxels: int = Field(description="Working-grid voxels where some but not all members vote foreground.")
    uncertain_ml: float
    suggested_click: SuggestedClickOut | None = Field(
        description="A click into the largest region where the members disagree; null when they all agree."
    )


class SessionFrame(BaseModel):
    """Where a session lives: its lattice, the uploaded CT's geometry, its sources."""

    grid: GridOut = Field(
        description="The first working window. Its voxel indices, extended beyond its shape, are the session "
        "lattice that clicks (`voxel`) and bounding boxes use."
    )
    extent: ExtentOut
    original: OriginalOut
    expires_at: str
    source: SourceOut | None = Field(None, description="The DICOM series the session was made from; null for NIfTI.")
    placement: dict[str, Any] | None = Field(
        None,
        description="Where the working window was placed (centre_mm, world RAS) and why: the given centre, or the "
        "tumour found on PET/CT with the candidates and their scores (docs/localisation.md).",
    )


class SessionOut(SessionFrame):
    id: str
    version: int
    window: WindowOut
    clicks: list[ClickOut]
    created_at: str


class ResultOut(BaseModel):
    """A version of the segmentation: the mask in the same response."""

    id: str
    version: int
    window: WindowOut = Field(description="The grid of `mask`: the window the networks worked in last.")
    clicks: list[ClickOut]
    summary: MaskSummary
    mask: EncodedMask
    uncertainty: UncertaintyOut | None = Field(None, description="Null for versions computed without it.")


class CreatedOut(ResultOut, SessionFrame):
    """The new session's first version and where it lives."""


class DicomwebStudyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    study: str = Field(min_length=1, max_length=64, description="StudyInstanceUID on the configured PACS.")
    ct_series: str | None = Field(None, min_length=1, max_length=64, description="CT SeriesInstanceUID.")
    pet_series: str | None = Field(None, min_length=1, max_length=64, description="PET SeriesInstanceUID.")


class DicomwebSessionIn(BaseModel):
    """Create a session from a study on the configured PACS (DICOMweb)."""

    model_config = ConfigDict(extra="forbid")

    dicomweb: DicomwebStudyIn
    centre: Vector3 | None = Field(None, description="Region centre in world mm (RAS).")
    centre_patient_mm: Vector3 | None = Field(None, description="Region centre in DICOM patient mm (LPS).")


class ExportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["rtstruct", "dicom-seg"]


class ExportOut(BaseModel):
    format: Literal["rtstruct", "dicom-seg"]
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    version: int
