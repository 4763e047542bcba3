"""Phantoms in DICOM: the same case as NIfTI and as DICOM gives the same session, SUV and truth."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient

from service.dicom.write_series import write_phantom
from service.imaging.nifti import read_nifti, write_nifti
from service.imaging.upload import UploadLimits, read_upload
from service.imaging.volume import Volume
from service.store.codec import decode_mask
from tests.dicom.test_outputs import dice, rasterise

LIMITS = UploadLimits(max_part_bytes=2**25, max_image_bytes=2**27, max_files=500)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Volume], Path]:
    from service.science.phantoms import make_case

    case = make_case(7, ct_extent_mm=(60.0, 60.0, 45.0), pet_extent_mm=(72.0, 72.0, 60.0))
    images = {"ct": Volume(case.ct, case.ct_affine), "pet": Volume(case.pet, case.pet_affine),
              "gtvt": Volume(case.gtvt, case.ct_affine)}
    folder = write_phantom(tmp_path_factory.mktemp("phantom-dicom"), "case7", images["ct"], images["pet"],
                           case.gtvt)
    return images, folder


def _files(folder: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(folder.glob("*.dcm"))]


def test_dicom_phantom_reads_as_its_nifti(phantom) -> None:
    images, folder = phantom
    ct, _ = read_upload(_files(folder / "ct"), "ct", LIMITS)
    pet, source = read_upload(_files(folder / "pt"), "pet", LIMITS)
    np.testing.assert_allclose(ct.affine, images["ct"].affine, atol=1e-5)
    np.testing.assert_allclose(pet.affine, images["pet"].affine, atol=1e-5)
    np.testing.assert_allclose(ct.array, np.rint(images["ct"].array), atol=0.5)
    scale = float(np.abs(images["pet"].array).max())
    assert np.abs(pet.array - images["pet"].array).max() <= 0.01 * scale  # SUV within 1 % of the range
    assert source is not None and source.suv is not None and source.suv["units"] == "BQML"


def test_truth_objects_match_the_phantom_mask(phantom) -> None:
    images, folder = phantom
    ct_datasets = [pydicom.dcmread(path) for path in sorted((folder / "ct").glob("*.dcm"))]
    truth = images["gtvt"].array > 0.5
    structure = pydicom.dcmread(folder / "gtvt-rtstruct.dcm")
    assert dice(rasterise(structure, ct_datasets), truth) >= 0.95
    segmentation = hd.seg.segread(folder / "gtvt-seg.dcm")
    uids = [d.SOPInstanceUID for d in sorted(ct_datasets, key=lambda d: float(d.ImagePositionPatient[2]))]
    frames = segmentation.get_pixels_by_source_instance(uids, segment_numbers=[1], ignore_spatial_locations=True)
    np.testing.assert_array_equal(frames[..., 0].transpose(2, 1, 0).astype(bool), truth)


def test_nifti_and_dicom_uploads_give_the_same_initial_mask(client: TestClient, phantom) -> None:
    images, folder = phantom
    nifti = [("ct", ("ct.nii.gz", write_nifti(images["ct"].array, images["ct"].affine))),
             ("pet", ("pt.nii.gz", write_nifti(images["pet"].array, images["pet"].affine)))]
    dicom = [*(("ct", (f"{n}.dcm", data)) for n, data in enumerate(_files(folder / "ct"))),
             *(("pet", (f"{n}.dcm", data)) for n, data in enumerate(_files(folder / "pt")))]
    bodies = []
    for files in (nifti, dicom):
        answer = client.post("/v1/sessions", files=files)
        assert answer.status_code == 201, answer.text
        bodies.append(answer.json())
    masks = [decode_mask(body["mask"]) for body in bodies]
    probabilities = [read_nifti(client.get(f"/v1/sessions/{b['id']}/probability").content, role="p",
                                max_decompressed_bytes=2**26).array for b in bodies]
    assert np.abs(probabilities[0] - probabilities[1]).max() < 0.01
    if masks[0].any() or masks[1].any():
        assert dice(masks[0], masks[1]) >= 0.99
    rtstruct = client.get(f"/v1/sessions/{bodies[1]['id']}/mask?format=rtstruct")
    assert rtstruct.status_code == 200
    assert pydicom.dcmread(io.BytesIO(rtstruct.content)).PatientID == "case7"
