"""NIfTI overlays on the source grid: affine, label = rank on the expected voxels, heatmap, atomic writes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from hypothesis import given, settings
from hypothesis import strategies as st

from medrpn.geometry import image_to_world_boxes
from medrpn.inference.results import Finding, ScanResult
from medrpn.overlays.nifti import (
    OBJECTNESS_SLOPE,
    axial_axis,
    box_voxel_ranges,
    findings_label_map,
    quantize_probabilities,
    write_nifti_overlays,
)
from tests.overlays.test_tables import (
    AFFINE_RAS_2D,
    AFFINE_RAS_3D,
    RANGES_2D,
    RANGES_3D,
    SCORES_2D,
    SCORES_3D,
    SHAPE_2D,
    SHAPE_3D,
    make_result_2d,
    make_result_3d,
    ranges_by_rank,
)


def expected_labels(shape: tuple[int, ...], by_rank: dict[int, tuple], filled: bool, normal: int | None) -> np.ndarray:
    """Reference label map, voxel by voxel: border voxels of each in-plane rectangle (or all voxels)."""
    out = np.zeros(shape, dtype=np.uint16)
    in_plane = [a for a in range(len(shape)) if a != normal]
    for rank in sorted(by_rank, reverse=True):
        rr = by_rank[rank]
        for idx in np.ndindex(*[b - a + 1 for a, b in rr]):
            vox = tuple(a + o for (a, _), o in zip(rr, idx))
            border = any(vox[a] in (rr[a][0], rr[a][1]) for a in in_plane)
            if filled or border:
                out[vox] = rank
    return out


def test_labels_on_source_grid_outline(tmp_path: Path) -> None:
    res = make_result_3d()
    outputs = write_nifti_overlays(res, tmp_path)
    assert outputs.labels == tmp_path / "findings_labels.nii.gz"
    img = nib.load(outputs.labels)
    assert img.shape == SHAPE_3D
    assert img.get_data_dtype() == np.uint16
    assert np.allclose(img.affine, AFFINE_RAS_3D)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert np.allclose(img.get_qform(), AFFINE_RAS_3D, atol=1e-5)
    assert np.allclose(img.get_sform(), AFFINE_RAS_3D)
    data = np.asarray(img.dataobj)
    by_rank = ranges_by_rank(RANGES_3D, SCORES_3D)
    np.testing.assert_array_equal(data, expected_labels(SHAPE_3D, by_rank, filled=False, normal=2))
    # every slice the box spans shows the rectangle border; inside is empty; outside the z-range nothing
    (i0, i1), (j0, j1), (k0, k1) = by_rank[1]
    for k in range(k0, k1 + 1):
        assert data[i0, j0 + 1, k] == 1 and data[(i0 + i1) // 2, j1, k] == 1
    assert data[i0 + 1, j0 + 1, k0] == 0
    assert data[i0, j0, k0 - 1] == 0 and data[i0, j0, k1 + 1] == 0
    # rank 1 wins where outlines cross: F2's border voxel at (15, 19, 6) lies on F1's border row j=19
    assert data[15, 19, 6] == 1
    assert set(np.unique(data)) == {0, 1, 2, 3}


def test_labels_filled_rank1_wins(tmp_path: Path) -> None:
    res = make_result_3d(with_heatmap=False)
    outputs = write_nifti_overlays(res, tmp_path, filled=True)
    assert outputs.objectness is None and not (tmp_path / "objectness.nii.gz").exists()
    data = np.asarray(nib.load(outputs.labels).dataobj)
    by_rank = ranges_by_rank(RANGES_3D, SCORES_3D)
    np.testing.assert_array_equal(data, expected_labels(SHAPE_3D, by_rank, filled=True, normal=None))
    # overlap of F1 (i 10..17, j 12..19, k 4..8) and F2 (i 15..24, j 16..25, k 6..9) belongs to rank 1
    assert np.all(data[15:18, 16:20, 6:9] == 1)
    assert data[20, 22, 9] == 2
    # the tiny one-slice box is present with all its voxels
    assert np.count_nonzero(data == 3) == 2 * 2 * 1


def test_objectness_heatmap(tmp_path: Path) -> None:
    res = make_result_3d()
    outputs = write_nifti_overlays(res, tmp_path)
    assert outputs.objectness == tmp_path / "objectness.nii.gz"
    img = nib.load(outputs.objectness)
    assert img.get_data_dtype() == np.uint8  # scaled by scl_slope: readers see [0, 1]
    assert np.allclose(img.affine, AFFINE_RAS_3D)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    decoded = np.asarray(img.dataobj)
    assert decoded.dtype.kind == "f" and decoded.min() >= 0.0 and decoded.max() <= 1.0
    assert res.objectness_map is not None
    np.testing.assert_allclose(decoded, res.objectness_map, atol=1 / 510 + 1e-6)
    res.objectness_map = np.zeros((3, 3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        write_nifti_overlays(res, tmp_path / "bad")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.floats(-0.5, 1.5, width=32), st.just(float("nan"))), min_size=1, max_size=64))
def test_quantized_probabilities_decode_into_unit_interval(values: list[float]) -> None:
    p = np.asarray(values, dtype=np.float32)
    decoded32 = quantize_probabilities(p).astype(np.float32) * np.float32(OBJECTNESS_SLOPE)
    decoded64 = quantize_probabilities(p).astype(np.float64) * OBJECTNESS_SLOPE
    for d in (decoded32, decoded64):
        assert d.min() >= 0.0 and d.max() <= 1.0
    expected = np.clip(np.nan_to_num(p, nan=0.0), 0.0, 1.0)
    np.testing.assert_allclose(decoded64, expected, atol=1 / 510 + 1e-6)


def test_objectness_heatmap_reads_as_probabilities_in_simpleitk(tmp_path: Path) -> None:
    res = make_result_3d()
    write_nifti_overlays(res, tmp_path)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "objectness.nii.gz")))  # (z, y, x)
    assert arr.dtype.kind == "f"
    assert res.objectness_map is not None
    np.testing.assert_allclose(arr.transpose(2, 1, 0), res.objectness_map, atol=1 / 510 + 1e-6)


def test_2d_image(tmp_path: Path) -> None:
    res = make_result_2d()
    for filled in (False, True):
        outputs = write_nifti_overlays(res, tmp_path / str(filled), filled=filled)
        img = nib.load(outputs.labels)
        assert img.shape == SHAPE_2D
        expected_affine = np.eye(4)
        expected_affine[np.ix_([0, 1, 3], [0, 1, 3])] = AFFINE_RAS_2D
        assert np.allclose(img.affine, expected_affine)
        assert int(img.header["sform_code"]) == 1
        by_rank = ranges_by_rank(RANGES_2D, SCORES_2D)
        expected = expected_labels(SHAPE_2D, by_rank, filled=filled, normal=None)
        np.testing.assert_array_equal(np.asarray(img.dataobj), expected)
        assert np.asarray(img.dataobj)[40, 3] == 1  # the second box is rank 1
    # MONAI's 4x4 affine for a 2D image gives the same labels
    res4 = make_result_2d()
    affine4 = np.eye(4)
    affine4[np.ix_([0, 1, 3], [0, 1, 3])] = AFFINE_RAS_2D
    res4.affine_ras = affine4
    np.testing.assert_array_equal(findings_label_map(res4), findings_label_map(res))


def test_permuted_grid_outlines_in_axial_planes() -> None:
    # array axis 0 runs superior->inferior (sagittal-like storage): the axial axis is 0
    lps = np.array([[0.0, 0.8, 0.0, 10.0], [0.0, 0.0, 0.8, -5.0], [-3.0, 0.0, 0.0, 60.0], [0.0, 0.0, 0.0, 1.0]])
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    assert axial_axis(ras) == 0
    shape = (10, 20, 20)
    rr = ((2, 5), (4, 9), (6, 12))
    box = image_to_world_boxes(np.array([[2, 4, 6, 6, 10, 13]], dtype=float), ras).numpy()
    res = ScanResult("p", "p", "nifti", ras, shape, [Finding(1, tuple(box[0]), 0.9, 0, "solid", (0.9,), 0.9)])
    np.testing.assert_array_equal(findings_label_map(res), expected_labels(shape, {1: rr}, filled=False, normal=0))


def test_box_voxel_ranges_edge_cases() -> None:
    shape = SHAPE_3D
    # a box thinner than a voxel gets the voxel holding its centre; one outside the grid gets None
    thin = image_to_world_boxes(np.array([[3.2, 4.1, 5.3, 3.4, 4.3, 5.4]]), AFFINE_RAS_3D).numpy()
    outside = image_to_world_boxes(np.array([[60.0, 1.0, 1.0, 70.0, 3.0, 3.0]]), AFFINE_RAS_3D).numpy()
    partly = image_to_world_boxes(np.array([[-5.0, 38.0, 10.0, 2.0, 45.0, 20.0]]), AFFINE_RAS_3D).numpy()
    r = box_voxel_ranges(np.concatenate([thin, outside, partly]), AFFINE_RAS_3D, shape)
    assert r[0] == ((3, 3), (4, 4), (5, 5))
    assert r[1] is None
    assert r[2] == ((0, 1), (38, 39), (10, 13))
    assert box_voxel_ranges(np.zeros((0, 6)), AFFINE_RAS_3D, shape) == []


def test_interrupted_nifti_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = make_result_3d()

    def crash(img: nib.Nifti1Image, filename: str) -> None:
        Path(filename).write_bytes(b"\x1f\x8b partial")
        raise MemoryError("killed mid-write")

    monkeypatch.setattr(nib, "save", crash)
    with pytest.raises(MemoryError):
        write_nifti_overlays(res, tmp_path)
    assert list(tmp_path.iterdir()) == []
