"""Service settings, from ICR_* environment variables (and REDIS_URL)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_API_KEY_CHARS = 8
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
    honour_clicks: bool = Field(
        True,
        description="The click guarantee: every click's label is set at its clicked voxel before the mask is "
        "made and the probability stored (service/engine/guarantee.py). Off only for research.",
    )
    border_passes: int = Field(
        1,
        ge=0,
        le=6,
        description="Extra passes a job may run when its mask reaches a border of its window that the CT "
        "continues beyond (the window shifted half an edge that way; service/engine/windows.py); 0: none.",
    )
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys; when set, a bearer key is required and owns its sessions."
    )
    owner_secret: SecretStr | None = Field(
        None,
        description="Server secret that keys the HMAC under which sessions record their owner's API key; "
        "required with ICR_API_KEYS in Redis mode (all replicas share it), random per process when embedded.",
    )
    max_sessions_per_key: int = Field(64, ge=1, description="Live sessions one API key may hold (429 beyond).")
    max_requests_per_minute: int = Field(600, ge=1, description="Session requests one API key may make a minute.")
    max_clicks_per_session: int = Field(200, ge=1, description="Clicks a session may hold (429 beyond).")
    max_clicks_per_request: int = Field(32, ge=1, description="Clicks one request may add (429 beyond).")
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
    worker_metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Port of a worker's /metrics, /healthz and /readyz (bound to ICR_HOST); "
        "unset: none. 0 picks a free port.",
    )
    host: str = "127.0.0.1"
    port: int = 8000

    @field_validator("api_keys")
    @classmethod
    def _keys_are_well_formed(cls, value: SecretStr | None) -> SecretStr | None:
        """Refuse a key list that would silently turn auth off or hold unusable keys."""
        if value is None or value.get_secret_value() == "":
            return None  # unset (docker compose passes an empty value when the variable is unset)
        keys = [k.strip() for k in value.get_secret_value().split(",")]
        if any(len(k) < MIN_API_KEY_CHARS or any(c.isspace() for c in k) for k in keys):
            raise ValueError(
                f"ICR_API_KEYS must be comma-separated keys of at least {MIN_API_KEY_CHARS} characters without "
                "spaces (an empty entry or a short key is refused: unset the variable to turn auth off)"
            )
        return value

    def api_key_set(self) -> frozenset[str]:
        if self.api_keys is None:
            return frozenset()
        return frozenset(k.strip() for k in self.api_keys.get_secret_value().split(","))
