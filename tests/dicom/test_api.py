"""DICOM through the HTTP API: uploads as zip or parts, the source summary, masks as RTSTRUCT/SEG,
refusals with no session made, clicks in patient coordinates."""

from __future__ import annotations

import io
import logging

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset

from service.imaging.nifti import read_nifti
from service.store.codec import decode_mask
from tests.dicom.conftest import PATIENT_ID, PATIENT_NAME, multipart, part10, zip_of


def _create(client: TestClient, files: list, **data: str) -> dict:
    response = client.post("/v1/sessions", files=files, data=data)
    assert response.status_code == 201, response.text
    return response.json()


def _mask(body: dict) -> np.ndarray:
    return decode_mask(body["mask"])


def test_zip_and_parts_give_the_nifti_session(client: TestClient, pair_files, nifti_pair) -> None:
    nifti = _create(client, [("ct", ("ct.nii.gz", nifti_pair["ct"])), ("pet", ("pt.nii.gz", nifti_pair["pet"]))])
    parts = _create(client, multipart(pair_files["ct"], pair_files["pet"]))
    zipped = _create(client, [("ct", ("ct.zip", zip_of([(f"{n}.dcm", f) for n, f in enumerate(pair_files["ct"])]))),
                              ("pet", ("pt.zip", zip_of([(f"{n}.dcm", f) for n, f in enumerate(pair_files["pet"])])))])
    assert nifti["source"] is None
    for body in (parts, zipped):
        np.testing.assert_allclose(body["original"]["affine"], nifti["original"]["affine"], atol=1e-4)
        np.testing.assert_allclose(body["grid"]["origin_mm"], nifti["grid"]["origin_mm"], atol=1e-3)
        a, b = _mask(body), _mask(nifti)
        assert a.sum() + b.sum() == 0 or 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99
        source = body["source"]
        assert source["ct"]["modality"] == "CT" and source["ct"]["slices"] == 20
        assert source["pet"]["modality"] == "PT" and source["pet"]["slices"] == 14
        assert source["suv"]["units"] == "BQML" and source["suv"]["tags"]["PatientWeight"] == 75.0
        assert source["suv"]["factor"] == pytest.approx(75e3 / (350e6 * 2 ** (-3600 / 6586.2)))
        assert PATIENT_NAME.split("^")[1] not in str(body) and PATIENT_ID not in str(body)
    state = client.get(f"/v1/sessions/{zipped['id']}").json()
    assert state["source"] == zipped["source"]


@pytest.fixture(scope="module")
def dicom_session(client: TestClient, pair_files) -> dict:
    return _create(client, multipart(pair_files["ct"], pair_files["pet"]))


def test_mask_as_rtstruct_and_seg_follow_the_session(client: TestClient, dicom_session, pair) -> None:
    sid = dicom_session["id"]
    centre = np.asarray(dicom_session["grid"]["origin_mm"]) + 15.5
    lps = [-centre[0], -centre[1], centre[2]]
    clicked = client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [{"label": "foreground", "patient_mm": lps}]})
    assert clicked.status_code == 200, clicked.text
    click = clicked.json()["clicks"][0]
    np.testing.assert_allclose(click["patient_mm"], [-click["world_mm"][0], -click["world_mm"][1], click["world_mm"][2]])
    np.testing.assert_allclose(click["world_mm"], centre, atol=0.51)
    version = clicked.json()["version"]
    on_ct = read_nifti(client.get(f"/v1/sessions/{sid}/mask?space=original").content, role="mask",
                       max_decompressed_bytes=2**26).array.astype(bool)
    assert on_ct.any()
    seg_response = client.get(f"/v1/sessions/{sid}/mask?format=dicom-seg")
    assert seg_response.status_code == 200 and seg_response.headers["content-type"] == "application/dicom"
    segmentation = hd.seg.segread(io.BytesIO(seg_response.content))
    uids = [d.SOPInstanceUID for d in sorted(pair["ct"], key=lambda d: float(d.ImagePositionPatient[2]))]
    frames = segmentation.get_pixels_by_source_instance(uids, segment_numbers=[1], ignore_spatial_locations=True)
    np.testing.assert_array_equal(frames[..., 0].transpose(2, 1, 0).astype(bool), on_ct)
    assert segmentation.SeriesDescription == f"2S-ICR GTVt session v{version}"
    assert segmentation.get_segment_description(1).SegmentAlgorithmType == "SEMIAUTOMATIC"
    structure = pydicom.dcmread(io.BytesIO(client.get(f"/v1/sessions/{sid}/mask?format=rtstruct").content))
    assert structure.Modality == "RTSTRUCT" and structure.PatientID == PATIENT_ID
    from tests.dicom.test_outputs import dice, rasterise

    assert dice(rasterise(structure, pair["ct"]), on_ct) >= 0.95


def test_formats_refused_clearly(client: TestClient, dicom_session, nifti_pair) -> None:
    unknown = client.get(f"/v1/sessions/{dicom_session['id']}/mask?format=dicom")
    assert unknown.status_code == 422 and "format" in unknown.json()["detail"]
    nifti = _create(client, [("ct", ("ct.nii.gz", nifti_pair["ct"])), ("pet", ("pt.nii.gz", nifti_pair["pet"]))])
    for format in ("rtstruct", "dicom-seg"):
        answer = client.get(f"/v1/sessions/{nifti['id']}/mask?format={format}")
        assert answer.status_code == 409 and "NIfTI" in answer.json()["detail"]


def _edited(datasets: list[Dataset], **changes: object) -> list[bytes]:
    import copy

    copies = [copy.deepcopy(d) for d in datasets]
    for keyword, value in changes.items():
        setattr(copies[2], keyword, value)
    return [part10(d) for d in copies]


def test_malformed_series_get_422_and_make_no_session(client: TestClient, pair, pair_files, caplog) -> None:
    ct, pet = pair_files["ct"], pair_files["pet"]
    other_frame = [part10(d) for d in _frame(pair["pet"], "1.2.3.4.5.6")]
    cases = {
        "missing slices": (ct[:4] + ct[5:], pet),
        "mixes 2 patients": (_edited(pair["ct"], PatientID="X"), pet),
        "different FrameOfReferenceUID": (ct, other_frame),
        "RadionuclideTotalDose (0018,1074) is missing": (ct, [part10(d) for d in _no_dose(pair["pet"])]),
        "not a DICOM file": (ct + [b"not dicom"], pet),
    }
    caplog.set_level(logging.DEBUG)
    for reason, (ct_parts, pet_parts) in cases.items():
        answer = client.post("/v1/sessions", files=multipart(ct_parts, pet_parts))
        assert answer.status_code == 422, (reason, answer.text)
        assert answer.json()["type"] == "urn:icr:problem:invalid-image"
        assert reason in answer.json()["detail"]
    assert not [r for r in caplog.records if "created" in r.getMessage()]  # no session was made
    logged = caplog.text
    assert PATIENT_ID not in logged and "Secretname" not in logged


def _frame(datasets: list[Dataset], uid: str) -> list[Dataset]:
    import copy

    copies = [copy.deepcopy(d) for d in datasets]
    for dataset in copies:
        dataset.FrameOfReferenceUID = uid
    return copies


def _no_dose(datasets: list[Dataset]) -> list[Dataset]:
    import copy

    copies = [copy.deepcopy(d) for d in datasets]
    for dataset in copies:
        del dataset.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose
    return copies


def test_centre_in_patient_coordinates(client: TestClient, nifti_pair) -> None:
    files = [("ct", ("ct.nii.gz", nifti_pair["ct"])), ("pet", ("pt.nii.gz", nifti_pair["pet"]))]
    world = _create(client, files, centre="2,-3,1")
    patient = _create(client, files, centre_patient_mm="-2,3,1")
    assert world["grid"]["origin_mm"] == patient["grid"]["origin_mm"]
    both = client.post("/v1/sessions", files=files, data={"centre": "2,-3,1", "centre_patient_mm": "-2,3,1"})
    assert both.status_code == 422 and both.json()["type"] == "urn:icr:problem:invalid-centre"


def test_series_without_frame_of_reference_make_a_session_but_no_dicom_outputs(client: TestClient, pair) -> None:
    import copy

    stripped = {}
    for role in ("ct", "pet"):
        copies = [copy.deepcopy(d) for d in pair[role]]
        for dataset in copies:
            del dataset.FrameOfReferenceUID
        stripped[role] = [part10(d) for d in copies]
    body = _create(client, multipart(stripped["ct"], stripped["pet"]))
    assert body["source"]["ct"]["frame_of_reference_uid"] == ""
    answer = client.get(f"/v1/sessions/{body['id']}/mask?format=rtstruct")
    assert answer.status_code == 409 and answer.json()["type"] == "urn:icr:problem:no-frame-of-reference"
