"""Uploaded bytes to pydicom datasets: DICOM Part 10 files, or a zip of them, untrusted.

A zip is read member by member with a streaming cap on what it decompresses (the
sizes its directory declares can lie), a cap on the member count, and refusal of
member names that climb out of the archive (``..``, absolute paths, drive letters).
Members must all be DICOM files; a DICOMDIR is skipped, and so is the metadata that
macOS adds to zips it makes (``__MACOSX/``, ``.DS_Store``).
"""

from __future__ import annotations

import io
import logging
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

import pydicom
from pydicom.dataset import Dataset, FileDataset

from service.imaging.volume import ImageError

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
DICOM_PREAMBLE_BYTES = 128
DICOM_MAGIC = b"DICM"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
_CHUNK = 1 << 20

# Header values can identify the patient: pydicom's reading notes (which quote them) stay quiet.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").setLevel(logging.ERROR)


@dataclass(frozen=True)
class FileLimits:
    """How much one role's upload may hold once unpacked."""

    max_bytes: int  # all files together, after decompression
    max_files: int


def is_zip(data: bytes) -> bool:
    return data[:4] in (ZIP_MAGIC, EMPTY_ZIP_MAGIC)


def is_dicom(data: bytes) -> bool:
    return data[DICOM_PREAMBLE_BYTES : DICOM_PREAMBLE_BYTES + 4] == DICOM_MAGIC


def unzip(data: bytes, *, role: str, limits: FileLimits) -> list[bytes]:
    """The archive's member files (metadata skipped), each fully read within the limits."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise ImageError(f"{role}: the zip archive is corrupt") from error
    if len(members) > limits.max_files:
        raise ImageError(f"{role}: the zip archive holds {len(members)} files, over the limit of {limits.max_files}")
    files: list[bytes] = []
    budget = limits.max_bytes
    for index, member in enumerate(members):
        if _is_traversal(member.filename):
            raise ImageError(f"{role}: zip member {index + 1} has a name that leaves the archive (path traversal)")
        if _is_metadata(member.filename):
            continue
        if member.flag_bits & 0x1:
            raise ImageError(f"{role}: zip member {index + 1} is encrypted")
        if member.file_size > budget:
            raise ImageError(f"{role}: the zip archive decompresses to more than the limit of {limits.max_bytes} bytes")
        content = _read_member(archive, member, budget, role=role, limit=limits.max_bytes)
        budget -= len(content)
        files.append(content)
    return files


def _is_traversal(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":")


def _is_metadata(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.parts[:1] == ("__MACOSX",) or path.name in (".DS_Store", "Thumbs.db")


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, budget: int, *, role: str, limit: int) -> bytes:
    chunks: list[bytes] = []
    produced = 0
    try:
        with archive.open(member) as stream:
            while chunk := stream.read(min(_CHUNK, budget - produced + 1)):
                produced += len(chunk)
                if produced > budget:
                    raise ImageError(f"{role}: the zip archive decompresses to more than the limit of {limit} bytes")
                chunks.append(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, ValueError) as error:
        raise ImageError(f"{role}: the zip archive is corrupt or uses an unsupported compression") from error
    return b"".join(chunks)


def parse_dicom(files: list[bytes], *, role: str, what: str = "file") -> list[Dataset]:
    """Parse DICOM Part 10 files; DICOMDIRs are dropped, anything not DICOM is refused."""
    datasets: list[Dataset] = []
    for index, data in enumerate(files):
        if not is_dicom(data):
            raise ImageError(f"{role}: {what} {index + 1} is not a DICOM file (no DICM signature)")
        dataset = read_dataset(data, role=role, what=f"{what} {index + 1}")
        if str(getattr(dataset.file_meta, "MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
            continue
        datasets.append(dataset)
    return datasets


def read_dataset(data: bytes, *, role: str, what: str) -> FileDataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data))
    except Exception as error:  # pydicom raises many types on malformed files
        raise ImageError(f"{role}: {what} is not a readable DICOM file") from error
