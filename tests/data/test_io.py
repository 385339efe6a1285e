"""Tests for medrpn.data.io: every format loads to the same array/affine, DICOM sorting and rescale, discovery,
and one test per error condition (type + message naming the file and the problem)."""

from __future__ import annotations

import gzip
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.transforms import LoadImage
from pydicom.uid import generate_uid

from medrpn.data.errors import (
    CorruptScanError,
    EmptyInputError,
    InvalidImageError,
    MixedSeriesError,
    ScanError,
    ScanNotFoundError,
    SeriesGeometryError,
    UnsupportedFormatError,
)
from medrpn.data.io import PER_SLICE_META_KEYS, DiscoveryResult, ScanSource, SimpleITKReader, discover_scans, load_scan
from tests.data.conftest import (
    DIRECTIONS,
    LPS_TO_RAS,
    ORIGIN,
    SHAPE,
    SPACING,
    Geometry,
    make_volume,
    truncate,
    write_dicom_series,
    write_dx,
    write_itk,
    write_multiframe,
    write_nifti,
)

ATOL = 1e-4
OBLIQUE = Geometry("oblique", DIRECTIONS["oblique"], SPACING, ORIGIN, SHAPE)
META_KEYS = {
    "filename_or_obj",
    "scan_id",
    "source_format",
    "modality",
    "spacing",
    "original_affine",
    "space",
    "series_uid",
    "study_uid",
    "frame_of_reference_uid",
    "sop_instance_uids",
    "frame_numbers",
    "source_files",
}


def _array(image: MetaTensor) -> np.ndarray:
    return image.as_tensor().numpy()


def _affine(image: MetaTensor) -> np.ndarray:
    return image.affine.numpy()


def _raises(exc_type: type[ScanError], path: Path, *words: str) -> pytest.ExceptionInfo[ScanError]:
    """Load ``path`` and check the exception type, that it names the file and contains ``words``."""
    with pytest.raises(exc_type) as info:
        load_scan(path)
    message = str(info.value)
    assert path.name in message, message
    for word in words:
        assert word.lower() in message.lower(), message
    return info


# ---------------------------------------------------------------------------------------------------------------
# All formats agree
# ---------------------------------------------------------------------------------------------------------------
def test_every_format_loads_same_array_and_affine(tmp_path: Path, geometry: Geometry, volume: np.ndarray) -> None:
    paths = {
        "nifti": write_nifti(tmp_path / "ct.nii.gz", volume, geometry.ras),
        "nii": write_nifti(tmp_path / "plain.nii", volume, geometry.ras),
        "mhd": write_itk(tmp_path / "ct.mhd", volume, geometry),
        "mha": write_itk(tmp_path / "ct.mha", volume, geometry),
        "nrrd": write_itk(tmp_path / "ct.nrrd", volume, geometry),
        "dicom": write_dicom_series(
            tmp_path / "series", volume, geometry, slopes=[1, 2, 0.5, 1], intercepts=[-1024, -1000, -1024, 0]
        ).folder,
    }
    write_multiframe(tmp_path / "enhanced.dcm", volume, geometry)
    paths["multiframe"] = tmp_path / "enhanced.dcm"
    for name, path in paths.items():
        image = load_scan(path)
        assert isinstance(image, MetaTensor), name
        assert image.dtype == torch.float32, name
        assert tuple(image.shape) == (1, *SHAPE), name
        np.testing.assert_allclose(_array(image)[0], volume, atol=ATOL, err_msg=name)
        np.testing.assert_allclose(_affine(image), geometry.ras, atol=ATOL, err_msg=name)
        assert image.meta["space"] == "RAS"
        np.testing.assert_allclose(image.meta["spacing"], SPACING, atol=ATOL, err_msg=name)
        np.testing.assert_allclose(image.meta["original_affine"], geometry.ras, atol=ATOL, err_msg=name)


def test_world_point_maps_to_index_and_back(tmp_path: Path, geometry: Geometry, volume: np.ndarray) -> None:
    """Independent of the loader: take a pixel of a DICOM file, compute its LPS world point with the DICOM formula,
    map it through inv(affine) (with the RAS/LPS flip) and find the same value there; then map the index back."""
    series = write_dicom_series(tmp_path / "s", volume, geometry)
    nifti = load_scan(write_nifti(tmp_path / "ct.nii.gz", volume, geometry.ras))
    dicom = load_scan(series.folder)
    some_file = series.files_by_k[2]
    ds = pydicom.dcmread(some_file)
    row, col = 3, 4  # pixel_array[row, col]: j = row, i = column
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    world_lps = ipp + iop[:3] * col_spacing * col + iop[3:] * row_spacing * row
    hu = float(ds.pixel_array[row, col]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    for image in (dicom, nifti):
        world_ras = LPS_TO_RAS @ np.append(world_lps, 1.0)
        index = np.linalg.inv(_affine(image)) @ world_ras
        np.testing.assert_allclose(index[:3], [col, row, 2], atol=ATOL)
        i, j, k = (round(float(v)) for v in index[:3])
        assert float(_array(image)[0, i, j, k]) == pytest.approx(hu)
        back = LPS_TO_RAS @ _affine(image) @ np.array([i, j, k, 1.0])
        np.testing.assert_allclose(back[:3], world_lps, atol=ATOL)


def test_dicom_series_sorted_along_normal_not_by_name_or_instance_number(tmp_path: Path, volume: np.ndarray) -> None:
    series = write_dicom_series(tmp_path / "s", volume, OBLIQUE, seed=7)
    image = load_scan(series.folder)
    np.testing.assert_array_equal(_array(image)[0], volume)
    assert image.meta["sop_instance_uids"] == series.sop_uids_by_k
    assert image.meta["source_files"] == [str(p) for p in series.files_by_k]
    assert image.meta["frame_numbers"] == [1, 1, 1, 1]
    assert image.meta["series_uid"] == series.series_uid == image.meta["scan_id"]
    assert image.meta["study_uid"] == series.study_uid
    assert image.meta["frame_of_reference_uid"]
    assert image.meta["modality"] == "CT"
    assert image.meta["source_format"] == "dicom"


def test_rescale_slope_intercept_applied_per_slice(tmp_path: Path, volume: np.ndarray) -> None:
    slopes, intercepts = [1, 2, 0.5, 1], [-1024, -1000, -1024, 0]
    series = write_dicom_series(tmp_path / "s", volume, OBLIQUE, slopes=slopes, intercepts=intercepts)
    image = load_scan(series.folder)
    for k, path in enumerate(series.files_by_k):
        stored = pydicom.dcmread(path).pixel_array.T.astype(np.float64)
        expected = stored * slopes[k] + intercepts[k]
        np.testing.assert_allclose(_array(image)[0, :, :, k], expected)
        if (slopes[k], intercepts[k]) != (1, 0):
            assert not np.allclose(_array(image)[0, :, :, k], stored)
    assert float(_array(image).min()) == pytest.approx(-1000.0)


def test_multiframe_uses_functional_groups(tmp_path: Path, volume: np.ndarray) -> None:
    frame_of_k = write_multiframe(tmp_path / "enhanced.dcm", volume, OBLIQUE)
    assert frame_of_k != sorted(frame_of_k)  # frames are stored out of order
    image = load_scan(tmp_path / "enhanced.dcm")
    np.testing.assert_allclose(_array(image)[0], volume)
    np.testing.assert_allclose(_affine(image), OBLIQUE.ras, atol=ATOL)
    assert image.meta["frame_numbers"] == frame_of_k
    assert len(set(image.meta["sop_instance_uids"])) == 1
    assert len(image.meta["sop_instance_uids"]) == SHAPE[2]


def test_dx_single_frame_is_2d(tmp_path: Path) -> None:
    picture = np.arange(7 * 9, dtype=np.float32).reshape(7, 9) * 3 + 5  # (X, Y)
    ds = write_dx(tmp_path / "chest", picture, pixel_spacing=(0.15, 0.2), slope=1.0, intercept=5.0)
    image = load_scan(tmp_path / "chest")
    assert tuple(image.shape) == (1, 7, 9)
    np.testing.assert_allclose(_array(image)[0], picture)
    np.testing.assert_allclose(_array(image)[0], ds.pixel_array.T + 5.0)
    # no patient geometry: identity LPS direction, origin 0; i spacing = PixelSpacing[1], j = PixelSpacing[0]
    np.testing.assert_allclose(_affine(image), np.diag([-0.2, -0.15, 1.0, 1.0]), atol=ATOL)
    assert image.meta["spacing"] == pytest.approx([0.2, 0.15])
    assert image.meta["modality"] == "DX"
    assert image.meta["sop_instance_uids"] == [str(ds.SOPInstanceUID)]
    assert image.meta["scan_id"] == str(ds.SeriesInstanceUID)


def test_single_ct_slice_file_is_2d_with_geometry(tmp_path: Path, volume: np.ndarray) -> None:
    series = write_dicom_series(tmp_path / "s", volume, OBLIQUE)
    image = load_scan(series.files_by_k[1])
    assert tuple(image.shape) == (1, SHAPE[0], SHAPE[1])
    np.testing.assert_allclose(_array(image)[0], volume[:, :, 1])
    expected = OBLIQUE.ras.copy()
    expected[:3, 3] = (OBLIQUE.ras @ np.array([0, 0, 1, 1.0]))[:3]
    np.testing.assert_allclose(_affine(image), expected, atol=ATOL)


def test_flipped_determinant_nifti_and_mhd_agree(tmp_path: Path, volume: np.ndarray) -> None:
    """A left-handed grid (one axis flipped) cannot be DICOM, but NIfTI and MHD must still agree."""
    direction = np.diag([1.0, -1.0, 1.0]) @ DIRECTIONS["oblique"]
    geometry = Geometry("left-handed", direction, SPACING, ORIGIN, SHAPE)
    nifti = load_scan(write_nifti(tmp_path / "a.nii.gz", volume, geometry.ras))
    mhd = load_scan(write_itk(tmp_path / "a.mhd", volume, geometry))
    for image in (nifti, mhd):
        np.testing.assert_allclose(_array(image)[0], volume)
        np.testing.assert_allclose(_affine(image), geometry.ras, atol=ATOL)


def test_gantry_tilt_gives_sheared_affine(tmp_path: Path, volume: np.ndarray) -> None:
    axial = Geometry("axial", np.eye(3), SPACING, ORIGIN, SHAPE)
    series = write_dicom_series(tmp_path / "tilt", volume, axial, ipp_shift_per_slice=(0.0, 0.4, 0.0))
    image = load_scan(series.folder)
    expected = axial.lps.copy()
    expected[:3, 2] += [0.0, 0.4, 0.0]
    np.testing.assert_allclose(_affine(image), LPS_TO_RAS @ expected, atol=ATOL)


def test_2d_nifti_and_meta_are_uniform_and_json(tmp_path: Path, volume: np.ndarray) -> None:
    image2d = load_scan(write_nifti(tmp_path / "slice.nii.gz", volume[:, :, 0], OBLIQUE.ras))
    assert tuple(image2d.shape) == (1, SHAPE[0], SHAPE[1])
    image3d = load_scan(write_itk(tmp_path / "ct.nrrd", volume, OBLIQUE))
    dicom = load_scan(write_dicom_series(tmp_path / "s", volume, OBLIQUE).folder)
    for image, fmt, scan_id in ((image2d, "nifti", "slice"), (image3d, "nrrd", "ct"), (dicom, "dicom", None)):
        assert set(image.meta) >= META_KEYS
        assert image.meta["source_format"] == fmt
        if scan_id is not None:
            assert image.meta["scan_id"] == scan_id
            assert image.meta["modality"] == "unknown"
            assert image.meta["sop_instance_uids"] == []
        json.dumps({k: v for k, v in image.meta.items() if k != "affine"})
        text = json.dumps({k: v for k, v in image.meta.items() if k != "affine"})
        assert "Secret" not in text and "SECRET" not in text


@pytest.mark.filterwarnings("ignore::UserWarning")  # MONAI's LoadImage warns about optional pydicom plugins
def test_simpleitk_reader_is_a_monai_reader(tmp_path: Path, volume: np.ndarray) -> None:
    path = write_itk(tmp_path / "ct.mha", volume, OBLIQUE)
    reader = SimpleITKReader()
    assert reader.verify_suffix(str(path)) and reader.verify_suffix(["a.nii.gz", "b.NRRD"])
    assert not reader.verify_suffix("a.png")
    image = LoadImage(reader=SimpleITKReader(), image_only=True, ensure_channel_first=True)(path)
    assert tuple(image.shape) == (1, *SHAPE)
    np.testing.assert_allclose(image.numpy()[0], volume)
    np.testing.assert_allclose(image.affine.numpy(), OBLIQUE.ras, atol=ATOL)
    array, meta = reader.get_data(reader.read(path))
    assert array.shape == SHAPE
    assert list(meta["spatial_shape"]) == list(SHAPE)
    np.testing.assert_allclose(meta["spacing"], SPACING, atol=ATOL)
    assert np.isnan(meta["original_channel_dim"])
    # SimpleITK reading NIfTI agrees with nibabel
    nifti = write_nifti(tmp_path / "ct.nii.gz", volume, OBLIQUE.ras)
    via_sitk = LoadImage(reader=SimpleITKReader(), image_only=True, ensure_channel_first=True)(nifti)
    np.testing.assert_allclose(via_sitk.affine.numpy(), OBLIQUE.ras, atol=ATOL)
    np.testing.assert_allclose(via_sitk.numpy()[0], volume)
    _, lps_meta = SimpleITKReader(affine_lps_to_ras=False).get_data(reader.read(path))
    np.testing.assert_allclose(lps_meta["affine"], OBLIQUE.lps, atol=ATOL)


def test_compressed_dicom_falls_back_to_simpleitk(
    tmp_path: Path, volume: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    series = write_dicom_series(tmp_path / "s", volume, OBLIQUE, slopes=[2, 2, 2, 2], intercepts=[-1000] * 4)
    ds = pydicom.dcmread(series.files_by_k[0])
    try:
        ds.compress(pydicom.uid.JPEGLSLossless)
    except Exception as exc:  # pragma: no cover - depends on installed encoders
        pytest.skip(f"no JPEG-LS encoder: {exc}")
    ds.save_as(series.files_by_k[0])

    def no_decoder(self: pydicom.Dataset) -> np.ndarray:
        raise NotImplementedError("no decoder plugin")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(no_decoder))
    image = load_scan(series.files_by_k[0])
    np.testing.assert_allclose(_array(image)[0], volume[:, :, 0])


# ---------------------------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------------------------
def test_discover_nested_folder(tmp_path: Path, volume: np.ndarray) -> None:
    root = tmp_path / "inbox"
    a = write_dicom_series(root / "patient" / "dicom", volume, OBLIQUE, seed=1, prefix="a")
    b = write_dicom_series(root / "patient" / "dicom", volume + 10, OBLIQUE, seed=2, prefix="b")
    (root / "other" / "deep").mkdir(parents=True)
    write_nifti(root / "other" / "deep" / "ct.nii.gz", volume, OBLIQUE.ras)
    (root / "notes.txt").write_text("reading list\n")
    broken = truncate(a.files_by_k[1], 0.95, destination=root / "patient" / "broken.dcm")

    found = discover_scans([root])
    assert isinstance(found, DiscoveryResult)
    assert len(found.scans) == 3, found.summary()
    assert len(found.problems) == 1, found.summary()
    assert found.problems[0].path == str(broken)
    assert "broken.dcm" in str(found.problems[0]) and "truncated" in str(found.problems[0])
    assert isinstance(found.problems[0], CorruptScanError)
    by_id = {s.scan_id: s for s in found.scans}
    assert set(by_id) == {a.series_uid, b.series_uid, "ct"}
    assert by_id[a.series_uid].kind == "dicom_series"
    assert by_id[a.series_uid].paths == tuple(a.files_by_k)  # sorted along the normal
    assert by_id["ct"].kind == "file" and by_id["ct"].source_format == "nifti"
    assert any(s.path.name == "notes.txt" for s in found.skipped)
    assert "Secret" not in found.summary()
    # every discovered scan loads, and to the right data
    np.testing.assert_allclose(_array(load_scan(by_id[b.series_uid]))[0], volume + 10)
    assert load_scan(by_id[a.series_uid]).meta["scan_id"] == a.series_uid


def test_discover_claims_mhd_raw_and_reads_preambleless_dicom(tmp_path: Path, volume: np.ndarray) -> None:
    write_itk(tmp_path / "vol.mhd", volume, OBLIQUE)
    assert (tmp_path / "vol.raw").exists()
    series = write_dicom_series(tmp_path / "s", volume, OBLIQUE)
    raw = pydicom.dcmread(series.files_by_k[0])
    raw.file_meta = pydicom.dataset.FileMetaDataset()
    raw.preamble = None
    raw.save_as(tmp_path / "nopreamble", implicit_vr=True, little_endian=True)  # no preamble, no file meta
    assert (tmp_path / "nopreamble").read_bytes()[128:132] != b"DICM"
    found = discover_scans(tmp_path, recursive=False)
    assert [s.kind for s in found.scans] == ["dicom_file", "file"], found.summary()
    assert found.scans[1].paths == (tmp_path / "vol.mhd", tmp_path / "vol.raw")
    assert not found.problems and not found.skipped
    np.testing.assert_allclose(_array(load_scan(found.scans[0]))[0], volume[:, :, 0])


def test_discover_drops_localizers_and_orientation_outliers(tmp_path: Path) -> None:
    volume = make_volume((6, 5, 6))
    sagittal = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    geometry = Geometry("axial", np.eye(3), SPACING, ORIGIN, (6, 5, 6))
    series = write_dicom_series(
        tmp_path / "s",
        volume,
        geometry,
        iop_override={5: sagittal},
        image_type={0: ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
    )
    found = discover_scans([tmp_path])
    assert len(found.scans) == 1 and not found.problems
    reasons = {s.path.name: s.reason for s in found.skipped}
    assert "LOCALIZER" in reasons[series.files_by_k[0].name]
    assert "differs" in reasons[series.files_by_k[5].name]
    image = load_scan(tmp_path / "s")
    assert image.shape[-1] == 4
    np.testing.assert_allclose(_array(image)[0], volume[:, :, 1:5])


def test_discover_never_raises(tmp_path: Path) -> None:
    (tmp_path / "garbage.dcm").write_bytes(b"\x00" * 10)
    found = discover_scans([tmp_path, tmp_path / "missing"])
    assert not found.scans
    assert {type(p) for p in found.problems} == {CorruptScanError, ScanNotFoundError}


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------
def test_truncated_nifti(tmp_path: Path, volume: np.ndarray) -> None:
    big = np.random.default_rng(0).normal(size=(40, 40, 20)).astype(np.float32)
    path = truncate(write_nifti(tmp_path / "cut.nii.gz", big, OBLIQUE.ras), 0.5)
    with gzip.open(path) as fh, pytest.raises(EOFError):
        fh.read()
    _raises(CorruptScanError, path, "NIfTI")


def test_corrupt_dicom(tmp_path: Path, volume: np.ndarray) -> None:
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(bytes(range(256)) * 3)
    _raises(CorruptScanError, garbage, "not DICOM")
    series = write_dicom_series(tmp_path / "s", volume, OBLIQUE)
    cut = truncate(series.files_by_k[0], 0.97, destination=tmp_path / "cut.dcm")
    _raises(CorruptScanError, cut, "pixel data")
    header = bytearray(series.files_by_k[1].read_bytes())
    header[140:200] = b"\xff" * 60  # smash the file meta group
    smashed = tmp_path / "smashed.dcm"
    smashed.write_bytes(bytes(header))
    _raises(CorruptScanError, smashed)


def test_empty_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _raises(EmptyInputError, empty, "no readable scan")
    (empty / "readme.txt").write_text("nothing here")
    _raises(EmptyInputError, empty, "no readable scan")


def test_folder_with_two_series(tmp_path: Path, volume: np.ndarray) -> None:
    a = write_dicom_series(tmp_path / "two", volume, OBLIQUE, prefix="a")
    b = write_dicom_series(tmp_path / "two", volume, OBLIQUE, prefix="b", seed=3)
    info = _raises(MixedSeriesError, tmp_path / "two", a.series_uid, b.series_uid)
    assert isinstance(info.value, MixedSeriesError)
    assert set(info.value.series_uids) == {a.series_uid, b.series_uid}


def test_missing_slice(tmp_path: Path, volume: np.ndarray) -> None:
    axial = Geometry("axial", np.eye(3), (0.7, 0.9, 2.5), (-120.5, 30.25, 10.0), SHAPE)
    write_dicom_series(tmp_path / "gap", volume, axial, skip_k=[2])
    _raises(
        SeriesGeometryError,
        tmp_path / "gap",
        "slice gap of 5.0 mm between z=12.5 and z=17.5",
        "expected 2.5 mm (1 missing slice?)",
    )


def test_duplicate_slice_positions(tmp_path: Path, volume: np.ndarray) -> None:
    series = write_dicom_series(tmp_path / "dup", volume, OBLIQUE)
    ds = pydicom.dcmread(series.files_by_k[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "dup" / "copy.dcm")
    _raises(SeriesGeometryError, tmp_path / "dup", "duplicated slice position")


def test_mixed_orientations(tmp_path: Path) -> None:
    volume = make_volume((6, 5, 6))
    geometry = Geometry("axial", np.eye(3), SPACING, ORIGIN, (6, 5, 6))
    tilted = list(DIRECTIONS["oblique"][:, 0]) + list(DIRECTIONS["oblique"][:, 1])
    write_dicom_series(tmp_path / "mixed", volume, geometry, iop_override={k: tilted for k in (0, 2, 4)})
    _raises(SeriesGeometryError, tmp_path / "mixed", "mixed slice orientations", "3 with")


def test_nan_volume(tmp_path: Path, volume: np.ndarray) -> None:
    bad = volume.copy()
    bad[1, 2, 3] = np.nan
    _raises(InvalidImageError, write_nifti(tmp_path / "nan.nii.gz", bad, OBLIQUE.ras), "1 NaN")


def test_constant_volume(tmp_path: Path) -> None:
    flat = np.full(SHAPE, -1000.0, dtype=np.float32)
    _raises(InvalidImageError, write_nifti(tmp_path / "flat.nii.gz", flat, OBLIQUE.ras), "constant", "-1000")
    _raises(InvalidImageError, write_itk(tmp_path / "flat.mhd", flat, OBLIQUE), "constant")
    # an all-background label mask is legitimate when validation is off
    mask = load_scan(write_nifti(tmp_path / "mask.nii.gz", np.zeros(SHAPE, np.uint8), OBLIQUE.ras), validate=False)
    assert tuple(mask.shape) == (1, *SHAPE) and float(mask.max()) == 0.0
    np.testing.assert_allclose(_affine(mask), OBLIQUE.ras, atol=ATOL)


def test_zero_size_image(tmp_path: Path) -> None:
    _raises(
        InvalidImageError, write_nifti(tmp_path / "empty.nii.gz", np.zeros((0, 4, 3), np.float32), np.eye(4)), "zero"
    )


def test_unsupported_suffix(tmp_path: Path) -> None:
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    _raises(UnsupportedFormatError, png, "unsupported")


def test_missing_path_and_multichannel(tmp_path: Path) -> None:
    _raises(ScanNotFoundError, tmp_path / "nowhere.nii.gz", "does not exist")
    stack = np.stack([make_volume(), make_volume() + 1], axis=-1)
    _raises(UnsupportedFormatError, write_nifti(tmp_path / "4d.nii.gz", stack, OBLIQUE.ras), "2 channels")


def test_bad_file_in_single_series_folder_is_not_ignored(tmp_path: Path, volume: np.ndarray) -> None:
    series = write_dicom_series(tmp_path / "s", volume, OBLIQUE)
    truncate(series.files_by_k[0], 0.97)
    _raises(CorruptScanError, series.files_by_k[0], "truncated")
    with pytest.raises(CorruptScanError, match=re.escape(series.files_by_k[0].name)):
        load_scan(tmp_path / "s")


def test_errors_pickle_and_format() -> None:
    error = MixedSeriesError("/data/x", ["1.2.3", "1.2.4"])
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == str(error) and clone.series_uids == ("1.2.3", "1.2.4")
    gap = SeriesGeometryError(Path("/data/y"), "slice gap")
    assert str(pickle.loads(pickle.dumps(gap))) == "/data/y: slice gap"
    assert gap.path == "/data/y" and gap.reason == "slice gap"
    assert issubclass(InvalidImageError, ScanError)


def test_scan_source_roundtrip(tmp_path: Path, volume: np.ndarray) -> None:
    path = write_itk(tmp_path / "x.nrrd", volume, OBLIQUE)
    source = ScanSource(kind="file", scan_id="custom", paths=(path,), source_format="nrrd")
    image = load_scan(source)
    assert image.meta["scan_id"] == "custom"
    assert image.meta["source_files"] == [str(path)]
    with pytest.raises(ScanNotFoundError, match=r"gone\.nii"):
        load_scan(ScanSource(kind="file", scan_id="gone", paths=(tmp_path / "gone.nii",)))


def test_mhd_with_missing_raw(tmp_path: Path, volume: np.ndarray) -> None:
    header = write_itk(tmp_path / "lost.mhd", volume, OBLIQUE)
    (tmp_path / "lost.raw").unlink()
    found = discover_scans([tmp_path])
    assert not found.scans
    assert len(found.problems) == 1 and "lost.raw" in str(found.problems[0])
    _raises(CorruptScanError, header, "MetaImage")


def test_batches_collate_once_per_slice_keys_are_dropped(tmp_path: Path) -> None:
    a = load_scan(write_dicom_series(tmp_path / "a", make_volume((6, 5, 4)), OBLIQUE).folder)
    b = load_scan(write_nifti(tmp_path / "b.nii.gz", make_volume((6, 5, 4)) + 1, OBLIQUE.ras))
    for image in (a, b):
        for key in PER_SLICE_META_KEYS:
            image.meta.pop(key)
    batch = list_data_collate([{"image": a}, {"image": b}])
    assert tuple(batch["image"].shape) == (2, 1, *SHAPE)
    assert batch["image"].meta["source_format"] == ["dicom", "nifti"]
