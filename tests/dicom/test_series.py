"""Reading DICOM series: geometry as an independent reader (SimpleITK) gives it, HU, and refusals."""

from __future__ import annotations

import copy
import locale
import zipfile
from collections.abc import Iterator

import numpy as np
import pytest
from pydicom.dataset import Dataset

from service.dicom.series import read_series
from service.imaging.upload import UploadLimits, check_pair, read_upload
from service.imaging.volume import ImageError
from tests.dicom.conftest import CT_AFFINE, part10, small_ct, zip_of

LIMITS = UploadLimits(max_part_bytes=2**24, max_image_bytes=2**26, max_files=100)


def test_geometry_matches_simpleitk_and_ignores_file_order(pair: dict[str, list[Dataset]], tmp_path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    shuffled = [pair["ct"][i] for i in np.random.default_rng(1).permutation(len(pair["ct"]))]
    volume, source = read_upload([part10(d) for d in shuffled], "ct", LIMITS)
    for n, dataset in enumerate(shuffled):
        dataset.save_as(tmp_path / f"{n}.dcm", enforce_file_format=True)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    direction = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    sitk_lps = np.eye(4)
    sitk_lps[:3, :3], sitk_lps[:3, 3] = direction, image.GetOrigin()
    np.testing.assert_allclose(volume.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ sitk_lps, atol=1e-4)
    np.testing.assert_allclose(volume.affine, CT_AFFINE, atol=1e-4)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    np.testing.assert_array_equal(volume.array, small_ct().array)  # HU through RescaleIntercept
    positions = [float(pair["ct"][0].ImagePositionPatient[2]) + 2.5 * k for k in range(volume.shape[2])]
    by_uid = {d.SOPInstanceUID: float(d.ImagePositionPatient[2]) for d in shuffled}
    assert [by_uid[uid] for uid in source.sop_instance_uids] == pytest.approx(positions)


def test_oblique_series_keeps_its_orientation() -> None:
    from service.dicom.write_series import Subject, ct_series
    from service.imaging.volume import Volume

    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.8, -0.8, 3.0])
    affine[:3, 3] = (10.0, -5.0, 40.0)
    array = np.random.default_rng(0).integers(-500, 500, (12, 10, 4)).astype(np.float32)
    volume, _ = read_series(ct_series(Volume(array, affine), Subject()), role="ct", max_voxels=10**6)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(volume.array, array)


def _refusal(parts: list[bytes], role: str = "ct", limits: UploadLimits = LIMITS) -> str:
    with pytest.raises(ImageError) as raised:
        read_upload(parts, role, limits)
    return str(raised.value)


def _edited(datasets: list[Dataset], index: int, **changes: object) -> list[bytes]:
    copies = [copy.deepcopy(d) for d in datasets]
    for keyword, value in changes.items():
        setattr(copies[index], keyword, value)
    return [part10(d) for d in copies]


def test_refuses_missing_and_duplicated_slices(pair: dict[str, list[Dataset]]) -> None:
    ct = [part10(d) for d in pair["ct"]]
    assert "1 missing slices" in _refusal(ct[:5] + ct[6:])
    duplicate = copy.deepcopy(pair["ct"][3])
    duplicate.SOPInstanceUID = "1.2.3.4.5"
    assert "duplicated slices" in _refusal([*ct, part10(duplicate)])
    assert "duplicated slices" in _refusal([*ct, ct[3]])


def test_refuses_uneven_spacing_and_gantry_tilt(pair: dict[str, list[Dataset]]) -> None:
    position = [float(v) for v in pair["ct"][4].ImagePositionPatient]
    uneven = _edited(pair["ct"], 4, ImagePositionPatient=[position[0], position[1], position[2] + 0.6])
    assert "inconsistent slice spacing" in _refusal(uneven)
    tilted = [copy.deepcopy(d) for d in pair["ct"]]
    for k, dataset in enumerate(tilted):
        x, y, z = (float(v) for v in dataset.ImagePositionPatient)
        dataset.ImagePositionPatient = [x, y + 0.5 * k, z]  # 11 degrees of tilt
    assert "gantry tilt" in _refusal([part10(d) for d in tilted])


def test_refuses_mixed_series_and_patients(pair: dict[str, list[Dataset]]) -> None:
    assert "mixes 2 series" in _refusal(_edited(pair["ct"], 2, SeriesInstanceUID="1.2.3.999"))
    assert "mixes 2 patients (PatientID)" in _refusal(_edited(pair["ct"], 2, PatientID="someone-else"))
    assert "Modality is 'CT'; pet needs PT" in _refusal([part10(d) for d in pair["ct"]], role="pet")


def test_refuses_missing_tags_naming_them(pair: dict[str, list[Dataset]]) -> None:
    copies = [copy.deepcopy(d) for d in pair["ct"]]
    del copies[0].ImageOrientationPatient
    assert "lacks ImageOrientationPatient" in _refusal([part10(d) for d in copies])
    copies = [copy.deepcopy(d) for d in pair["ct"]]
    del copies[1].RescaleIntercept
    assert "lacks RescaleIntercept" in _refusal([part10(d) for d in copies])
    assert "1 slice" in _refusal([part10(pair["ct"][0])])


def test_refuses_unsafe_or_foreign_zips(pair: dict[str, list[Dataset]]) -> None:
    files = [(f"series/{n}.dcm", part10(d)) for n, d in enumerate(pair["ct"])]
    assert "not a DICOM file" in _refusal([zip_of([*files, ("notes.txt", b"hello")])])
    assert "path traversal" in _refusal([zip_of([*files, ("../../etc/evil.dcm", files[0][1])])])
    assert "path traversal" in _refusal([zip_of([*files, ("/abs/evil.dcm", files[0][1])])])
    small = UploadLimits(max_part_bytes=2**24, max_image_bytes=2**26, max_files=10)
    assert "over the limit of 10" in _refusal([zip_of(files)], limits=small)
    bomb = zip_of([("zeros.dcm", bytes(80 * 2**20))])  # 80 MiB of zeros (over the 64 MiB limit), deflated to ~80 KiB
    assert len(bomb) < 2**20
    assert "decompresses to more than the limit" in _refusal([bomb])
    assert "corrupt" in _refusal([b"PK\x03\x04" + bytes(100)])
    assert "not DICOM files" in _refusal([b"abc", b"def"])


def test_zip_with_folders_dicomdir_and_mac_metadata_reads(pair: dict[str, list[Dataset]]) -> None:
    files = [(f"PATIENT/STUDY/SERIES/IM{n}", part10(d)) for n, d in enumerate(pair["ct"])]
    extras = [("__MACOSX/PATIENT/._IM0", b"\x00\x05\x16\x07"), (".DS_Store", b"junk")]
    volume, source = read_upload([zip_of([*files, *extras], zipfile.ZIP_STORED)], "ct", LIMITS)
    assert volume.shape == (48, 44, 20) and source is not None and len(source.sop_instance_uids) == 20


def test_ct_and_pet_must_share_patient_and_frame_of_reference(pair: dict[str, list[Dataset]]) -> None:
    _, ct = read_upload([part10(d) for d in pair["ct"]], "ct", LIMITS)
    pet_files = _edited(pair["pet"], 0)
    _, pet = read_upload(pet_files, "pet", LIMITS)
    check_pair(ct, pet)
    other = [copy.deepcopy(d) for d in pair["pet"]]
    for dataset in other:
        dataset.FrameOfReferenceUID = "1.2.3.77"
    _, moved = read_upload([part10(d) for d in other], "pet", LIMITS)
    with pytest.raises(ImageError, match="different FrameOfReferenceUID"):
        check_pair(ct, moved)


def test_compressed_series_decode(pair: dict[str, list[Dataset]]) -> None:
    from pydicom.uid import JPEG2000Lossless, RLELossless

    expected, _ = read_series(pair["ct"], role="ct", max_voxels=10**7)
    for syntax in (RLELossless, JPEG2000Lossless):
        copies = [copy.deepcopy(d) for d in pair["ct"]]
        try:
            for dataset in copies:
                dataset.compress(syntax)
        except (RuntimeError, NotImplementedError) as error:
            pytest.skip(f"no encoder for {syntax.name} here: {error}")
        volume, _ = read_upload([part10(d) for d in copies], "ct", LIMITS)
        np.testing.assert_array_equal(volume.array, expected.array)


@pytest.fixture
def kept_locale() -> Iterator[None]:
    """GDCM's writer sets the C locale process-wide; later tests write UTF-8 text by the locale."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def test_series_written_by_simpleitk_reads_like_simpleitk_reads_it(tmp_path, kept_locale: None) -> None:
    """An independent writer (SimpleITK/GDCM), which omits FrameOfReferenceUID, read back by both."""
    sitk = pytest.importorskip("SimpleITK")
    array = np.random.default_rng(3).integers(-1000, 1000, (6, 18, 20)).astype(np.int16)  # (k, j, i)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((10.0, 20.0, -30.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in reversed(range(image.GetDepth())):
        plane = image[:, :, k]
        for tag, value in (("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.8.498.1"),
                           ("0020|000e", "1.2.826.0.1.3680043.8.498.2"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0008|0018", f"1.2.826.0.1.3680043.8.498.3.{k}"), ("0028|1052", "0"), ("0028|1053", "1")):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k}.dcm"))
        writer.Execute(plane)
    volume, source = read_upload([p.read_bytes() for p in tmp_path.glob("*.dcm")], "ct", LIMITS)
    assert source is not None and source.frame_of_reference_uid == ""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    again = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(again.GetDirection()).reshape(3, 3) * np.asarray(again.GetSpacing())
    lps[:3, 3] = again.GetOrigin()
    np.testing.assert_allclose(volume.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, atol=1e-4)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(again).transpose(2, 1, 0))
    np.testing.assert_array_equal(volume.array, array.transpose(2, 1, 0))


def test_multiframe_ct_reads_as_its_single_frame_series(pair: dict[str, list[Dataset]]) -> None:
    """An Enhanced CT made by an independent converter (highdicom's legacy converter)."""
    import io

    import highdicom as hd
    import pydicom

    single, _ = read_series(pair["ct"], role="ct", max_voxels=10**7)
    files = [pydicom.dcmread(io.BytesIO(part10(d))) for d in pair["ct"]]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(files, series_instance_uid=hd.UID(), series_number=9,
                                                        sop_instance_uid=hd.UID(), instance_number=1)
    volume, source = read_upload([part10(enhanced)], "ct", LIMITS)
    np.testing.assert_allclose(volume.affine, single.affine, atol=1e-4)
    np.testing.assert_array_equal(volume.array, single.array)
    assert source is not None and source.multiframe and len(source.sop_instance_uids) == 20
    assert "mixes 2 series" in _refusal([part10(enhanced), part10(pair["ct"][0])])
