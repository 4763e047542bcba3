"""Wire schemas of the HTTP API (separate from the stored state)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Vector3 = tuple[float, float, float]
Index3 = tuple[int, int, int]


class ClickIn(BaseModel):
    """A click at a world position (mm, the NIfTI affine's space) or a working-grid voxel."""

    model_config = ConfigDict(extra="forbid")

    label: Literal["foreground", "background"]
    world_mm: Vector3 | None = Field(None, description="World coordinates in mm, as nibabel reads the affine.")
    voxel: Index3 | None = Field(None, description="Working-grid voxel index (i, j, k).")

    @model_validator(mode="after")
    def _one_position(self) -> ClickIn:
        if (self.world_mm is None) == (self.voxel is None):
            raise ValueError("give exactly one of world_mm or voxel")
        if self.world_mm is not None and not all(abs(v) < 1e9 for v in self.world_mm):
            raise ValueError("world_mm must be finite")
        return self


class ClicksIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clicks: list[ClickIn] = Field(min_length=1, max_length=64)


class ClickOut(BaseModel):
    label: Literal["foreground", "background"]
    voxel: Index3
    world_mm: Vector3


class GridOut(BaseModel):
    shape: Index3
    spacing_mm: float
    origin_mm: Vector3
    affine: list[list[float]] = Field(description="Working-grid voxel to world (mm) affine.")


class OriginalOut(BaseModel):
    shape: Index3
    affine: list[list[float]] = Field(description="The uploaded CT's voxel to world (mm) affine.")


class MaskSummary(BaseModel):
    voxels: int
    volume_ml: float
    bbox_min: Index3 | None = Field(description="Inclusive working-grid bounding box; null when empty.")
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


class SessionOut(BaseModel):
    id: str
    version: int
    clicks: list[ClickOut]
    grid: GridOut
    original: OriginalOut
    created_at: str
    expires_at: str


class ResultOut(BaseModel):
    """A version of the segmentation: the mask in the same response."""

    id: str
    version: int
    clicks: list[ClickOut]
    summary: MaskSummary
    mask: EncodedMask
    uncertainty: UncertaintyOut | None = Field(None, description="Null for versions computed without it.")


class CreatedOut(ResultOut):
    grid: GridOut
    original: OriginalOut
    expires_at: str
