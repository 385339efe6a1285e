"""Batch inference (``medrpn infer``): geometry of every output format, failures, reruns, safety.

Most tests run the whole command on the shared input folder with the :class:`Oracle` standing in for
``detect_scan`` (the detector is untrained): the planted lesions must come out at their world coordinates
(within half a source voxel) in ``proposals.json``, ``candidates.csv``, the NIfTI label map, the Slicer markups and
the DICOM SEG/SR. A few tests run the real tiny detector end to end (3D volume, 2D radiograph).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from scipy import ndimage

from medrpn.data.io import discover_scans
from medrpn.data.synthetic import SyntheticCase, generate_case, synthetic_uid, write_case_dicom
from medrpn.geometry import image_to_world_boxes
from medrpn.inference.batch import (
    OutputLocationError,
    check_output_location,
    infer_main,
    plan_batch,
    process_scan,
    run_batch,
    scan_folder_name,
)
from medrpn.inference.checkpoint import load_inference_model
from medrpn.inference.resample import resample_to_grid
from medrpn.overlays.tables import read_candidates_csv, read_failures_csv

from .conftest import Inputs, Oracle, make_detector, tree_hashes, write_checkpoint, write_dx

# ---------------------------------------------------------------------------------------------- resampling


def _reference(array: np.ndarray, affine_a: np.ndarray, affine_b: np.ndarray, shape: tuple[int, ...], order: int):
    """scipy ``map_coordinates`` with the same semantics (edge clamp inside the voxel-edge extent, 0 outside)."""
    d = array.ndim
    m = np.linalg.inv(affine_a) @ affine_b
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(d, -1).astype(float)
    c = m[:d, :d] @ idx + m[:d, d : d + 1]
    size = np.asarray(array.shape, dtype=float)[:, None]
    if order == 0:
        v = array[tuple(np.clip(np.rint(c), 0, size - 1).astype(int))]
    else:
        v = ndimage.map_coordinates(array.astype(np.float64), np.clip(c, 0, size - 1), order=1, mode="nearest")
    inside = ((c >= -0.5 - 1e-9) & (c <= size - 0.5 + 1e-9)).all(axis=0)
    return np.where(inside, v, 0).reshape(shape)


def _affine(spacing: tuple[float, ...], origin: tuple[float, ...], matrix: np.ndarray | None = None) -> np.ndarray:
    d = len(spacing)
    a = np.eye(d + 1)
    a[:d, :d] = (np.eye(d) if matrix is None else matrix) @ np.diag(spacing)
    a[:d, d] = origin
    return a


def test_resample_flip_and_permutation_is_exact() -> None:
    rng = np.random.default_rng(0)
    arr = rng.random((5, 6, 7)).astype(np.float32)
    a = _affine((2.0, 3.0, 1.5), (10.0, -5.0, 3.0))
    # grid B: voxel (u, v, w) is voxel (4 - w, u, v) of A -> axis 0 flipped and axes permuted
    p = np.zeros((4, 4))
    p[0, 2], p[0, 3], p[1, 0], p[2, 1], p[3, 3] = -1.0, 4.0, 1.0, 1.0, 1.0
    b = a @ p
    expected = np.transpose(arr[::-1], (1, 2, 0))
    for mode in ("nearest", "linear"):
        out = resample_to_grid(arr, a, b, (6, 7, 5), mode)  # type: ignore[arg-type]
        np.testing.assert_allclose(out, expected, atol=1e-6)
        general = resample_to_grid(arr, a, b, (6, 7, 5), mode, _force_general=True)  # type: ignore[arg-type]
        np.testing.assert_allclose(general, expected, atol=1e-6)


def test_resample_anisotropic_matches_reference_both_paths() -> None:
    rng = np.random.default_rng(1)
    arr = rng.random((7, 9, 5)).astype(np.float32)
    a = _affine((0.7, 0.7, 2.5), (-30.0, 12.0, 100.0), np.diag([-1.0, -1.0, 1.0]))  # RAS of an LPS-axial scan
    b = _affine((1.5, 1.5, 1.5), (-34.5, 6.0, 99.0), np.diag([1.0, 1.0, 1.0]))  # RAS-oriented, isotropic
    shape = (5, 6, 9)
    for order, mode in ((1, "linear"), (0, "nearest")):
        ref = _reference(arr, a, b, shape, order)
        for force in (False, True):
            out = resample_to_grid(arr, a, b, shape, mode, _force_general=force)  # type: ignore[arg-type]
            assert out.shape == shape
            np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=f"{mode} general={force}")
    assert (ref == 0).any() and (ref != 0).any()  # part of grid B lies outside grid A


def test_resample_oblique_and_labels() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, size=(8, 8, 6)).astype(np.uint16)
    th = np.deg2rad(20.0)
    rot = np.array([[np.cos(th), -np.sin(th), 0.0], [np.sin(th), np.cos(th), 0.0], [0.0, 0.0, 1.0]])
    a = _affine((1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    b = _affine((0.8, 0.8, 1.0), (1.0, -1.0, 0.5), rot)
    out = resample_to_grid(labels, a, b, (9, 9, 10), "nearest")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, _reference(labels, a, b, (9, 9, 10), 0))
    lin = resample_to_grid(labels.astype(np.float32), a, b, (9, 9, 10), "linear")
    np.testing.assert_allclose(lin, _reference(labels, a, b, (9, 9, 10), 1), atol=1e-5)


def test_resample_2d_with_4x4_affine_and_errors() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(4, 3)
    a4 = np.diag([-0.5, -0.5, 1.0, 1.0])
    b3 = np.diag([-0.25, -0.5, 1.0])  # axis 0 upsampled by 2
    b3[0, 2] = 0.125
    out = resample_to_grid(arr, a4, b3, (8, 3), "linear")
    assert out.shape == (8, 3)
    np.testing.assert_allclose(out, _reference(arr, a4[[0, 1, 3]][:, [0, 1, 3]], b3, (8, 3), 1), atol=1e-6)
    with pytest.raises(ValueError, match="shape_b"):
        resample_to_grid(arr, a4, b3, (8, 3, 2))
    with pytest.raises(ValueError, match="mode"):
        resample_to_grid(arr, a4, b3, (8, 3), "cubic")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- folder names


@pytest.mark.parametrize(
    "scan_id",
    ["../../etc", "..", ".", "", ".hidden", "a/b\\c", "C:\\x", "CON", "index.html", "x" * 500, "Ünïcødé/../..", "../"],
)
def test_scan_folder_names_are_safe(scan_id: str, tmp_path: Path) -> None:
    name = scan_folder_name(scan_id)
    assert name and len(name) <= 80
    assert "/" not in name and "\\" not in name and ":" not in name
    assert not name.startswith(".") and ".." not in name
    assert name.lower() not in {"index.html", "candidates.csv", "failures.csv", "con"}
    folder = (tmp_path / name).resolve()
    assert folder.parent == tmp_path.resolve()
    assert scan_folder_name(scan_id) == name  # deterministic


def test_scan_folder_name_examples() -> None:
    assert scan_folder_name("../../etc") == "etc"
    assert scan_folder_name("1.2.840.113619.2.55.3") == "1.2.840.113619.2.55.3"
    assert scan_folder_name("case 001") == "case_001"
    assert scan_folder_name("x" * 500) != scan_folder_name("x" * 499)  # cut names keep a hash of the full id
    assert scan_folder_name("ct", suffix="abcd1234") == "ct-abcd1234"


def test_colliding_scan_ids_get_distinct_deterministic_folders(inputs: Inputs, tmp_path: Path) -> None:
    root = tmp_path / "in"
    src = next(inputs.root / rel for sid, rel in inputs.sources.items() if inputs.formats[sid] == "nifti")
    for sub in ("a", "b", "c"):
        (root / sub).mkdir(parents=True)
        shutil.copy(src, root / sub / "ct.nii.gz")
    plan1 = plan_batch([root], tmp_path / "out")
    plan2 = plan_batch([root], tmp_path / "out")
    names = [p.folder for p in plan1.todo]
    assert len(set(names)) == 3 and all(n.startswith("ct-") for n in names)
    assert names == [p.folder for p in plan2.todo]
    assert [p.relative_source for p in plan1.todo] == ["a/ct.nii.gz", "b/ct.nii.gz", "c/ct.nii.gz"]


# --------------------------------------------------------------------------------------------- the batch run


@dataclass
class Run:
    """One ``medrpn infer`` run on the shared inputs with the oracle."""

    status: int
    output: Path
    stdout: str
    hashes_before: dict[str, str]
    hashes_after: dict[str, str]
    oracle: Oracle


@pytest.fixture(scope="module")
def run(inputs: Inputs, ckpt_3d: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    output = tmp_path_factory.mktemp("batch") / "out"
    before = tree_hashes(inputs.root)
    oracle = Oracle(inputs.cases)
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setattr("medrpn.inference.batch.detect_scan", oracle)
        status = infer_main(
            ["--checkpoint", str(ckpt_3d), "--input", str(inputs.root), "--output", str(output), "--no-progress"]
        )
    return Run(status, output, buf.getvalue(), before, tree_hashes(inputs.root), oracle)


def _folder(run: Run, scan_id: str) -> Path:
    return run.output / scan_folder_name(scan_id)


def _nifti(path: Path) -> nib.Nifti1Image:
    img = nib.load(str(path))
    assert isinstance(img, nib.Nifti1Image)
    return img


def _half_voxel(case: SyntheticCase) -> np.ndarray:
    return np.asarray(case.spacing * 2) / 2 + 1e-4


def test_exit_status_summary_and_failures(run: Run, inputs: Inputs) -> None:
    assert run.status == 1  # the corrupt file failed and --allow-failures was not given
    assert str(run.output / "index.html") in run.stdout
    assert "3 scan(s) processed" in run.stdout
    failures = read_failures_csv(run.output / "failures.csv")
    assert [s for s, _ in failures] == [inputs.corrupt]
    assert "corrupt.nii.gz" in failures[0][1] and failures[0][1].startswith("CorruptScanError: ")
    assert "notes.txt" not in (run.output / "failures.csv").read_text()  # silently skipped
    assert len(run.oracle.calls) == 3


def test_inputs_untouched(run: Run) -> None:
    assert run.hashes_after == run.hashes_before


def test_oracle_saw_the_preprocessed_grid(run: Run, inputs: Inputs) -> None:
    for scan_id, affine, shape in run.oracle.calls:
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        np.testing.assert_allclose(spacing, 4.0, atol=1e-6)  # the model's spacing, not the source's
        assert np.all(np.diag(affine)[:3] > 0)  # RAS-oriented
        assert shape != inputs.cases[scan_id].shape


def test_proposals_json_world_boxes(run: Run, inputs: Inputs) -> None:
    for scan_id, case in inputs.cases.items():
        doc = json.loads((_folder(run, scan_id) / "proposals.json").read_text())
        assert doc["scan_id"] == scan_id
        assert doc["source"] == inputs.sources[scan_id]  # relative to the input root
        assert doc["source_format"] == inputs.formats[scan_id]
        assert doc["coordinate_system"] == "LPS" and doc["box_mode"] == "xyzxyz"
        assert doc["spatial_shape"] == list(case.shape)
        np.testing.assert_allclose(doc["affine_ras"], case.affine_ras, atol=1e-4)
        assert len(doc["findings"]) == len(case.lesions)
        for rank, lesion in enumerate(case.lesions, start=1):
            f = doc["findings"][rank - 1]
            assert f["rank"] == rank and f["class_name"] == lesion.class_name
            assert f["score"] == pytest.approx(Oracle.score(rank - 1), abs=1e-6)
            assert np.all(np.abs(np.asarray(f["box"]) - lesion.box) <= _half_voxel(case)), (scan_id, rank)
        if inputs.formats[scan_id] == "dicom":
            assert doc["series_uid"] == scan_id


def test_candidates_csv(run: Run, inputs: Inputs) -> None:
    rows = read_candidates_csv(run.output / "candidates.csv")
    assert len(rows) == sum(len(c.lesions) for c in inputs.cases.values())
    for scan_id, case in inputs.cases.items():
        mine = [r for r in rows if r.seriesuid == scan_id]
        assert len(mine) == len(case.lesions)
        for row, lesion in zip(mine, case.lesions):
            assert row.coord_z is not None
            got = np.array([row.coord_x, row.coord_y, row.coord_z])
            assert np.all(np.abs(got - np.asarray(lesion.center)) <= _half_voxel(case)[:3])


def test_nifti_label_map_and_heatmap(run: Run, inputs: Inputs) -> None:
    for scan_id, case in inputs.cases.items():
        img = _nifti(_folder(run, scan_id) / "findings_labels.nii.gz")
        labels = np.asarray(img.dataobj)
        assert labels.shape == case.shape
        np.testing.assert_allclose(img.affine, case.affine_ras, atol=1e-4)
        for rank, lesion in enumerate(case.lesions, start=1):
            idx = np.argwhere(labels == rank)
            assert idx.size, (scan_id, rank)
            box_img = np.concatenate([idx.min(axis=0), idx.max(axis=0) + 1])[None].astype(float)
            world = image_to_world_boxes(box_img, img.affine).numpy()[0]
            assert np.all(np.abs(world - lesion.box) <= _half_voxel(case)), (scan_id, rank, world, lesion.box)
        heat = np.asarray(_nifti(_folder(run, scan_id) / "objectness.nii.gz").dataobj)
        assert heat.shape == case.shape and heat.min() >= 0.0 and heat.max() <= 1.0
        # the heatmap (1 inside the boxes on the 4 mm preprocessed grid) lands around the lesions of the source
        # grid: zero farther than two preprocessed voxels from every lesion box
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in case.shape], indexing="ij"), axis=-1).reshape(-1, 3)
        lps = ijk * np.asarray(case.spacing) + np.asarray(case.origin)
        near = np.zeros(len(lps), dtype=bool)
        for lesion in case.lesions:
            b = np.asarray(lesion.box)
            near |= np.all((lps >= b[:3] - 8.0) & (lps <= b[3:] + 8.0), axis=1)
        flat = heat.reshape(-1)
        assert flat.max() > 0.5 and flat[near].max() == flat.max()
        assert np.all(flat[~near] == 0.0)


def test_slicer_markups(run: Run, inputs: Inputs) -> None:
    for scan_id, case in inputs.cases.items():
        doc = json.loads((_folder(run, scan_id) / "findings.mrk.json").read_text())
        assert len(doc["markups"]) == len(case.lesions)
        for m, lesion in zip(doc["markups"], case.lesions):
            assert m["coordinateSystem"] == "LPS"
            assert np.all(np.abs(np.asarray(m["center"]) - lesion.center) <= _half_voxel(case)[:3])
            assert np.all(np.abs(np.asarray(m["size"]) - lesion.size) <= 2 * _half_voxel(case)[:3])


def _dicom_case(inputs: Inputs) -> tuple[str, SyntheticCase]:
    return next((sid, c) for sid, c in inputs.cases.items() if inputs.formats[sid] == "dicom")


def test_dicom_only_for_dicom_sources(run: Run, inputs: Inputs) -> None:
    for scan_id, fmt in inputs.formats.items():
        present = {(_folder(run, scan_id) / n).exists() for n in ("seg.dcm", "sr.dcm", "gsps.dcm")}
        assert present == {fmt == "dicom"}


def test_seg_frames_reference_the_lesion_slices(run: Run, inputs: Inputs) -> None:
    scan_id, case = _dicom_case(inputs)
    seg = pydicom.dcmread(_folder(run, scan_id) / "seg.dcm")
    assert seg.SeriesInstanceUID != scan_id
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == scan_id
    uid_to_k = {synthetic_uid(case.seed, case.index, "sop", k): k for k in range(case.shape[2])}
    frames: dict[int, list[int]] = {}
    for item in seg.PerFrameFunctionalGroupsSequence:
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        frames.setdefault(segment, []).append(uid_to_k[ref])
    labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert len(labels) == len(case.lesions)
    for rank, lesion in enumerate(case.lesions, start=1):
        assert labels[rank].startswith(f"Finding {rank} (")
        k0, k1 = lesion.voxel_box[2], lesion.voxel_box[5]
        assert sorted(frames[rank]) == list(range(k0, k1 + 1))


def _walk(items):  # type: ignore[no-untyped-def]
    for it in items:
        yield it
        if "ContentSequence" in it:
            yield from _walk(it.ContentSequence)


def test_sr_planar_regions(run: Run, inputs: Inputs) -> None:
    scan_id, case = _dicom_case(inputs)
    sr = pydicom.dcmread(_folder(run, scan_id) / "sr.dcm")
    regions = [it for it in _walk(sr.ContentSequence) if it.ValueType == "SCOORD3D"]
    assert len(regions) == len(case.lesions)
    half = _half_voxel(case)
    for region, lesion in zip(regions, case.lesions):
        pts = np.asarray(region.GraphicData, dtype=float).reshape(-1, 3)
        x0, y0, z0, x1, y1, z1 = lesion.box
        assert abs(pts[:, 0].min() - x0) <= half[0] and abs(pts[:, 0].max() - x1) <= half[0]
        assert abs(pts[:, 1].min() - y0) <= half[1] and abs(pts[:, 1].max() - y1) <= half[1]
        assert np.all(np.abs(pts[:, 2] - (z0 + z1) / 2) <= half[2])


def test_dicom_objects_pass_dciodvfy(run: Run, inputs: Inputs) -> None:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    scan_id, _ = _dicom_case(inputs)
    for name in ("seg.dcm", "sr.dcm", "gsps.dcm"):
        proc = subprocess.run([exe, str(_folder(run, scan_id) / name)], capture_output=True, text=True, timeout=60)
        text = proc.stdout + proc.stderr
        errors = [line for line in text.splitlines() if line.startswith("Error")]
        assert not errors, f"{name}:\n{text}"


def test_index_html_lists_scans_and_failure(run: Run, inputs: Inputs) -> None:
    html = (run.output / "index.html").read_text()
    for scan_id in inputs.cases:
        assert scan_id in html
    assert "corrupt.nii.gz" in html
    assert "finding_01_axial.png" in html


# ------------------------------------------------------------------------------------- reruns and statuses


def test_rerun_skips_and_overwrite_redoes(inputs: Inputs, ckpt_3d: Path, oracle: Oracle, tmp_path: Path) -> None:
    nifti = next(inputs.root / rel for sid, rel in inputs.sources.items() if inputs.formats[sid] == "nifti")
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt_3d), "--input", str(nifti), "--output", str(out), "--no-progress"]
    assert infer_main(args) == 0  # a single file as input
    proposals = next(out.glob("*/proposals.json"))
    doc = json.loads(proposals.read_text())
    assert doc["source"] == nifti.name
    mtime = proposals.stat().st_mtime_ns
    assert infer_main(args) == 0
    assert proposals.stat().st_mtime_ns == mtime  # skipped
    assert len(oracle.calls) == 1
    assert len(read_candidates_csv(out / "candidates.csv")) == len(doc["findings"])  # skipped scans still listed
    assert infer_main([*args, "--overwrite"]) == 0
    assert proposals.stat().st_mtime_ns != mtime
    assert len(oracle.calls) == 2


def test_allow_failures_gives_status_zero(inputs: Inputs, ckpt_3d: Path, tmp_path: Path) -> None:
    broken = inputs.root / Path(inputs.corrupt).parent
    args = ["--checkpoint", str(ckpt_3d), "--input", str(broken), "--output", str(tmp_path / "o"), "--no-progress"]
    assert infer_main(args) == 1
    assert infer_main([*args, "--allow-failures"]) == 0
    assert [s for s, _ in read_failures_csv(tmp_path / "o" / "failures.csv")] == ["corrupt.nii.gz"]


def test_output_inside_or_equal_to_input_is_refused(
    inputs: Inputs, ckpt_3d: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree_hashes(inputs.root)
    for out in (inputs.root / "results", inputs.root, inputs.root / "nifti" / "x"):
        status = infer_main(["--checkpoint", str(ckpt_3d), "--input", str(inputs.root), "--output", str(out)])
        assert status == 2
        err = capsys.readouterr().err
        assert "never writes into its inputs" in err and str(out) in err
    assert tree_hashes(inputs.root) == before  # nothing created
    with pytest.raises(OutputLocationError, match="lies inside the output folder"):
        check_output_location([inputs.root / "nifti"], inputs.root)
    with pytest.raises(OutputLocationError, match="not a folder"):
        check_output_location([inputs.root / "nifti"], inputs.root / "notes.txt")


class Evil:
    """A custom class: unpickling it would run arbitrary code."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pwned",))


def test_tampered_or_corrupt_checkpoint_is_refused(
    inputs: Inputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = write_checkpoint(tmp_path / "evil.ckpt", make_detector(3), extra={"payload": Evil()})
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(evil.read_bytes()[:1000])
    for ckpt, words in ((evil, "refused"), (truncated, "cannot read"), (tmp_path / "missing.ckpt", "not found")):
        out = tmp_path / f"out_{ckpt.stem}"
        status = infer_main(["--checkpoint", str(ckpt), "--input", str(inputs.root), "--output", str(out)])
        captured = capsys.readouterr()
        assert status == 2
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and str(ckpt) in lines[0] and words in lines[0], captured.err
        assert "pwned" not in captured.out
        assert not out.exists()


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert infer_main([]) == 2
    assert infer_main(["--checkpoint", "x", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert infer_main(["--help"]) == 0
    assert "medrpn infer" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------- real detector


def test_real_detector_3d_process_scan(inputs: Inputs, ckpt_3d: Path, tmp_path: Path) -> None:
    model = load_inference_model(ckpt_3d)
    nifti = next(inputs.root / rel for sid, rel in inputs.sources.items() if inputs.formats[sid] == "nifti")
    source = discover_scans([nifti]).scans[0]
    steps: list[tuple[int, int]] = []
    result = process_scan(
        model,
        source,
        tmp_path / "case",
        input_root=inputs.root,
        tta=True,
        progress=lambda done, total: steps.append((done, total)),
    )
    assert steps and steps[-1][0] == steps[-1][1]
    assert result.source == "nifti/" + nifti.name
    assert result.spatial_shape == _shape_of(inputs, nifti)
    assert 0 < len(result.findings) <= 5
    doc = json.loads((tmp_path / "case" / "proposals.json").read_text())
    assert len(doc["findings"]) == len(result.findings)
    heat = np.asarray(_nifti(tmp_path / "case" / "objectness.nii.gz").dataobj)
    assert heat.shape == result.spatial_shape and 0.0 <= heat.min() <= heat.max() <= 1.0 and heat.max() > 0
    # every box overlaps the scan's world extent
    lo = image_to_world_boxes(np.array([[0, 0, 0, *result.spatial_shape]], dtype=float), result.affine_ras)[0]
    for f in result.findings:
        b = np.asarray(f.box)
        assert np.all(b[3:] > lo[:3].numpy() - 1e-3) and np.all(b[:3] < lo[3:].numpy() + 1e-3)


def _shape_of(inputs: Inputs, path: Path) -> tuple[int, ...]:
    sid = next(s for s, rel in inputs.sources.items() if inputs.root / rel == path)
    return inputs.cases[sid].shape


def test_2d_radiograph_with_2d_and_3d_models(ckpt_2d: Path, ckpt_3d: Path, tmp_path: Path) -> None:
    dx = write_dx(tmp_path / "in" / "chest_dx.dcm")
    report = run_batch(load_inference_model(ckpt_2d), [dx.parent], tmp_path / "out2d", progress=False)
    assert report.failures == [] and len(report.processed) == 1
    folder = report.processed[0].folder
    doc = json.loads((folder / "proposals.json").read_text())
    assert doc["box_mode"] == "xyxy" and doc["spatial_shape"] == [100, 80] and doc["source"] == "chest_dx.dcm"
    assert all(len(f["box"]) == 4 for f in doc["findings"])
    assert not (folder / "seg.dcm").exists()  # SEG/SR/GSPS only for series
    assert (folder / "findings_labels.nii.gz").exists() and (folder / "findings.mrk.json").exists()
    if doc["findings"]:
        assert (folder / "finding_01_image.png").exists()
    rows = list(csv.DictReader((tmp_path / "out2d" / "candidates.csv").open()))
    assert all(r["coordZ"] == "" for r in rows)

    report3 = run_batch(load_inference_model(ckpt_3d), [dx.parent], tmp_path / "out3d", progress=False)
    assert report3.processed == []
    ((source, reason),) = report3.failures
    assert source == "chest_dx.dcm" and reason.startswith("ValueError: ") and "2D image" in reason
    assert read_failures_csv(tmp_path / "out3d" / "failures.csv") == report3.failures


def test_any_exception_is_recorded_and_the_batch_goes_on(
    inputs: Inputs, ckpt_3d: Path, oracle: Oracle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def flaky(detector, volume, config, context=0, *, progress=None):  # type: ignore[no-untyped-def]
        if "case" not in str(volume.meta["scan_id"]):
            raise MemoryError("cannot allocate 12 GB")
        return oracle(detector, volume, config, context, progress=progress)

    monkeypatch.setattr("medrpn.inference.batch.detect_scan", flaky)
    report = run_batch(load_inference_model(ckpt_3d), [inputs.root], tmp_path / "out", progress=False)
    reasons = dict(report.failures)
    dicom_rel = next(rel for sid, rel in inputs.sources.items() if inputs.formats[sid] == "dicom")
    assert reasons[dicom_rel] == "MemoryError: cannot allocate 12 GB"
    assert inputs.corrupt in reasons
    assert len(report.processed) == 2


def test_hostile_series_uid_stays_inside_the_output(
    ckpt_3d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = generate_case(1, 0, shape=(64, 64, 32))
    for path in write_case_dicom(case, tmp_path / "in" / "series"):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "../../etc"
        ds.save_as(path)
    monkeypatch.setattr("medrpn.inference.batch.detect_scan", Oracle({"../../etc": case}))
    out = tmp_path / "deep" / "out"
    status = infer_main(["--checkpoint", str(ckpt_3d), "--input", str(tmp_path / "in"), "--output", str(out)])
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "in"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["candidates.csv", "etc", "failures.csv", "index.html"]
    doc = json.loads((out / "etc" / "proposals.json").read_text())
    assert doc["scan_id"] == "../../etc" and doc["source"] == "series"


def test_2d_model_on_a_volume_links_slices(inputs: Inputs, tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "2d.ckpt", make_detector(2, spacing_mm=(4.0, 4.0)), spacing_mm=(4.0, 4.0, 4.0))
    nifti = next(inputs.root / rel for sid, rel in inputs.sources.items() if inputs.formats[sid] == "nifti")
    source = discover_scans([nifti]).scans[0]
    steps: list[tuple[int, int]] = []
    result = process_scan(
        load_inference_model(ckpt),
        source,
        tmp_path / "c",
        input_root=nifti.parent,
        tta=False,
        progress=lambda done, total: steps.append((done, total)),
    )
    assert len(steps) > 1 and steps[-1][0] == steps[-1][1]  # slice batches
    assert result.source == nifti.name and result.spatial_shape == _shape_of(inputs, nifti)
    assert all(len(f.box) == 6 for f in result.findings)
    assert (tmp_path / "c" / "proposals.json").is_file()


def test_next_scan_is_prefetched_in_a_background_thread(
    inputs: Inputs, ckpt_3d: Path, oracle: Oracle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import threading
    import time

    import medrpn.inference.batch as batch

    events: list[tuple[str, str, float]] = []
    real_load = batch.load_scan

    def load(source):  # type: ignore[no-untyped-def]
        events.append(("load", threading.current_thread().name, time.perf_counter()))
        return real_load(source)

    def detect(*args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        time.sleep(0.3)
        out = oracle(*args, **kwargs)
        events.append(("detect", f"{start}", time.perf_counter()))
        return out

    monkeypatch.setattr(batch, "load_scan", load)
    monkeypatch.setattr(batch, "detect_scan", detect)
    report = run_batch(load_inference_model(ckpt_3d), [inputs.root], tmp_path / "out", progress=False)
    assert len(report.processed) == 3
    loads = [e for e in events if e[0] == "load"]
    detects = [e for e in events if e[0] == "detect"]
    assert all(name.startswith("medrpn-prefetch") for _, name, _ in loads)
    # the second scan was being loaded while the first one was still being detected
    assert loads[1][2] < detects[0][2]


def test_hessian_channel_models_get_them_at_inference(inputs: Inputs, tmp_path: Path) -> None:
    """A model trained with Hessian channels stores their scales; inference recomputes them for 3D and 2D models."""
    from medrpn.inference.batch import PreprocessingSpec

    torch.manual_seed(0)
    ckpt3 = write_checkpoint(
        tmp_path / "h3.ckpt", make_detector(3, in_channels=3), patch_size=(48, 48, 32), hessian_sigmas_mm=(4.0,)
    )
    ckpt2 = write_checkpoint(  # 2D slices: image (no context) + dot + line
        tmp_path / "h2.ckpt",
        make_detector(2, in_channels=3, spacing_mm=(1.0, 1.0)),
        spacing_mm=(1.0, 1.0, 1.0),
        hessian_sigmas_mm=(1.5, 3.0),
    )
    model3, model2 = load_inference_model(ckpt3), load_inference_model(ckpt2)
    assert model3.hessian_sigmas_mm == (4.0,) and model2.hessian_sigmas_mm == (1.5, 3.0)
    assert PreprocessingSpec.from_model(model2).hessian_sigmas_mm == (1.5, 3.0)
    nifti = next(inputs.root / rel for sid, rel in inputs.sources.items() if inputs.formats[sid] == "nifti")
    for name, model in (("3d", model3), ("2d", model2)):
        report = run_batch(model, [nifti], tmp_path / name, progress=False)
        assert report.failures == [] and len(report.processed) == 1, name
    dx = write_dx(tmp_path / "dx" / "chest_dx.dcm")  # a genuine 2D image: 2D Hessian channels
    report = run_batch(model2, [dx.parent], tmp_path / "dx_out", progress=False)
    assert report.failures == [] and len(report.processed) == 1
