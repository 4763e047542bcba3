"""PET in Bq/ml to SUVbw from the DICOM header, as QIBA's vendor-neutral rule defines it.

SUVbw = activity concentration (Bq/ml) x PatientWeight (g) / injected dose decayed to
the scan start (Bq). With DecayCorrection ADMIN the images are already decay-corrected
to the injection, so the dose is not decayed; Units GML are SUVbw already. The scan
start is SeriesDate/SeriesTime unless that is later than the earliest acquisition
(post-processing can reset it), then the earliest AcquisitionDate/Time (or
AcquisitionDateTime). Anything else is refused naming the tag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import date, datetime, time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM

from service.imaging.volume import ImageError

SUPPORTED_DECAY_CORRECTIONS = ("START", "ADMIN")


def suv_factor(datasets: Sequence[Dataset], *, role: str = "pet") -> tuple[float, dict[str, Any]]:
    """(factor from Bq/ml to SUVbw, what it was computed from) for the slices of one series."""
    first = datasets[0]
    units = _text(first, "Units")
    if units is None:
        raise ImageError(f"{role}: Units (0054,1001) is missing, so the PET values cannot be taken to SUV")
    if any(_text(d, "Units") != units for d in datasets):
        raise ImageError(f"{role}: slices disagree on Units (0054,1001)")
    if units == "GML":
        return 1.0, {"factor": 1.0, "units": "GML", "tags": {"Units": "GML"}}
    if units != "BQML":
        raise ImageError(f"{role}: Units (0054,1001) is {units!r}; only BQML (or GML, already SUVbw) can be taken to SUVbw")
    corrections = _values(first, "CorrectedImage")
    if corrections and "DECY" not in corrections:
        raise ImageError(f"{role}: CorrectedImage (0028,0051) lacks DECY: the images are not decay-corrected")
    decay_correction = _text(first, "DecayCorrection")
    if decay_correction not in SUPPORTED_DECAY_CORRECTIONS:
        shown = "missing" if decay_correction is None else repr(decay_correction)
        raise ImageError(f"{role}: DecayCorrection (0054,1102) is {shown}; START or ADMIN is needed for SUV")
    weight_kg = _positive(first, "PatientWeight", "(0010,1030)", role)
    drug = _radiopharmaceutical(first, role)
    dose_bq = _positive(drug, "RadionuclideTotalDose", "(0018,1074)", role)
    half_life_s = _positive(drug, "RadionuclideHalfLife", "(0018,1075)", role)
    for dataset in datasets[1:]:
        other = _radiopharmaceutical(dataset, role)
        if (_positive(dataset, "PatientWeight", "(0010,1030)", role) != weight_kg
                or _positive(other, "RadionuclideTotalDose", "(0018,1074)", role) != dose_bq
                or _positive(other, "RadionuclideHalfLife", "(0018,1075)", role) != half_life_s
                or _text(dataset, "DecayCorrection") != decay_correction):
            raise ImageError(
                f"{role}: slices disagree on PatientWeight, RadionuclideTotalDose, RadionuclideHalfLife "
                "or DecayCorrection"
            )
    tags: dict[str, Any] = {
        "Units": units,
        "DecayCorrection": decay_correction,
        "PatientWeight": weight_kg,
        "RadionuclideTotalDose": dose_bq,
        "RadionuclideHalfLife": half_life_s,
    }
    decay_s = 0.0
    if decay_correction == "START":
        scan, scan_tags = _scan_start(datasets, role)
        injection, injection_tags = _injection(drug, first, role)
        decay_s = (scan - injection).total_seconds()
        if decay_s < 0:
            raise ImageError(
                f"{role}: the injection ({'/'.join(injection_tags)}) is after the scan start ({'/'.join(scan_tags)})"
            )
        tags["scan_start_from"] = "/".join(scan_tags)
        tags["injection_from"] = "/".join(injection_tags)
    decayed_dose_bq = dose_bq * math.pow(2.0, -decay_s / half_life_s)
    factor = weight_kg * 1000.0 / decayed_dose_bq
    tags["decay_s"] = decay_s
    return factor, {"factor": factor, "units": units, "tags": tags}


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = getattr(dataset, keyword, None)
    if value is None or value == "":
        return None
    return str(value).strip().upper()


def _values(dataset: Dataset, keyword: str) -> tuple[str, ...]:
    value = getattr(dataset, keyword, None)
    if value is None or value == "":
        return ()
    items = value if isinstance(value, MultiValue) else [value]
    return tuple(str(v).strip().upper() for v in items)


def _positive(dataset: Dataset, keyword: str, tag: str, role: str) -> float:
    value = getattr(dataset, keyword, None)
    if value is None or value == "":
        raise ImageError(f"{role}: {keyword} {tag} is missing, so the PET values cannot be taken to SUV")
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise ImageError(f"{role}: {keyword} {tag} is not a number") from error
    if not (math.isfinite(number) and number > 0):
        raise ImageError(f"{role}: {keyword} {tag} must be a positive number")
    return number


def _radiopharmaceutical(dataset: Dataset, role: str) -> Dataset:
    sequence = getattr(dataset, "RadiopharmaceuticalInformationSequence", None)
    if not sequence:
        raise ImageError(
            f"{role}: RadiopharmaceuticalInformationSequence (0054,0016) is missing, so the PET values "
            "cannot be taken to SUV"
        )
    if len(sequence) != 1:
        raise ImageError(f"{role}: RadiopharmaceuticalInformationSequence (0054,0016) holds {len(sequence)} items; one is needed")
    item: Dataset = sequence[0]
    return item


_TEMPORAL: dict[str, tuple[type, type]] = {"date": (DA, date), "time": (TM, time), "date-time": (DT, datetime)}


def _temporal(value: Any, keyword: str, role: str, kind: str) -> Any:
    """A DA/TM/DT value as a datetime object; wall-clock (scanner-local) values, offsets dropped."""
    parser, expected = _TEMPORAL[kind]
    try:
        parsed: Any = value if isinstance(value, expected) else parser(value)
    except (TypeError, ValueError) as error:
        raise ImageError(f"{role}: {keyword} is not a DICOM {kind}") from error
    if not isinstance(parsed, expected):
        raise ImageError(f"{role}: {keyword} is not a DICOM {kind}")
    moment: Any = parsed
    return moment if kind == "date" else moment.replace(tzinfo=None)


def _date(value: Any, keyword: str, role: str) -> date:
    result: date = _temporal(value, keyword, role, "date")
    return result


def _time(value: Any, keyword: str, role: str) -> time:
    result: time = _temporal(value, keyword, role, "time")
    return result


def _datetime(value: Any, keyword: str, role: str) -> datetime:
    result: datetime = _temporal(value, keyword, role, "date-time")
    return result


def _date_and_time(dataset: Dataset, date_keyword: str, time_keyword: str, role: str) -> datetime | None:
    day, clock = getattr(dataset, date_keyword, None), getattr(dataset, time_keyword, None)
    if not day or not clock:
        return None
    return datetime.combine(_date(day, date_keyword, role), _time(clock, time_keyword, role))


def _acquisition(dataset: Dataset, role: str) -> tuple[datetime, tuple[str, ...]] | None:
    if getattr(dataset, "AcquisitionDateTime", None):
        return _datetime(dataset.AcquisitionDateTime, "AcquisitionDateTime", role), ("AcquisitionDateTime",)
    moment = _date_and_time(dataset, "AcquisitionDate", "AcquisitionTime", role)
    return None if moment is None else (moment, ("AcquisitionDate", "AcquisitionTime"))


def _scan_start(datasets: Sequence[Dataset], role: str) -> tuple[datetime, tuple[str, ...]]:
    series = _date_and_time(datasets[0], "SeriesDate", "SeriesTime", role)
    acquisitions = [a for a in (_acquisition(d, role) for d in datasets) if a is not None]
    earliest = min(acquisitions, key=lambda a: a[0]) if acquisitions else None
    if series is not None and (earliest is None or series <= earliest[0]):
        return series, ("SeriesDate", "SeriesTime")
    if earliest is not None:
        return earliest
    raise ImageError(
        f"{role}: SeriesDate/SeriesTime (0008,0021/0031) and AcquisitionDateTime are missing: the scan start "
        "the dose decays to is unknown"
    )


def _injection(drug: Dataset, dataset: Dataset, role: str) -> tuple[datetime, tuple[str, ...]]:
    if getattr(drug, "RadiopharmaceuticalStartDateTime", None):
        moment = _datetime(drug.RadiopharmaceuticalStartDateTime, "RadiopharmaceuticalStartDateTime", role)
        return moment, ("RadiopharmaceuticalStartDateTime",)
    clock = getattr(drug, "RadiopharmaceuticalStartTime", None)
    if not clock:
        raise ImageError(
            f"{role}: RadiopharmaceuticalStartTime (0018,1072) and RadiopharmaceuticalStartDateTime (0018,1078) "
            "are missing: the injection time is unknown"
        )
    day_keyword = "SeriesDate" if getattr(dataset, "SeriesDate", None) else "AcquisitionDate"
    day = getattr(dataset, day_keyword, None)
    if not day:
        raise ImageError(f"{role}: SeriesDate is missing: the injection day is unknown")
    moment = datetime.combine(_date(day, day_keyword, role), _time(clock, "RadiopharmaceuticalStartTime", role))
    return moment, (day_keyword, "RadiopharmaceuticalStartTime")
