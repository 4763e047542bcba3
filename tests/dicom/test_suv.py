"""SUVbw from PET headers (QIBA): the factor, the tags it used, and every refusal naming its tag."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from pydicom.dataset import Dataset

from service.dicom.series import read_series
from service.dicom.suv import suv_factor
from service.imaging.volume import ImageError
from tests.dicom.conftest import small_pet, subject

F18_HALF_LIFE_S = 6586.2


def _copies(pair: dict[str, list[Dataset]]) -> list[Dataset]:
    return [copy.deepcopy(d) for d in pair["pet"]]


def test_bqml_start_gives_the_phantom_suv(pair: dict[str, list[Dataset]]) -> None:
    volume, source = read_series(pair["pet"], role="pet", max_voxels=10**7)
    np.testing.assert_allclose(volume.array, small_pet().array, rtol=1e-3, atol=1e-3)
    expected = 75.0 * 1000 / (350e6 * math.pow(2, -3600 / F18_HALF_LIFE_S))  # by hand, from the written tags
    assert source.suv is not None
    assert source.suv["factor"] == pytest.approx(expected, rel=1e-9)
    assert source.suv["tags"]["scan_start_from"] == "SeriesDate/SeriesTime"
    assert source.suv["tags"]["injection_from"] == "RadiopharmaceuticalStartDateTime"
    assert source.suv["tags"]["decay_s"] == pytest.approx(3600)
    assert subject().suv_factor() == pytest.approx(expected)


def test_injection_time_without_date_and_admin_and_gml(pair: dict[str, list[Dataset]]) -> None:
    datasets = _copies(pair)
    for dataset in datasets:
        del dataset.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime
    factor, used = suv_factor(datasets)
    assert used["tags"]["injection_from"] == "SeriesDate/RadiopharmaceuticalStartTime"
    assert factor == pytest.approx(subject().suv_factor(), rel=1e-9)
    for dataset in datasets:
        dataset.DecayCorrection = "ADMIN"
    factor, used = suv_factor(datasets)
    assert factor == pytest.approx(75.0 * 1000 / 350e6) and used["tags"]["decay_s"] == 0
    for dataset in datasets:
        dataset.Units = "GML"
    assert suv_factor(datasets)[0] == 1.0


def test_series_time_after_acquisition_falls_back_to_acquisition(pair: dict[str, list[Dataset]]) -> None:
    datasets = _copies(pair)
    for dataset in datasets:
        dataset.SeriesTime = "120000"  # reset by post-processing, hours after the acquisition
    factor, used = suv_factor(datasets)
    assert used["tags"]["scan_start_from"] == "AcquisitionDate/AcquisitionTime"
    assert factor == pytest.approx(subject().suv_factor(), rel=1e-9)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda d: delattr(d, "PatientWeight"), "PatientWeight (0010,1030) is missing"),
        (lambda d: setattr(d, "PatientWeight", 0), "PatientWeight (0010,1030) must be a positive"),
        (lambda d: delattr(d, "Units"), "Units (0054,1001) is missing"),
        (lambda d: setattr(d, "Units", "CNTS"), "Units (0054,1001) is 'CNTS'"),
        (lambda d: setattr(d, "DecayCorrection", "NONE"), "DecayCorrection (0054,1102) is 'NONE'"),
        (lambda d: setattr(d, "CorrectedImage", ["ATTN"]), "CorrectedImage (0028,0051) lacks DECY"),
        (lambda d: delattr(d, "RadiopharmaceuticalInformationSequence"), "RadiopharmaceuticalInformationSequence"),
        (lambda d: delattr(d.RadiopharmaceuticalInformationSequence[0], "RadionuclideTotalDose"),
         "RadionuclideTotalDose (0018,1074) is missing"),
        (lambda d: delattr(d.RadiopharmaceuticalInformationSequence[0], "RadionuclideHalfLife"),
         "RadionuclideHalfLife (0018,1075) is missing"),
        (lambda d: [delattr(d.RadiopharmaceuticalInformationSequence[0], k) for k in
                    ("RadiopharmaceuticalStartDateTime", "RadiopharmaceuticalStartTime")],
         "RadiopharmaceuticalStartTime (0018,1072)"),
        (lambda d: setattr(d.RadiopharmaceuticalInformationSequence[0], "RadiopharmaceuticalStartDateTime",
                           "20240115120000"), "the injection (RadiopharmaceuticalStartDateTime) is after the scan start"),
        (lambda d: [delattr(d, k) for k in ("SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime")],
         "SeriesDate/SeriesTime (0008,0021/0031)"),
    ],
)
def test_unconvertible_pet_is_refused_naming_the_tag(pair: dict[str, list[Dataset]], edit, named: str) -> None:
    datasets = _copies(pair)
    for dataset in datasets:
        edit(dataset)
    with pytest.raises(ImageError) as raised:
        read_series(datasets, role="pet", max_voxels=10**7)
    assert named in str(raised.value)
    assert str(raised.value).startswith("pet: ")


def test_slices_that_disagree_on_the_dose_are_refused(pair: dict[str, list[Dataset]]) -> None:
    datasets = _copies(pair)
    datasets[3].RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose = 100e6
    with pytest.raises(ImageError, match="slices disagree on PatientWeight, RadionuclideTotalDose"):
        suv_factor(datasets)
