"""Identifying DICOM attributes never reach the logs of a real `icr serve` process."""

from __future__ import annotations

import copy

import pytest
from pydicom.dataset import Dataset

from tests.api.conftest import Service, embedded_service  # noqa: F401  (the fixture, started once per run)
from tests.dicom.conftest import PATIENT_ID, PATIENT_NAME, multipart, part10

pytestmark = pytest.mark.slow  # a real icr serve process


def test_patient_identity_stays_out_of_the_logs(embedded_service: Service, pair: dict[str, list[Dataset]],  # noqa: F811
                                               pair_files: dict[str, list[bytes]]) -> None:
    with embedded_service.client() as client:
        created = client.post("/v1/sessions", files=multipart(pair_files["ct"], pair_files["pet"]))
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        for format in ("rtstruct", "dicom-seg"):
            answer = client.get(f"/v1/sessions/{sid}/mask", params={"format": format})
            assert answer.status_code == 200 and PATIENT_ID.encode() in answer.content  # the object carries it
        broken = [copy.deepcopy(d) for d in pair["pet"]]
        for dataset in broken:
            del dataset.PatientWeight
        refused = client.post("/v1/sessions", files=multipart(pair_files["ct"], [part10(d) for d in broken]))
        assert refused.status_code == 422 and "PatientWeight" in refused.json()["detail"]
        assert PATIENT_ID not in refused.text
    logged = embedded_service.log_text()
    assert sid[:8] in logged or "POST /v1/sessions" in logged  # the log is the service's, and it was written
    for identifying in (PATIENT_ID, *PATIENT_NAME.split("^")):
        assert identifying not in logged
