"""``icr phantoms --dicom``: the phantom cases written by the science code, also as DICOM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from service.dicom.write_series import write_phantom
from service.imaging.nifti import load_nifti_file

DICOM_FOLDER = "dicom"
CASE_FILES = {"ct": "_ct.nii.gz", "pet": "_pt.nii.gz", "gtvt": "_gtvt.nii.gz"}


def write_dicom_cases(data_dir: Path, case_ids: Sequence[str]) -> Path:
    """Each ``<case>_ct/_pt/_gtvt.nii.gz`` in ``data_dir`` as ``data_dir/dicom/<case>/``."""
    folder = data_dir / DICOM_FOLDER
    for case_id in case_ids:
        images = {role: load_nifti_file(data_dir / f"{case_id}{suffix}", role=role) for role, suffix in CASE_FILES.items()}
        write_phantom(folder, case_id, images["ct"], images["pet"], images["gtvt"].array)
    return folder
