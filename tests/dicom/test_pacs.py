"""A DICOMweb round trip through a real Orthanc: pull a study, click, export RTSTRUCT and SEG, read back."""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.dicom import orthanc
from tests.dicom.conftest import part10
from tests.dicom.test_outputs import dice, rasterise

pytestmark = pytest.mark.slow  # starts an Orthanc process


def as_files(datasets: list[Dataset]) -> list[Dataset]:
    """As a modality sends them: Part 10 files, preamble included."""
    return [pydicom.dcmread(io.BytesIO(part10(d))) for d in datasets]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[orthanc.Orthanc]:
    reason = orthanc.missing()
    if reason is not None:
        pytest.skip(reason)
    with orthanc.running(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def pacs_client(pacs: orthanc.Orthanc) -> DICOMwebClient:
    import requests

    session = requests.Session()
    session.auth = pacs.auth()
    return DICOMwebClient(url=pacs.dicomweb_url, session=session)


@pytest.fixture(scope="module")
def service(pacs: orthanc.Orthanc, tiny_weights: Path) -> Iterator[TestClient]:
    from service.api.app import create_app
    from service.settings import Settings

    user, password = pacs.auth()
    settings = Settings(weights=tiny_weights, device="cpu", torch_threads=1, max_dicom_files=200, job_timeout_s=120,
                        api_keys=None, redis_url=None, dicomweb_url=pacs.dicomweb_url, dicomweb_username=user,
                        dicomweb_password=password)
    with TestClient(create_app(settings)) as client:
        yield client


def test_pull_click_export_and_read_back(service: TestClient, pacs_client: DICOMwebClient,
                                         pair: dict[str, list[Dataset]]) -> None:
    pacs_client.store_instances(as_files(pair["ct"] + pair["pet"]))
    study = pair["ct"][0].StudyInstanceUID
    created = service.post("/v1/sessions", json={"dicomweb": {"study": study}})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["source"]["ct"]["series_instance_uid"] == pair["ct"][0].SeriesInstanceUID
    assert body["source"]["pet"]["series_instance_uid"] == pair["pet"][0].SeriesInstanceUID
    sid = body["id"]
    centre = np.asarray(body["grid"]["origin_mm"]) + 15.5
    clicked = service.post(f"/v1/sessions/{sid}/clicks",
                           json={"clicks": [{"label": "foreground", "patient_mm": [-centre[0], -centre[1], centre[2]]}]})
    assert clicked.status_code == 200, clicked.text
    exported = {}
    for format in ("rtstruct", "dicom-seg"):
        answer = service.post(f"/v1/sessions/{sid}/export", json={"format": format})
        assert answer.status_code == 200, answer.text
        exported[format] = answer.json()
        assert exported[format]["study_instance_uid"] == study and exported[format]["version"] == 1
    structure = pacs_client.retrieve_instance(study, exported["rtstruct"]["series_instance_uid"],
                                              exported["rtstruct"]["sop_instance_uid"])
    seg = hd.seg.Segmentation.from_dataset(pacs_client.retrieve_instance(
        study, exported["dicom-seg"]["series_instance_uid"], exported["dicom-seg"]["sop_instance_uid"]))
    from service.imaging.nifti import read_nifti

    on_ct = read_nifti(service.get(f"/v1/sessions/{sid}/mask?space=original").content, role="mask",
                       max_decompressed_bytes=2**26).array.astype(bool)
    assert structure.Modality == "RTSTRUCT" and structure.PatientID == pair["ct"][0].PatientID
    assert dice(rasterise(structure, pair["ct"]), on_ct) >= 0.95
    uids = [d.SOPInstanceUID for d in sorted(pair["ct"], key=lambda d: float(d.ImagePositionPatient[2]))]
    frames = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], ignore_spatial_locations=True)
    np.testing.assert_array_equal(frames[..., 0].transpose(2, 1, 0).astype(bool), on_ct)


def test_ambiguous_and_unknown_studies(service: TestClient, pacs_client: DICOMwebClient,
                                       pair: dict[str, list[Dataset]]) -> None:
    study = generate_uid()
    copies = []
    for datasets in (pair["ct"], pair["pet"], pair["pet"]):  # two PET series in the CT's frame of reference
        series = generate_uid()
        for dataset in datasets:
            clone = copy.deepcopy(dataset)
            clone.StudyInstanceUID, clone.SeriesInstanceUID, clone.SOPInstanceUID = study, series, generate_uid()
            clone.file_meta.MediaStorageSOPInstanceUID = clone.SOPInstanceUID
            copies.append(clone)
    pacs_client.store_instances(as_files(copies))
    answer = service.post("/v1/sessions", json={"dicomweb": {"study": study}})
    assert answer.status_code == 409 and answer.json()["type"] == "urn:icr:problem:ambiguous-series"
    pet_series = {d.SeriesInstanceUID for d in copies if d.Modality == "PT"}
    assert all(uid in answer.json()["detail"] for uid in pet_series)
    chosen = min(pet_series)
    named = service.post("/v1/sessions", json={"dicomweb": {"study": study, "pet_series": chosen}})
    assert named.status_code == 201 and named.json()["source"]["pet"]["series_instance_uid"] == chosen
    missing = service.post("/v1/sessions", json={"dicomweb": {"study": "1.2.3.999"}})
    assert missing.status_code == 404 and missing.json()["type"] == "urn:icr:problem:study-not-found"


def test_unreadable_instances_from_the_pacs_are_a_502(service: TestClient, pacs_client: DICOMwebClient,
                                                      pair: dict[str, list[Dataset]]) -> None:
    """Instances stored without a Part 10 preamble come back unreadable to dicomweb-client: 502 (the PACS), not 500."""
    study = generate_uid()
    bare = []
    for datasets in (pair["ct"], pair["pet"]):
        series = generate_uid()
        for dataset in datasets:
            clone = copy.deepcopy(dataset)
            clone.StudyInstanceUID, clone.SeriesInstanceUID, clone.SOPInstanceUID = study, series, generate_uid()
            clone.file_meta.MediaStorageSOPInstanceUID = clone.SOPInstanceUID
            bare.append(clone)  # plain datasets: dicomweb-client sends them without a preamble
    pacs_client.store_instances(bare)
    answer = service.post("/v1/sessions", json={"dicomweb": {"study": study}})
    assert answer.status_code == 502 and answer.json()["type"] == "urn:icr:problem:pacs-unavailable"
    assert "not readable DICOM Part 10" in answer.json()["detail"]
