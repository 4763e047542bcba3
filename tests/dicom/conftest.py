"""DICOM test data made here: small CT/PET series written with pydicom, zips of them, and an
in-process service (the real app, engine and store) to upload them to."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset

from service.dicom.write_series import Subject, ct_series, pet_series
from service.imaging.nifti import write_nifti
from service.imaging.volume import Volume

CT_AFFINE = np.array([[-1.0, 0, 0, 24.0], [0, -1.0, 0, 20.0], [0, 0, 2.5, -25.0], [0, 0, 0, 1]])
PET_AFFINE = np.array([[-4.0, 0, 0, 30.0], [0, -4.0, 0, 26.0], [0, 0, 4.0, -28.0], [0, 0, 0, 1]])
TUMOUR_MM = np.array([2.0, -3.0, 1.0])
PATIENT_NAME = "Quixote^Secretname"
PATIENT_ID = "PID-7731-SECRET"


def _world(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def small_ct() -> Volume:
    world = _world((48, 44, 20), CT_AFFINE)
    tumour = np.linalg.norm(world - TUMOUR_MM, axis=-1) < 7.0
    return Volume(np.where(tumour, 60.0, 40.0).astype(np.float32), CT_AFFINE)


def small_pet() -> Volume:
    world = _world((15, 14, 14), PET_AFFINE)
    suv = 1.0 + 9.0 * np.exp(-np.sum((world - TUMOUR_MM) ** 2, axis=-1) / (2 * 6.0**2))
    return Volume(suv.astype(np.float32), PET_AFFINE)


def subject() -> Subject:
    return Subject(patient_name=PATIENT_NAME, patient_id=PATIENT_ID)


def part10(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def zip_of(files: Sequence[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in files:
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def pair() -> dict[str, list[Dataset]]:
    """One subject's CT and PET series (one frame of reference)."""
    who = subject()
    return {"ct": ct_series(small_ct(), who), "pet": pet_series(small_pet(), who)}


@pytest.fixture(scope="session")
def pair_files(pair: dict[str, list[Dataset]]) -> dict[str, list[bytes]]:
    return {role: [part10(d) for d in datasets] for role, datasets in pair.items()}


@pytest.fixture(scope="session")
def nifti_pair() -> dict[str, bytes]:
    return {"ct": write_nifti(small_ct().array, CT_AFFINE), "pet": write_nifti(small_pet().array, PET_AFFINE)}


@pytest.fixture(scope="session")
def client(tiny_weights: Path) -> Iterator[TestClient]:
    """The real app in this process: embedded engine on the tiny checkpoint, in-memory store."""
    from service.api.app import create_app
    from service.settings import Settings

    settings = Settings(weights=tiny_weights, device="cpu", torch_threads=1, max_upload_mb=8, max_image_mb=64,
                        max_dicom_files=200, job_timeout_s=120, api_keys=None, redis_url=None)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def multipart(ct: Sequence[bytes], pet: Sequence[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [*((("ct", (f"ct{n}.dcm", data, "application/octet-stream")) for n, data in enumerate(ct))),
            *((("pet", (f"pt{n}.dcm", data, "application/octet-stream")) for n, data in enumerate(pet)))]
