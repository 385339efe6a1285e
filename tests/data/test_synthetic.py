"""Tests of :mod:`medrpn.data.synthetic`, the built-in synthetic chest-CT lesion dataset.

Most tests share one small 10-case dataset (72 x 72 x 36 voxels per case, NIfTI + DICOM) generated once per module;
the geometry of the default (full-size) cases is checked on a single in-memory case.
"""

from __future__ import annotations

import csv
import filecmp
import json
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813
from scipy import ndimage

from medrpn.data.synthetic import (
    CLASS_NAMES,
    SHAPE_KINDS,
    case_is_descending,
    case_is_empty,
    generate_case,
    generate_dataset,
    main,
    synthetic_uid,
)
from medrpn.evaluation.luna16 import read_scan_list

SMALL = (72, 72, 36)
SEED = 3
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def ds10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth10")
    summary = generate_dataset(out, cases=10, seed=SEED, shape=SMALL)
    assert summary.num_cases == 10
    return out


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _cases(out: Path) -> list[dict[str, Any]]:
    return list(_load_json(out / "lesions.json")["cases"])


def _datalist_items(out: Path) -> dict[str, dict[str, Any]]:
    dl = _load_json(out / "datalist.json")
    return {item["seriesuid"]: item for item in dl["training"] + dl["validation"]}


def _csv_rows(out: Path) -> list[dict[str, str]]:
    with (out / "annotations.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _world_box(idx: tuple[np.ndarray, ...], spacing: list[float], origin: list[float]) -> np.ndarray:
    lo = [origin[a] + int(idx[a].min()) * spacing[a] - spacing[a] / 2 for a in range(3)]
    hi = [origin[a] + int(idx[a].max()) * spacing[a] + spacing[a] / 2 for a in range(3)]
    return np.array(lo + hi)


def _read_dicom_sitk(series_dir: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    return reader.Execute()


# ----------------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------------
def test_layout_and_datalist_keys(ds10: Path) -> None:
    dl = _load_json(ds10 / "datalist.json")
    assert dl["box_mode"] == "cccwhd"
    assert dl["coordinates"] == "world LPS mm"
    assert len(dl["training"]) == 8 and len(dl["validation"]) == 2
    for item in dl["training"] + dl["validation"]:
        assert set(item) == {"image", "dicom", "label_mask", "seriesuid", "box", "label"}
        assert (ds10 / item["image"]).is_file() and (ds10 / item["label_mask"]).is_file()
        assert (ds10 / item["dicom"]).is_dir()
        assert len(item["box"]) == len(item["label"]) <= 4
        assert all(len(b) == 6 for b in item["box"])
        assert set(item["label"]) <= {0, 1, 2}
    cases = _cases(ds10)
    assert [c["case_id"] for c in cases] == [f"case_{i:03d}" for i in range(10)]
    for c in cases:
        assert c["image"] == f"nifti/{c['case_id']}.nii.gz"
        assert c["label_mask"] == f"labels/{c['case_id']}_label.nii.gz"
        assert len(list((ds10 / c["dicom"]).glob("IM_*.dcm"))) == SMALL[2]


def test_nifti_headers(ds10: Path) -> None:
    for c in _cases(ds10):
        img = nib.load(ds10 / c["image"])
        lab = nib.load(ds10 / c["label_mask"])
        assert img.shape == lab.shape == tuple(c["shape"]) == SMALL
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        for im in (img, lab):
            qform, qcode = im.header.get_qform(coded=True)
            sform, scode = im.header.get_sform(coded=True)
            assert int(qcode) == 1 and int(scode) == 1
            expected_lps = np.diag([*c["spacing"], 1.0])
            expected_lps[:3, 3] = c["origin"]
            np.testing.assert_allclose(LPS_FROM_RAS @ sform, expected_lps, atol=1e-4)
            np.testing.assert_allclose(LPS_FROM_RAS @ qform, expected_lps, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------------------
def _tree_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_same_seed_is_identical_and_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 11), (b, 11), (c, 12)):
        generate_dataset(out, cases=3, seed=seed, shape=(48, 48, 20))
    files = _tree_files(a)
    assert files == _tree_files(b)
    # Byte-identical everything: NIfTI (gzip mtime 0), DICOM (deterministic UIDs, no clock), annotation files.
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []
    for name in ("nifti/case_000.nii.gz", "labels/case_002_label.nii.gz"):
        np.testing.assert_array_equal(np.asarray(nib.load(a / name).dataobj), np.asarray(nib.load(b / name).dataobj))
    img_a = np.asarray(nib.load(a / "nifti/case_001.nii.gz").dataobj)
    img_c = np.asarray(nib.load(c / "nifti/case_001.nii.gz").dataobj)
    assert img_a.shape != img_c.shape or not np.array_equal(img_a, img_c)
    assert (a / "datalist.json").read_bytes() != (c / "datalist.json").read_bytes()
    assert _datalist_items(a).keys().isdisjoint(_datalist_items(c).keys())


def test_case_depends_only_on_seed_and_index(ds10: Path) -> None:
    case = generate_case(4, seed=SEED, shape=SMALL)
    np.testing.assert_array_equal(case.image, np.asarray(nib.load(ds10 / "nifti/case_004.nii.gz").dataobj))
    np.testing.assert_array_equal(case.label, np.asarray(nib.load(ds10 / "labels/case_004_label.nii.gz").dataobj))
    assert case.series_uid == _cases(ds10)[4]["seriesuid"]


def test_uids_are_deterministic_and_valid() -> None:
    uid = synthetic_uid(0, 1, "series")
    assert uid == synthetic_uid(0, 1, "series") != synthetic_uid(0, 2, "series") != synthetic_uid(1, 1, "series")
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid) and len(uid) <= 64


def test_empty_and_descending_patterns() -> None:
    for seed in range(5):
        for start in range(20):
            assert sum(case_is_empty(seed, i) for i in range(start, start + 7)) == 1
            assert sum(case_is_descending(seed, i) for i in range(start, start + 3)) == 1


# ----------------------------------------------------------------------------------------------------------------
# NIfTI vs DICOM
# ----------------------------------------------------------------------------------------------------------------
def test_nifti_and_dicom_agree(ds10: Path) -> None:
    for c in _cases(ds10):
        img = nib.load(ds10 / c["image"])
        hu_nifti = np.asarray(img.dataobj).astype(np.int32)
        itk = _read_dicom_sitk(ds10 / c["dicom"])
        hu_dicom = sitk.GetArrayFromImage(itk).transpose(2, 1, 0).astype(np.int32)  # (z, y, x) -> (x, y, z)
        np.testing.assert_array_equal(hu_dicom, hu_nifti)
        np.testing.assert_allclose(np.array(itk.GetDirection()), np.eye(3).ravel(), atol=1e-6)
        lps = LPS_FROM_RAS @ img.affine
        far = np.array(hu_nifti.shape) - 1
        for voxel in (np.zeros(3, dtype=int), far):
            from_nifti = (lps @ np.append(voxel, 1.0))[:3]
            from_dicom = np.array(itk.TransformIndexToPhysicalPoint([int(v) for v in voxel]))
            np.testing.assert_allclose(from_dicom, from_nifti, atol=1e-3)
        np.testing.assert_allclose(np.array(itk.GetOrigin()), c["origin"], atol=1e-3)


def test_dicom_headers_and_slice_order(ds10: Path) -> None:
    cases = _cases(ds10)
    assert any(c["dicom_descending_z"] for c in cases) and not all(c["dicom_descending_z"] for c in cases)
    for c in cases:
        files = sorted((ds10 / c["dicom"]).glob("IM_*.dcm"))
        first, second = (pydicom.dcmread(f) for f in files[:2])
        assert [int(first.InstanceNumber), int(second.InstanceNumber)] == [1, 2]
        dz = float(second.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
        assert (dz < 0) == c["dicom_descending_z"]
        assert dz == pytest.approx(-c["spacing"][2] if c["dicom_descending_z"] else c["spacing"][2], abs=1e-4)
    ds = pydicom.dcmread(sorted((ds10 / cases[0]["dicom"]).glob("IM_*.dcm"))[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "CT" and ds.PatientID == "SYNTH-000" and "SYNTHETIC" in str(ds.PatientName)
    assert ds.SeriesInstanceUID == cases[0]["seriesuid"]
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([cases[0]["spacing"][1], cases[0]["spacing"][0]])
    assert (int(ds.Rows), int(ds.Columns)) == (SMALL[1], SMALL[0])
    assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    for keyword in (
        "StudyInstanceUID",
        "FrameOfReferenceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "PatientBirthDate",
        "PatientSex",
        "SeriesNumber",
        "PatientPosition",
        "PositionReferenceIndicator",
        "Manufacturer",
        "ImageOrientationPatient",
        "SliceThickness",
        "SpacingBetweenSlices",
        "KVP",
        "AcquisitionNumber",
        "ImageType",
        "WindowCenter",
        "WindowWidth",
    ):
        assert keyword in ds, keyword
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (ds10 / cases[0]["dicom"]).iterdir()}
    assert len(uids) == SMALL[2]


def test_highdicom_can_reference_the_series(ds10: Path) -> None:
    hd = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    case = next(c for c in _cases(ds10) if c["lesions"])
    sources = [pydicom.dcmread(f) for f in sorted((ds10 / case["dicom"]).glob("IM_*.dcm"))]
    label = np.asarray(nib.load(ds10 / case["label_mask"]).dataobj)
    ks = [round((float(s.ImagePositionPatient[2]) - case["origin"][2]) / case["spacing"][2]) for s in sources]
    mask = np.stack([label[:, :, k].T > 0 for k in ks])  # frames of (rows, columns) in source order
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medrpn",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == case["frame_of_reference_uid"]


# ----------------------------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------------------------
def test_boxes_agree_across_files(ds10: Path) -> None:
    items = _datalist_items(ds10)
    rows = _csv_rows(ds10)
    header = (ds10 / "annotations.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "seriesuid,coordX,coordY,coordZ,diameter_mm"
    n_lesions = 0
    for c in _cases(ds10):
        item = items[c["seriesuid"]]
        case_rows = [r for r in rows if r["seriesuid"] == c["seriesuid"]]
        assert len(item["box"]) == len(case_rows) == len(c["lesions"])
        assert item["label"] == [les["class_id"] for les in c["lesions"]]
        for box_cccwhd, row, les in zip(item["box"], case_rows, c["lesions"]):
            xyzxyz = np.array(les["box"])
            centre, size = (xyzxyz[:3] + xyzxyz[3:]) / 2, xyzxyz[3:] - xyzxyz[:3]
            np.testing.assert_allclose(box_cccwhd, np.concatenate([centre, size]), atol=1e-4)
            np.testing.assert_allclose(les["box_cccwhd"], box_cccwhd, atol=1e-6)
            np.testing.assert_allclose(les["center"], centre, atol=1e-4)
            coords = [float(row[k]) for k in ("coordX", "coordY", "coordZ")]
            np.testing.assert_allclose(coords, centre, atol=1e-4)
            assert float(row["diameter_mm"]) == pytest.approx(max(size[0], size[1]), abs=1e-4)
            assert les["diameter_mm"] == pytest.approx(max(size[0], size[1]), abs=1e-4)
            assert les["class_name"] == CLASS_NAMES[les["class_id"]]
            n_lesions += 1
    assert n_lesions == len(rows) > 0
    # LUNA16's scan list: every case, those without lesions included, read back by medrpn froc
    assert read_scan_list(ds10 / "seriesuids.csv") == [c["seriesuid"] for c in _cases(ds10)]


def test_label_components_are_the_boxes(ds10: Path) -> None:
    for c in _cases(ds10):
        label = np.asarray(nib.load(ds10 / c["label_mask"]).dataobj)
        components, n = ndimage.label(label > 0)
        assert n == len(c["lesions"])
        matched = set()
        for comp in range(1, n + 1):
            idx = np.nonzero(components == comp)
            box = _world_box(idx, c["spacing"], c["origin"])
            same = [les for les in c["lesions"] if np.abs(np.array(les["box"]) - box).max() < 1e-3]
            assert len(same) == 1, (c["case_id"], box)  # exactly one lesion has exactly this world box
            les = same[0]
            matched.add(les["id"])
            assert set(np.unique(label[idx]).tolist()) == {les["class_id"] + 1}
            assert idx[0].size == les["voxel_count"]
            assert [int(idx[a].min()) for a in range(3)] + [int(idx[a].max()) for a in range(3)] == les["voxel_box"]
        assert matched == {les["id"] for les in c["lesions"]}


def test_lesion_properties(ds10: Path) -> None:
    cases = _cases(ds10)
    lesions = [les for c in cases for les in c["lesions"]]
    assert any(not c["lesions"] for c in cases)
    assert all(len(c["lesions"]) <= 4 for c in cases)
    for les in lesions:
        assert 3.0 <= les["diameter_mm"] <= 30.0
        w, h, d = np.array(les["box"][3:]) - np.array(les["box"][:3])
        assert d <= 30.0 + 1e-6 and max(w, h) == pytest.approx(les["diameter_mm"], abs=1e-4)
        assert les["shape"] in SHAPE_KINDS
        assert les["touches"] in (None, "pleura", "vessel")
    # Lesion boxes in a case never overlap.
    for c in cases:
        boxes = [np.array(les["box"]) for les in c["lesions"]]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert np.any(a[3:] <= b[:3]) or np.any(b[3:] <= a[:3])


def test_solid_lesions_are_brighter_than_lung(ds10: Path) -> None:
    checked = 0
    for c in _cases(ds10):
        image = np.asarray(nib.load(ds10 / c["image"]).dataobj).astype(np.float64)
        label = np.asarray(nib.load(ds10 / c["label_mask"]).dataobj)
        components, _ = ndimage.label(label > 0)
        for les in c["lesions"]:
            i, j, k = les["voxel_box"][:3]
            sub = (
                slice(i, les["voxel_box"][3] + 1),
                slice(j, les["voxel_box"][4] + 1),
                slice(k, les["voxel_box"][5] + 1),
            )
            comp = int(np.max(components[sub]))
            mask = components == comp
            shell = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask, iterations=1)
            shell &= label == 0
            inside, around = image[mask].mean(), np.percentile(image[shell], 25)
            if les["class_id"] == 0:
                assert inside > -400.0, (c["case_id"], les)
                if les["touches"] is None:  # surrounded by lung only
                    assert inside - around > 300.0, (c["case_id"], les)
                    checked += 1
            elif les["class_id"] == 1:
                assert -800.0 < inside < -250.0, (c["case_id"], les)
    assert checked > 0


def test_default_geometry_is_a_plausible_chest() -> None:
    case = generate_case(0, seed=0)
    nx, ny, nz = case.shape
    sx, sy, sz = case.spacing
    assert 144 <= nx == ny <= 192 and 64 <= nz <= 128
    assert 1.4 <= sx == sy <= 2.2 and 1.5 <= sz <= 3.5
    assert 275.0 <= nx * sx <= 360.0
    assert all(o != 0 for o in case.origin)
    img = case.image
    assert img.dtype == np.int16 and case.label.dtype == np.uint8
    assert img[0, 0, :].mean() < -900  # air in the corner
    assert (img < -700).mean() > 0.05  # lungs (and air)
    assert (img > 400).sum() > 1000  # ribs and spine
    assert np.median(img[nx // 2, ny // 2 - 10 : ny // 2 + 10, nz // 2]) > -200  # mediastinum


def test_lesion_size_range_changes_only_the_lesions() -> None:
    """``lesion_mm`` draws other lesion sizes in the same anatomy; the default range is the built-in dataset."""
    default = generate_case(1, seed=0)
    large = generate_case(1, seed=0, lesion_mm=(15.0, 30.0))
    assert default.shape == large.shape and default.spacing == large.spacing and default.origin == large.origin
    assert large.lesions and default.lesions
    assert min(les.diameter_mm for les in large.lesions) >= 10.0  # shapes vary around the drawn diameter
    assert max(les.diameter_mm for les in large.lesions) > max(les.diameter_mm for les in default.lesions)
    assert (default.image != large.image).mean() < 0.02  # the anatomy and noise are the same: only around lesions


# ----------------------------------------------------------------------------------------------------------------
# Speed and CLI
# ----------------------------------------------------------------------------------------------------------------
def test_three_small_cases(tmp_path: Path) -> None:
    summary = generate_dataset(tmp_path, cases=3, seed=0, shape=(64, 64, 32))
    assert summary.case_ids == ("case_000", "case_001", "case_002")
    assert len(summary.training_ids) + len(summary.validation_ids) == 3 and len(summary.validation_ids) == 1


def test_cli_without_dicom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main([str(out), "--cases", "2", "--seed", "5", "--shape", "48", "48", "24", "--no-dicom"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "2 cases" in lines[0]
    assert not (out / "dicom").exists()
    dl = _load_json(out / "datalist.json")
    assert all("dicom" not in item for item in dl["training"] + dl["validation"])
    assert nib.load(out / "nifti/case_001.nii.gz").shape == (48, 48, 24)


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path), "--cases", "0"])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path), "--lesion-mm", "20", "10"])
    assert err.value.code == 2
