"""DICOM SEG / SR / GSPS overlays on a small synthetic CT series (slices stored in descending z)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medrpn.geometry import image_to_world_boxes
from medrpn.inference.results import Finding, ScanResult
from medrpn.overlays.dicom import DicomOutputs, write_dicom_objects

N_COLS, N_ROWS, N_SLICES = 48, 40, 12
COL_SPACING, ROW_SPACING, SLICE_SPACING = 0.8, 0.7, 2.5  # x (along columns), y (along rows), z
ORIGIN = np.array([-101.3, 57.25, -312.5])  # LPS position of voxel (0, 0, 0)

# known voxel ranges (column i, row j, slice k), end exclusive
BOXES_VOX = {
    1: ((5, 17), (7, 15), (2, 6)),
    2: ((30, 46), (20, 40), (7, 12)),  # touches the last row and slice
}


@dataclass
class Series:
    """A synthetic CT series and the ScanResult of its findings."""

    files_k: list[Path]  # in slice order k (ascending z)
    sop_uids: list[str]
    z: list[float]  # z of slice k
    series_uid: str
    affine_ras: np.ndarray
    result: ScanResult


def _lps_affine() -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.diag([COL_SPACING, ROW_SPACING, SLICE_SPACING])
    a[:3, 3] = ORIGIN
    return a


def _write_ct_series(folder: Path, body_part: str | None = None) -> tuple[list[Path], list[str], list[float], str]:
    """Write the slices in descending-z file order; return files, UIDs and z in ascending-z (k) order."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    files: dict[int, Path] = {}
    uids: dict[int, str] = {}
    zs: dict[int, float] = {}
    for n, k in enumerate(range(N_SLICES - 1, -1, -1)):  # file 0 = highest z
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.PatientName = "Synthetic^Phantom"
        ds.PatientID = "SYN0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC1"
        ds.ReferringPhysicianName = ""
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 3
        ds.SeriesDescription = "synthetic chest"
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "synthetic"
        if body_part:
            ds.BodyPartExamined = body_part
        ds.InstanceNumber = n + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.KVP = "120"
        ds.SliceThickness = str(SLICE_SPACING)
        ds.PixelSpacing = [str(ROW_SPACING), str(COL_SPACING)]  # (between rows, between columns)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = float(ORIGIN[2] + SLICE_SPACING * k)
        ds.ImagePositionPatient = [float(ORIGIN[0]), float(ORIGIN[1]), z]
        ds.SliceLocation = z
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = N_ROWS, N_COLS
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = rng.integers(-1000, 400, size=(N_ROWS, N_COLS), dtype=np.int16).tobytes()
        path = folder / f"IM{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[k], uids[k], zs[k] = path, sop, z
    order = range(N_SLICES)
    return [files[k] for k in order], [uids[k] for k in order], [zs[k] for k in order], series


def _finding(rank: int, box: np.ndarray, score: float, label: int, class_name: str) -> Finding:
    return Finding(
        rank=rank,
        box=tuple(float(v) for v in box),
        score=score,
        label=label,
        class_name=class_name,
        class_probs=(score, 1 - score, 0.0),
        objectness=0.9,
    )


def _make_series(tmp_path: Path, body_part: str | None = None) -> Series:
    files, uids, zs, series_uid = _write_ct_series(tmp_path / "ct", body_part)
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _lps_affine()
    findings = []
    for rank, score, label, name in ((1, 0.93, 0, "solid"), (2, 0.61, 1, "ground-glass")):
        (i0, i1), (j0, j1), (k0, k1) = BOXES_VOX[rank]
        box = image_to_world_boxes(np.array([[i0, j0, k0, i1, j1, k1]], dtype=float), affine_ras)[0].numpy()
        findings.append(_finding(rank, box, score, label, name))
    result = ScanResult(
        scan_id=series_uid,
        source=str(tmp_path / "ct"),
        source_format="dicom",
        affine_ras=affine_ras,
        spatial_shape=(N_COLS, N_ROWS, N_SLICES),
        findings=findings,
        dicom_files=tuple(str(p) for p in files),
        sop_instance_uids=tuple(uids),
        series_uid=series_uid,
        model="test-model",
    )
    return Series(files, uids, zs, series_uid, affine_ras, result)


@pytest.fixture
def series(tmp_path: Path) -> Series:
    return _make_series(tmp_path)


@pytest.fixture
def outputs(series: Series, tmp_path: Path) -> DicomOutputs:
    return write_dicom_objects(series.result, tmp_path / "out")


def _walk(items: Iterable[Dataset]) -> Iterator[Dataset]:
    """Every SR content item below ``items``, depth first."""
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def _code(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue) if "ConceptNameCodeSequence" in item else ""


def _dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    text = proc.stdout + proc.stderr
    return [line for line in text.splitlines() if line.startswith("Error")], text


# --------------------------------------------------------------------------------------------- files


def test_files_exist_and_read_back(outputs: DicomOutputs, series: Series, tmp_path: Path) -> None:
    assert outputs.seg == tmp_path / "out" / "seg.dcm"
    assert outputs.sr == tmp_path / "out" / "sr.dcm"
    assert outputs.gsps == tmp_path / "out" / "gsps.dcm"
    src = pydicom.dcmread(series.files_k[0], stop_before_pixels=True)
    numbers, series_uids = [], set()
    for path, kind in ((outputs.seg, "SEG"), (outputs.sr, "SR"), (outputs.gsps, "GSPS")):
        assert path is not None and path.is_file()
        ds = pydicom.dcmread(path)
        assert ds.SeriesDescription == f"medrpn findings ({kind})"
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.PatientID == src.PatientID
        assert ds.SeriesInstanceUID != series.series_uid
        numbers.append(int(ds.SeriesNumber))
        series_uids.add(ds.SeriesInstanceUID)
    assert numbers == [900, 901, 902]
    assert len(series_uids) == 3
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gsps.dcm", "seg.dcm", "sr.dcm"]


# ---------------------------------------------------------------------------------------------- SEG


def test_seg_frames_land_on_the_right_slices(outputs: DicomOutputs, series: Series) -> None:
    assert outputs.seg is not None
    seg = pydicom.dcmread(outputs.seg)
    assert seg.SegmentationType == "BINARY"
    assert len(seg.SegmentSequence) == 2
    for n, item in enumerate(seg.SegmentSequence, start=1):
        assert item.SegmentNumber == n
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "medrpn"
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SCT Lesion
        assert item.SegmentLabel.startswith(f"Finding {n} (")
    assert seg.SegmentSequence[0].SegmentLabel == "Finding 1 (solid, p=0.93)"

    uid_to_k = {uid: k for k, uid in enumerate(series.sop_uids)}
    pixels = seg.pixel_array.reshape(-1, N_ROWS, N_COLS)
    frames_per_segment: dict[int, list[int]] = {1: [], 2: []}
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ref_uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = uid_to_k[ref_uid]
        z = float(item.PlanePositionSequence[0].ImagePositionPatient[2])
        assert z == pytest.approx(series.z[k], abs=1e-4)  # position and referenced slice agree
        box = series.result.findings[segment - 1].box
        assert box[2] <= z < box[5]  # the slice lies within the finding's world box
        frames_per_segment[segment].append(k)
        (i0, i1), (j0, j1), _ = BOXES_VOX[segment]
        expected = np.zeros((N_ROWS, N_COLS), dtype=np.uint8)
        expected[j0:j1, i0:i1] = 1
        np.testing.assert_array_equal(pixels[f], expected)
    for segment, ks in frames_per_segment.items():
        k0, k1 = BOXES_VOX[segment][2]
        assert sorted(ks) == list(range(k0, k1))  # every spanned slice has exactly one frame
        spanned = [k for k, z in enumerate(series.z) if series.result.findings[segment - 1].box[2] <= z]
        spanned = [k for k in spanned if series.z[k] < series.result.findings[segment - 1].box[5]]
        assert sorted(ks) == spanned


def test_seg_via_highdicom_volume_matches_world_boxes(outputs: DicomOutputs, series: Series) -> None:
    import highdicom as hd

    assert outputs.seg is not None
    seg = hd.seg.segread(outputs.seg)
    for segment in (1, 2):
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=series.sop_uids,
            segment_numbers=[segment],
            ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True,
        )[..., 0]  # (k, rows, cols)
        (i0, i1), (j0, j1), (k0, k1) = BOXES_VOX[segment]
        expected = np.zeros((N_SLICES, N_ROWS, N_COLS), dtype=mask.dtype)
        expected[k0:k1, j0:j1, i0:i1] = 1
        np.testing.assert_array_equal(mask, expected)


# ----------------------------------------------------------------------------------------------- SR


def test_sr_groups(outputs: DicomOutputs, series: Series) -> None:
    assert outputs.seg is not None
    sr = pydicom.dcmread(outputs.sr)
    seg = pydicom.dcmread(outputs.seg, stop_before_pixels=True)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = [it for it in _walk(sr.ContentSequence) if it.ValueType == "CONTAINER" and _code(it) == "125007"]
    planar = [g for g in groups if g.ContentTemplateSequence[0].TemplateIdentifier == "1410"]
    volumetric = [g for g in groups if g.ContentTemplateSequence[0].TemplateIdentifier == "1411"]
    assert len(planar) == 2 and len(volumetric) == 2 and len(groups) == 4
    tracking: dict[str, set[str]] = {}
    for group in planar + volumetric:
        items = list(group.ContentSequence)
        ident = next(it.TextValue for it in items if _code(it) == "112039")
        uid = next(it.UID for it in items if _code(it) == "112040")
        tracking.setdefault(ident, set()).add(uid)
        rank = int(ident.split()[-1])
        f = series.result.findings[rank - 1]
        prob = next(it for it in items if _code(it) == "122157")
        assert prob.ValueType == "NUM"
        assert float(prob.MeasuredValueSequence[0].NumericValue) == pytest.approx(f.score, abs=1e-6)
        unit = prob.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
        cls = next(it for it in items if _code(it) == "LESIONCLASS")
        assert cls.ConceptCodeSequence[0].CodeMeaning == f.class_name
        if group in planar:
            region = next(it for it in items if it.ValueType == "SCOORD3D")
            assert region.GraphicType == "POLYGON"
            assert region.ReferencedFrameOfReferenceUID == seg.FrameOfReferenceUID
            pts = np.asarray(region.GraphicData, dtype=float).reshape(-1, 3)
            x0, y0, z0, x1, y1, z1 = f.box
            zc = (z0 + z1) / 2
            expected = [[x0, y0, zc], [x1, y0, zc], [x1, y1, zc], [x0, y1, zc], [x0, y0, zc]]
            np.testing.assert_allclose(pts, expected, atol=1e-3)
        else:
            ref = next(it for it in items if _code(it) == "121191")
            sop = ref.ReferencedSOPSequence[0]
            assert sop.ReferencedSOPInstanceUID == seg.SOPInstanceUID
            assert int(sop.ReferencedSegmentNumber) == rank
            assert seg.SegmentSequence[rank - 1].TrackingUID in tracking[ident]
    assert sorted(tracking) == ["Finding 1", "Finding 2"]
    assert all(len(uids) == 1 for uids in tracking.values())  # the two groups of a finding share it
    # evidence: every CT instance and the SEG
    evidence = {
        inst.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for ser in study.ReferencedSeriesSequence
        for inst in ser.ReferencedSOPSequence
    }
    assert evidence == {*series.sop_uids, seg.SOPInstanceUID}


# --------------------------------------------------------------------------------------------- GSPS


def test_gsps_annotations(outputs: DicomOutputs, series: Series) -> None:
    pr = pydicom.dcmread(outputs.gsps)
    assert pr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"
    ref_series = pr.ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in ref_series] == [series.series_uid]
    assert {i.ReferencedSOPInstanceUID for i in ref_series[0].ReferencedImageSequence} == set(series.sop_uids)
    voi = pr.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (-600.0, 1500.0)
    uid_to_k = {uid: k for k, uid in enumerate(series.sop_uids)}
    seen: dict[int, list[int]] = {1: [], 2: []}
    annotated = []
    for ann in pr.GraphicAnnotationSequence:
        assert len(ann.ReferencedImageSequence) == 1  # one annotation per referenced image
        k = uid_to_k[ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID]
        annotated.append(k)
        texts = {t.TrackingID: t for t in ann.TextObjectSequence}
        for obj in ann.GraphicObjectSequence:
            assert obj.GraphicType == "POLYLINE" and obj.GraphicAnnotationUnits == "PIXEL"
            assert int(obj.NumberOfGraphicPoints) == 5
            rank = int(obj.TrackingID.split()[-1])
            seen[rank].append(k)
            (i0, i1), (j0, j1), _ = BOXES_VOX[rank]
            expected = [[i0, j0], [i1, j0], [i1, j1], [i0, j1], [i0, j0]]  # (column, row)
            np.testing.assert_allclose(np.asarray(obj.GraphicData, dtype=float).reshape(-1, 2), expected, atol=1e-3)
            text = texts[obj.TrackingID]
            f = series.result.findings[rank - 1]
            assert text.UnformattedTextValue == f"#{rank} p={f.score:.2f} {f.class_name}"
            left, top = text.BoundingBoxTopLeftHandCorner
            right, bottom = text.BoundingBoxBottomRightHandCorner
            assert 0 <= left < right <= N_COLS and 0 <= top < bottom <= N_ROWS
    assert sorted(annotated) == sorted(set(annotated))
    for rank, ks in seen.items():
        assert sorted(ks) == list(range(*BOXES_VOX[rank][2]))


# ----------------------------------------------------------------------------------------- dciodvfy


def test_dciodvfy_reports_no_errors(outputs: DicomOutputs) -> None:
    assert outputs.seg is not None
    for path in (outputs.seg, outputs.sr, outputs.gsps):
        errors, text = _dciodvfy_errors(path)
        assert not errors, f"{path.name}:\n{text}"


# ------------------------------------------------------------------------------------- edge cases


def test_no_findings(series: Series, tmp_path: Path) -> None:
    result = replace(series.result, findings=[])
    write_dicom_objects(series.result, tmp_path / "empty")  # an earlier run with findings
    out = write_dicom_objects(result, tmp_path / "empty", series_number_base=700)
    assert out.seg is None
    assert not (tmp_path / "empty" / "seg.dcm").exists()
    sr = pydicom.dcmread(out.sr)
    summary = [it for it in _walk(sr.ContentSequence) if _code(it) == "111017"]
    assert summary and summary[0].ConceptCodeSequence[0].CodeValue == "111241"
    pr = pydicom.dcmread(out.gsps)
    assert len(pr.GraphicAnnotationSequence) == N_SLICES
    assert pr.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue == "medrpn: no findings"
    assert (int(sr.SeriesNumber), int(pr.SeriesNumber)) == (701, 702)
    for path in (out.sr, out.gsps):
        errors, text = _dciodvfy_errors(path)
        assert not errors, f"{path.name}:\n{text}"


def test_requires_dicom_files(series: Series, tmp_path: Path) -> None:
    result = replace(series.result, dicom_files=(), sop_instance_uids=(), source_format="nifti", scan_id="case042")
    with pytest.raises(ValueError, match="case042"):
        write_dicom_objects(result, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_rejects_files_out_of_slice_order(series: Series, tmp_path: Path) -> None:
    result = replace(
        series.result,
        dicom_files=tuple(reversed(series.result.dicom_files)),
        sop_instance_uids=tuple(reversed(series.result.sop_instance_uids)),
    )
    with pytest.raises(ValueError, match="slice order"):
        write_dicom_objects(result, tmp_path / "x")


def test_rejects_transposed_affine(series: Series, tmp_path: Path) -> None:
    swap = np.eye(4)[[1, 0, 2, 3]]  # i <-> j
    result = replace(series.result, affine_ras=series.affine_ras @ swap)
    with pytest.raises(ValueError, match="affine_ras axis 0"):
        write_dicom_objects(result, tmp_path / "x")


def test_box_outside_grid_is_rejected(series: Series, tmp_path: Path) -> None:
    far = replace(series.result.findings[0], box=(500.0, 500.0, 500.0, 510.0, 510.0, 510.0))
    with pytest.raises(ValueError, match="finding 1"):
        write_dicom_objects(replace(series.result, findings=[far]), tmp_path / "x")


def test_box_clipped_and_subvoxel(series: Series, tmp_path: Path) -> None:
    """A box hanging over the grid edge is clipped; one thinner than a voxel still marks a voxel."""
    affine = series.affine_ras
    over = image_to_world_boxes(np.array([[-5.0, -3.0, -2.0, 4.0, 3.0, 2.0]]), affine)[0].numpy()
    thin = image_to_world_boxes(np.array([[20.2, 10.1, 5.1, 20.4, 10.3, 5.2]]), affine)[0].numpy()
    findings = [_finding(1, over, 0.8, 0, "solid"), _finding(2, thin, 0.5, 2, "part-solid")]
    out = write_dicom_objects(replace(series.result, findings=findings), tmp_path / "clip")
    assert out.seg is not None
    seg = pydicom.dcmread(out.seg)
    uid_to_k = {uid: k for k, uid in enumerate(series.sop_uids)}
    pixels = seg.pixel_array.reshape(-1, N_ROWS, N_COLS)
    by_segment: dict[int, list[int]] = {1: [], 2: []}
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        by_segment[segment].append(
            uid_to_k[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        )
        rows, cols = np.nonzero(pixels[f])
        if segment == 1:
            assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, 2, 0, 3)
        else:
            assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 10, 20, 20)
    assert sorted(by_segment[1]) == [0, 1]
    assert by_segment[2] == [5]
    pr = pydicom.dcmread(out.gsps)
    for ann in pr.GraphicAnnotationSequence:
        for obj in ann.GraphicObjectSequence:
            pts = np.asarray(obj.GraphicData, dtype=float).reshape(-1, 2)
            assert pts.min() >= 0 and pts[:, 0].max() <= N_COLS and pts[:, 1].max() <= N_ROWS
    errors, text = _dciodvfy_errors(out.gsps)
    assert not errors, text


def test_body_part_copied(tmp_path: Path) -> None:
    """With a BodyPartExamined (unpaired) the new series copy it and send no Laterality."""
    chest = _make_series(tmp_path, body_part="CHEST")
    out = write_dicom_objects(chest.result, tmp_path / "chest")
    assert out.seg is not None
    for path in (out.seg, out.gsps):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.BodyPartExamined == "CHEST"
        assert "Laterality" not in ds
        errors, text = _dciodvfy_errors(path)
        assert not errors and "Warning" not in text, text


def test_slice_axis_pointing_down(series: Series, tmp_path: Path) -> None:
    """A grid whose k runs towards the feet (files in descending z) puts frames on the same slices."""
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, N_SLICES - 1.0  # k' = Z - 1 - k
    result = replace(
        series.result,
        affine_ras=series.affine_ras @ flip,
        dicom_files=tuple(reversed(series.result.dicom_files)),
        sop_instance_uids=tuple(reversed(series.result.sop_instance_uids)),
    )
    out = write_dicom_objects(result, tmp_path / "down")
    assert out.seg is not None
    seg = pydicom.dcmread(out.seg, stop_before_pixels=True)
    uid_to_k = {uid: k for k, uid in enumerate(series.sop_uids)}  # ascending-z index
    by_segment: dict[int, list[int]] = {1: [], 2: []}
    for item in seg.PerFrameFunctionalGroupsSequence:
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = uid_to_k[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert float(item.PlanePositionSequence[0].ImagePositionPatient[2]) == pytest.approx(series.z[k], abs=1e-4)
        by_segment[segment].append(k)
    for segment, ks in by_segment.items():
        assert sorted(ks) == list(range(*BOXES_VOX[segment][2]))
    pr = pydicom.dcmread(out.gsps)
    ks = sorted(uid_to_k[a.ReferencedImageSequence[0].ReferencedSOPInstanceUID] for a in pr.GraphicAnnotationSequence)
    assert ks == sorted({k for seg_ks in by_segment.values() for k in seg_ks})
