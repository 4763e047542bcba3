"""A PACS over DICOMweb (dicomweb-client): find a study's CT and PET, pull them, store results.

Series are picked by Modality (CT, PT) and FrameOfReferenceUID when the caller does not
name them: a CT and a PET in one frame of reference are a co-registered pair. Errors are
:class:`PacsError` subclasses whose messages carry UIDs at most, never patient data.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

MODALITY = "00080060"
SERIES_UID = "0020000E"
SOP_UID = "00080018"
FRAME_OF_REFERENCE = "00200052"
RELATED_INSTANCES = "00201209"


class PacsError(Exception):
    """The PACS could not give or take what was asked."""


class PacsUnavailable(PacsError):
    """The PACS did not answer, or answered with an error."""


class StudyNotFound(PacsError):
    """No such study or series on the PACS."""


class AmbiguousSeries(PacsError):
    """More than one series fits; the caller must name one."""


class SeriesRefused(PacsError):
    """A named series is not what its role needs."""


@dataclass(frozen=True)
class PacsSettings:
    url: str
    username: str | None = None
    password: str | None = None
    token: str | None = None
    timeout_s: float = 60.0


@dataclass(frozen=True)
class SeriesInfo:
    uid: str
    modality: str
    frame_of_reference_uid: str
    instances: int | None


def connect(settings: PacsSettings) -> DICOMwebClient:
    session = requests.Session()
    if settings.username is not None:
        session.auth = (settings.username, settings.password or "")
    headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else None
    return DICOMwebClient(url=settings.url, session=session, headers=headers, timeout=settings.timeout_s)


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def study_series(client: DICOMwebClient, study: str) -> list[SeriesInfo]:
    """The CT and PT series of a study with their frames of reference."""
    try:
        found = client.search_for_series(study_instance_uid=study)
    except requests.RequestException as error:
        raise _unavailable(error) from error
    if not found:
        raise StudyNotFound(f"study {study} is not on the PACS")
    series = []
    for item in found:
        modality = str(_value(item, MODALITY) or "")
        if modality not in ("CT", "PT"):
            continue
        uid = str(_value(item, SERIES_UID))
        count = _value(item, RELATED_INSTANCES)
        series.append(SeriesInfo(uid, modality, _frame_of_reference(client, study, uid),
                                 None if count is None else int(count)))
    return series


def _frame_of_reference(client: DICOMwebClient, study: str, series: str) -> str:
    """Read from one instance's metadata: QIDO need not return it at series level."""
    try:
        instances = client.search_for_instances(study_instance_uid=study, series_instance_uid=series, limit=1)
        if not instances:
            return ""
        metadata = client.retrieve_instance_metadata(study, series, str(_value(instances[0], SOP_UID)))
    except requests.RequestException as error:
        raise _unavailable(error) from error
    return str(_value(metadata, FRAME_OF_REFERENCE) or "")


def pick_pair(series: Sequence[SeriesInfo], ct_uid: str | None, pet_uid: str | None) -> tuple[SeriesInfo, SeriesInfo]:
    """The CT and PET series to use: the named ones, else the one pair sharing a frame of reference."""
    cts = [s for s in series if s.modality == "CT"]
    pets = [s for s in series if s.modality == "PT"]
    ct = _named(series, ct_uid, "CT") if ct_uid else None
    pet = _named(series, pet_uid, "PT") if pet_uid else None
    if ct is None:
        cts = [s for s in cts if pet is None or s.frame_of_reference_uid == pet.frame_of_reference_uid]
    if pet is None:
        pets = [s for s in pets if ct is None or s.frame_of_reference_uid == ct.frame_of_reference_uid]
    pairs = [(c, p) for c in ([ct] if ct else cts) for p in ([pet] if pet else pets)
             if c.frame_of_reference_uid == p.frame_of_reference_uid]
    if len(pairs) == 1:
        return pairs[0]
    if not pairs:
        raise StudyNotFound(
            "the study has no CT and PET series in one frame of reference"
            f" (CT: {_uids(cts) or 'none'}; PT: {_uids(pets) or 'none'})"
        )
    raise AmbiguousSeries(
        "several CT/PET pairs fit; name ct_series and pet_series. Candidates: "
        + "; ".join(f"ct_series {c.uid} with pet_series {p.uid}" for c, p in pairs)
    )


def _named(series: Sequence[SeriesInfo], uid: str, modality: str) -> SeriesInfo:
    for item in series:
        if item.uid == uid:
            if item.modality != modality:
                raise SeriesRefused(f"series {uid} has Modality {item.modality}, not {modality}")
            return item
    raise StudyNotFound(f"series {uid} is not a CT or PT series of the study")


def _uids(series: Sequence[SeriesInfo]) -> str:
    return ", ".join(s.uid for s in series)


def retrieve(client: DICOMwebClient, study: str, series: SeriesInfo) -> list[Dataset]:
    try:
        return list(client.retrieve_series(study, series.uid))
    except requests.RequestException as error:
        raise _unavailable(error) from error
    except (InvalidDicomError, ValueError, EOFError) as error:  # parts dicomweb-client cannot read as Part 10
        raise PacsUnavailable(
            f"the PACS returned instances of series {series.uid} that are not readable DICOM Part 10 files"
        ) from error


def store(client: DICOMwebClient, dataset: Dataset) -> None:
    """STOW-RS one instance; raises :class:`PacsError` when the PACS refuses it.

    The instance travels as a Part 10 file with its preamble: dicomweb-client writes a
    dataset as it is, and readers (dicomweb-client's own among them) expect the preamble.
    """
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    try:
        client.store_instances([pydicom.dcmread(io.BytesIO(buffer.getvalue()))])
    except requests.RequestException as error:
        raise _unavailable(error) from error


def _unavailable(error: requests.RequestException) -> PacsError:
    response = getattr(error, "response", None)
    if response is not None and response.status_code == 404:
        return StudyNotFound("the PACS has no such study or series")
    status = f"HTTP {response.status_code}" if response is not None else type(error).__name__
    return PacsUnavailable(f"the PACS did not answer as expected ({status})")
