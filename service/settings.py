"""Service settings, from ICR_* environment variables (and REDIS_URL)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights" / "demo"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ICR_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ICR_REDIS_URL", "REDIS_URL"),
        description="Redis URL; unset runs the embedded default (in-process store and engine).",
    )
    redis_prefix: str = Field("icr", description="Prefix of every Redis key the service writes.")
    weights: Path = Field(DEMO_WEIGHTS, description="Checkpoint directory (manifest.json + members).")
    device: str = Field("auto", description="'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when present).")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for inference; default: torch's.")
    refine_window: int | None = Field(
        None,
        ge=8,
        description="Windowed refinement: recompute only a cube of this many voxels per edge around the new "
        "click(s). Changes results (see docs/performance.md); unset: exact full-volume refinement.",
    )
    refine_margin: int = Field(
        16, ge=0, description="Voxels per side of the refinement window whose outputs are discarded (no seams)."
    )
    autocast: Literal["auto", "off", "float16", "bfloat16"] = Field(
        "auto",
        description="Reduced-precision inference: float16 (CUDA) or bfloat16; auto = bfloat16 on CPUs with "
        "bfloat16 instructions, float32 elsewhere; off = exact float32. Changes results slightly "
        "(see docs/performance.md).",
    )
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys; when set, a bearer key is required and owns its sessions."
    )
    session_ttl_s: float = Field(3600.0, gt=0, description="Idle time after which a session expires.")
    max_upload_mb: float = Field(200.0, gt=0, description="Largest accepted file, as uploaded.")
    max_image_mb: float = Field(1024.0, gt=0, description="Largest accepted image once decompressed.")
    max_dicom_files: int = Field(2000, ge=1, description="Most DICOM files (slices) in one role's upload.")
    dicomweb_url: str | None = Field(
        None, description="DICOMweb base URL of the PACS sessions pull from and export to (QIDO/WADO/STOW-RS)."
    )
    dicomweb_username: str | None = Field(None, description="HTTP basic user for the PACS, with dicomweb_password.")
    dicomweb_password: SecretStr | None = Field(None, description="HTTP basic password for the PACS.")
    dicomweb_token: SecretStr | None = Field(None, description="Bearer token for the PACS (instead of basic auth).")
    dicomweb_timeout_s: float = Field(60.0, gt=0, description="Timeout of one request to the PACS.")
    job_timeout_s: float = Field(300.0, gt=0, description="How long a request waits for the engine.")
    claim_idle_s: float = Field(30.0, gt=0, description="A job unrefreshed this long is taken by another worker.")
    host: str = "127.0.0.1"
    port: int = 8000

    def api_key_set(self) -> frozenset[str]:
        if self.api_keys is None:
            return frozenset()
        return frozenset(k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip())
