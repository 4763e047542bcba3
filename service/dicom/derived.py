"""What every object the service derives from a source series says about itself."""

from __future__ import annotations

from dataclasses import dataclass

from service import __version__

PRODUCT = "2S-ICR"
MANUFACTURER = "2S-ICR interactive segmentation service"
ROI_NAME = "GTVt"


@dataclass(frozen=True)
class Derivation:
    """The session version a mask comes from and the checkpoint that made it."""

    session_version: int
    clicks: int
    weights_digest: str
    origin: str = "session"  # what made the mask: a session, or e.g. a phantom's ground truth

    @property
    def series_description(self) -> str:
        return f"{PRODUCT} {ROI_NAME} {self.origin} v{self.session_version}"

    @property
    def algorithm_version(self) -> str:
        return self.weights_digest[:16] or "unknown"

    @property
    def software_versions(self) -> str:
        return f"{__version__} weights {self.algorithm_version}"

    @property
    def interactive(self) -> bool:
        return self.clicks > 0
