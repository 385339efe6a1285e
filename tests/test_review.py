"""The review logic behind notebooks/review_proposals.ipynb: tables, selection geometry, decisions, export, drawing."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from medrpn.data.synthetic import CLASS_NAMES, SyntheticCase, generate_case, write_case_nifti
from medrpn.geometry import voxel_to_world
from medrpn.inference.results import ScanResult, findings_from_json, make_findings
from medrpn.overlays.tables import PROPOSALS_JSON, write_candidates_csv, write_failures_csv, write_proposals_json
from medrpn.review import (
    REVIEW_CSV_HEADER,
    REVIEW_SUBDIR,
    WINDOW_PRESETS,
    FindingTable,
    ProtectedPathError,
    ReviewController,
    ReviewSession,
    ScanMismatchError,
    ScanNotAvailableError,
    draw_view,
    figure_png,
    render_review_figure,
    resolve_source,
    resolve_window,
    review_widget,
    write_demo_batch,
)

# A flipped, anisotropic grid: source axis 0 -> +x (L) 0.8 mm, axis 1 -> -y (anterior) 1.5 mm, axis 2 -> -z
# (inferior) 3 mm. In LPS: diag(0.8, -1.5, -3.0), origin (-50, 40, 100).
FLIPPED_RAS = np.array(
    [[-0.8, 0.0, 0.0, 50.0], [0.0, 1.5, 0.0, -40.0], [0.0, 0.0, -3.0, 100.0], [0.0, 0.0, 0.0, 1.0]], dtype=np.float64
)
# A permuted grid (e.g. a sagittal acquisition): axis 0 -> +z (S) 2.5 mm, axis 1 -> +x (L) 0.9 mm, axis 2 -> +y (P)
# 1.2 mm.
PERMUTED_RAS = np.array(
    [[0.0, -0.9, 0.0, 20.0], [0.0, 0.0, -1.2, 15.0], [2.5, 0.0, 0.0, -60.0], [0.0, 0.0, 0.0, 1.0]], dtype=np.float64
)
SHAPE = (40, 30, 20)
CENTRES_VOX = [(10, 12, 5), (25, 12, 5), (30, 5, 15)]  # ranks 1, 2, 3 (scores 0.9, 0.6, 0.3)
SCORES = [0.9, 0.6, 0.3]
HALF_VOX = 2.5  # box corners at centre +- 2.5 voxel indices: exactly the 5 voxels centre-2 .. centre+2


def _boxes_world(affine_ras: np.ndarray, centres: list[tuple[int, int, int]]) -> np.ndarray:
    """World boxes of +-HALF_VOX voxels (voxel-edge extents) around voxel centres."""
    out = []
    for c in centres:
        corners = np.array(
            [
                [c[0] + dx, c[1] + dy, c[2] + dz]
                for dx in (-HALF_VOX, HALF_VOX)
                for dy in (-HALF_VOX, HALF_VOX)
                for dz in (-HALF_VOX, HALF_VOX)
            ],
            dtype=np.float64,
        )
        w = voxel_to_world(corners, affine_ras).numpy()
        out.append([*w.min(axis=0), *w.max(axis=0)])
    return np.asarray(out)


def write_scan_and_batch(
    root: Path,
    affine_ras: np.ndarray = FLIPPED_RAS,
    *,
    scan_id: str = "scan_a",
    folder: str | None = None,
    centres: list[tuple[int, int, int]] | None = None,
    scores: list[float] | None = None,
) -> tuple[Path, Path]:
    """A NIfTI scan (``root/scans/<id>.nii.gz``) with bright cubes at the findings + its batch output folder."""
    centres = centres or CENTRES_VOX
    scores = scores or SCORES[: len(centres)]
    img = np.full(SHAPE, -800.0, dtype=np.float32)
    for c in centres:
        img[tuple(slice(v - 2, v + 3) for v in c)] = 60.0
    scans, out = root / "scans", root / "out"
    scans.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img, affine_ras), str(scans / f"{scan_id}.nii.gz"))
    n = len(centres)
    probs = np.tile([0.8, 0.15, 0.05], (n, 1))
    findings = make_findings(
        _boxes_world(affine_ras, centres), np.asarray(scores), np.zeros(n, int), probs, np.asarray(scores), CLASS_NAMES
    )
    result = ScanResult(
        scan_id=scan_id,
        source=f"{scan_id}.nii.gz",
        source_format="nifti",
        affine_ras=affine_ras,
        spatial_shape=SHAPE,
        findings=findings,
    )
    write_proposals_json(result, out / (folder or scan_id))
    return out, scans


def build_synthetic_batch(root: Path, case_index: int = 3, shape: tuple[int, int, int] = (64, 64, 32)) -> SyntheticCase:
    """The notebook test's data: a synthetic case as NIfTI under ``root/data/nifti`` and a hand-built batch output
    folder ``root/infer`` whose findings are the case's lesions (by size: scores 0.95, 0.85, ...) plus one false
    positive (score 0.5, rank after the lesions)."""
    case = generate_case(case_index, seed=0, shape=shape)
    assert len(case.lesions) >= 2
    write_case_nifti(case, root / "data" / "nifti" / f"{case.case_id}.nii.gz", root / "labels" / "label.nii.gz")
    lesions = sorted(case.lesions, key=lambda les: -les.diameter_mm)
    boxes = [list(les.box) for les in lesions]
    scores = [0.95 - 0.1 * i for i in range(len(lesions))]
    fp_centre = np.asarray(case.origin) + (np.asarray(case.shape) - 1) * np.asarray(case.spacing) / 2
    boxes.append([*(fp_centre - 4.0), *(fp_centre + 4.0)])
    scores.append(0.5)
    labels = [les.class_id for les in lesions] + [0]
    probs = np.full((len(boxes), 3), 0.05)
    for i, lab in enumerate(labels):
        probs[i, lab] = 0.9
    findings = make_findings(
        np.asarray(boxes), np.asarray(scores), np.asarray(labels), probs, np.asarray(scores), CLASS_NAMES
    )
    result = ScanResult(
        scan_id=case.case_id,
        source=f"{case.case_id}.nii.gz",  # relative to its input root data/nifti
        source_format="nifti",
        affine_ras=case.affine_ras,
        spatial_shape=case.shape,
        findings=findings,
    )
    out = root / "infer"
    write_proposals_json(result, out / case.case_id)
    write_candidates_csv([result], out / "candidates.csv")
    write_failures_csv([], out / "failures.csv")
    (out / "index.html").write_text("<html></html>\n")
    return case


def tree_hashes(folder: Path) -> dict[str, str]:
    """Content hash of every file below a folder."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def flipped(tmp_path: Path) -> ReviewSession:
    out, scans = write_scan_and_batch(tmp_path)
    return ReviewSession.open(out, scans)


def _rects(ax: Any) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _axes() -> Any:
    fig = Figure()
    FigureCanvasAgg(fig)
    return fig.add_subplot()


# ----------------------------------------------------------------------------------------------- tables


def test_table_sorted_by_score_across_scans_and_filtered(tmp_path: Path) -> None:
    out, scans = write_scan_and_batch(tmp_path, scan_id="scan_a", scores=[0.9, 0.6, 0.3])
    write_scan_and_batch(tmp_path, PERMUTED_RAS, scan_id="scan_b", scores=[0.95, 0.5, 0.1])
    s = ReviewSession.open(out, scans)
    assert s.scan_ids == ["scan_a", "scan_b"]
    rows = s.table()
    assert [(r.scan, r.rank) for r in rows] == [
        ("scan_b", 1),
        ("scan_a", 1),
        ("scan_a", 2),
        ("scan_b", 2),
        ("scan_a", 3),
        ("scan_b", 3),
    ]
    assert [r.score for r in rows] == sorted((r.score for r in rows), reverse=True)
    assert [r.rank for r in s.table("scan_a")] == [1, 2, 3]
    assert [(r.scan, r.rank) for r in s.filter(0.55)] == [("scan_b", 1), ("scan_a", 1), ("scan_a", 2)]
    assert s.filter(0.99) == []
    text = str(rows)
    assert text.splitlines()[0].split()[:4] == ["#", "scan", "rank", "score"]
    assert "scan_b" in text and "0.950" in text
    assert "(no findings)" in FindingTable().to_text()


def test_html_table_escapes(flipped: ReviewSession) -> None:
    flipped.comment("scan_a", 1, "<script>alert(1)</script>")
    html_text = flipped.table()._repr_html_()
    assert "<script>" not in html_text and "&lt;script&gt;" in html_text


def test_duplicate_scan_ids_get_folder_keys(tmp_path: Path) -> None:
    out, scans = write_scan_and_batch(tmp_path, folder="one")
    write_scan_and_batch(tmp_path, folder="two")
    s = ReviewSession.open(out, scans)
    assert sorted(s.scan_ids) == ["scan_a@one", "scan_a@two"]
    with pytest.raises(KeyError, match="ambiguous"):
        s.scan("scan_a")
    s.accept("scan_a@two", 1)
    assert s.decision("scan_a@two", 1).decision == "accepted"
    assert s.decision("scan_a@one", 1).decision == "pending"


def test_resolve_source_under_root_and_its_subfolders(tmp_path: Path) -> None:
    (tmp_path / "heldout" / "nifti").mkdir(parents=True)
    (tmp_path / "heldout" / "dicom" / "case_000").mkdir(parents=True)
    f = tmp_path / "heldout" / "nifti" / "case_001.nii.gz"
    f.write_bytes(b"x")
    root = tmp_path / "heldout"
    assert resolve_source("case_001.nii.gz", [root]) == f
    assert resolve_source("case_000", [root]) == root / "dicom" / "case_000"
    assert resolve_source("nifti/case_001.nii.gz", [root]) == f
    assert resolve_source(str(f), []) == f
    assert resolve_source("missing.nii.gz", [root]) is None


def test_missing_scan_still_lists_and_exports_but_cannot_draw(tmp_path: Path) -> None:
    out, _ = write_scan_and_batch(tmp_path)
    s = ReviewSession.open(out, tmp_path / "nowhere")
    assert len(s.table()) == 3
    assert s.select("scan_a", 1).axial == 14  # geometry only needs proposals.json
    with pytest.raises(ScanNotAvailableError, match=r"scan_a\.nii\.gz"):
        draw_view(_axes(), s, "scan_a", "axial")
    s.accept("scan_a", 1)
    s.export(tmp_path / "exp" / "r.json")


def test_scan_with_another_grid_is_refused(tmp_path: Path) -> None:
    out, scans = write_scan_and_batch(tmp_path)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32) + np.arange(8), FLIPPED_RAS), str(scans / "scan_a.nii.gz"))
    s = ReviewSession.open(out, scans)
    with pytest.raises(ScanMismatchError, match="same scan"):
        s.image("scan_a")


# ----------------------------------------------------------------------------------------------- selection geometry


def test_selection_on_flipped_anisotropic_grid(flipped: ReviewSession) -> None:
    f = flipped.scan("scan_a").finding(1)
    # voxel (10, 12, 5) of the source grid is at LPS (-50 + 8, 40 - 18, 100 - 15)
    np.testing.assert_allclose(f.centre, (-42.0, 22.0, 85.0), atol=1e-9)
    sel = flipped.select("scan_a", 1)
    np.testing.assert_allclose(sel.voxel, (10.0, 12.0, 5.0), atol=1e-9)
    # displayed grid: axis 0 -> L (not flipped), axis 1 -> P (source j flipped), axis 2 -> S (source k flipped)
    assert (sel.sagittal, sel.coronal, sel.axial) == (10, SHAPE[1] - 1 - 12, SHAPE[2] - 1 - 5)
    # zoom windows: at least 80 mm (or the whole axis) per side and containing the finding
    grid = flipped.geometry("scan_a")
    spec_axes = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}
    centre_disp = (10.0, SHAPE[1] - 1 - 12.0, SHAPE[2] - 1 - 5.0)
    for view, (h, v) in spec_axes.items():
        h0, v0, h1, v1 = sel.zoom[view]
        for a, lo, hi in ((h, h0, h1), (v, v0, v1)):
            n = grid.array.shape[a]
            assert 0 <= lo < hi <= n
            assert (hi - lo) * grid.spacing[a] >= min(80.0, n * grid.spacing[a]) - 1e-6
            assert lo <= centre_disp[a] + 0.5 <= hi


def test_selection_on_permuted_grid(tmp_path: Path) -> None:
    out, scans = write_scan_and_batch(tmp_path, PERMUTED_RAS)
    s = ReviewSession.open(out, scans)
    for rank, (i, j, k) in enumerate(CENTRES_VOX, start=1):
        sel = s.select("scan_a", rank)
        np.testing.assert_allclose(sel.voxel, (i, j, k), atol=1e-9)
        # L = source axis 1, P = source axis 2, S = source axis 0, none flipped
        assert (sel.sagittal, sel.coronal, sel.axial) == (j, k, i)
    assert s.num_slices("scan_a", "axial") == SHAPE[0]
    assert s.num_slices("scan_a", "sagittal") == SHAPE[1]


def test_window_presets() -> None:
    assert WINDOW_PRESETS["lung"] == (-600.0, 1500.0)
    assert resolve_window("lung") == (-1350.0, 150.0)
    assert resolve_window("Soft Tissue") == (-160.0, 240.0)
    assert resolve_window("bone") == (-500.0, 1300.0)
    assert resolve_window("mediastinum") == (-125.0, 225.0)
    assert resolve_window((40, 80)) == (0.0, 80.0)
    lo, hi = resolve_window("auto", np.linspace(0, 100, 1001))
    assert lo == pytest.approx(0.5) and hi == pytest.approx(99.5)
    with pytest.raises(ValueError, match="preset"):
        resolve_window("liver")
    with pytest.raises(ValueError, match="width"):
        resolve_window((0, 0))


# ----------------------------------------------------------------------------------------------- decisions + export


def test_decisions(flipped: ReviewSession) -> None:
    assert flipped.decision("scan_a", 1).decision == "pending"
    d = flipped.accept("scan_a", 1, comment="solid nodule")
    assert (d.decision, d.comment) == ("accepted", "solid nodule") and d.decided_at
    flipped.reject("scan_a", 2)
    flipped.comment("scan_a", 2, "vessel")
    assert flipped.decision("scan_a", 2).decision == "rejected"
    assert flipped.decision("scan_a", 2).comment == "vessel"
    flipped.accept("scan_a", 1)  # empty comment keeps the old one
    assert flipped.decision("scan_a", 1).comment == "solid nodule"
    assert flipped.summary() == {"pending": 1, "accepted": 1, "rejected": 1, "total": 3}
    assert [r.decision for r in flipped.table()] == ["accepted", "rejected", "pending"]
    flipped.reset("scan_a", 2)
    assert flipped.decision("scan_a", 2).decision == "pending"
    with pytest.raises(KeyError):
        flipped.accept("scan_a", 9)
    with pytest.raises(KeyError):
        flipped.accept("nope", 1)


def test_export_contents_and_originals_untouched(tmp_path: Path) -> None:
    out, scans = write_scan_and_batch(tmp_path)
    (out / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,probability\n")
    s = ReviewSession.open(out, scans)
    before = tree_hashes(out)
    s.accept("scan_a", 1, comment='nodule, "solid"\nsecond line')
    s.reject("scan_a", 3, comment="vessel")
    jpath, cpath = s.export(tmp_path / "review" / "review.json", tmp_path / "review" / "review.csv", reviewer="AB")
    assert tree_hashes(out) == before
    assert cpath is not None
    doc = json.loads(jpath.read_text())
    assert doc["format"] == "medrpn-review" and doc["coordinate_system"] == "LPS" and doc["box_mode"] == "xyzxyz"
    assert "LPS" in doc["convention"] and "centre" in doc["convention"]
    assert doc["reviewer"] == "AB"
    assert doc["summary"] == {"pending": 1, "accepted": 1, "rejected": 1, "total": 3}
    _, originals = findings_from_json(out / "scan_a" / PROPOSALS_JSON)
    by_rank = {r["rank"]: r for r in doc["findings"]}
    for f in originals:
        rec = by_rank[f.rank]
        np.testing.assert_allclose(rec["box"], f.box, atol=1e-9)
        np.testing.assert_allclose(rec["centre"], f.centre, atol=1e-9)
        assert rec["score"] == f.score and rec["class_name"] == f.class_name
    assert by_rank[1]["decision"] == "accepted" and by_rank[1]["comment"].startswith('nodule, "solid"')
    assert by_rank[3]["decision"] == "rejected" and by_rank[2]["decision"] == "pending"
    assert doc["scans"][0]["proposals"] == "scan_a/proposals.json"
    with cpath.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == REVIEW_CSV_HEADER
    row1 = next(r for r in rows if r["rank"] == "1")
    assert row1["decision"] == "accepted" and row1["comment"] == 'nodule, "solid"\nsecond line'
    f1 = next(f for f in originals if f.rank == 1)
    np.testing.assert_allclose([float(row1[f"centre_{a}_lps_mm"]) for a in "xyz"], f1.centre, atol=1e-9)
    np.testing.assert_allclose(
        [float(row1[f"{a}_{m}_lps_mm"]) for m in ("min", "max") for a in "xyz"], f1.box, atol=1e-9
    )
    # only decided findings
    jpath2, _ = s.export(tmp_path / "review" / "decided.json", include_pending=False)
    assert {r["rank"] for r in json.loads(jpath2.read_text())["findings"]} == {1, 3}


def test_export_refuses_to_touch_batch_outputs_and_inputs(tmp_path: Path) -> None:
    out, scans = write_scan_and_batch(tmp_path)
    (out / "index.html").write_text("<html></html>")
    s = ReviewSession.open(out, scans)
    s.accept("scan_a", 1)
    before = tree_hashes(out)
    refused = [
        out / PROPOSALS_JSON,
        out / "scan_a" / PROPOSALS_JSON,
        out / "index.html",
        out / "review.json",  # inside the output folder, not in reviewed/
        out / "scan_a" / "review.json",
        out / REVIEW_SUBDIR / PROPOSALS_JSON,  # would be read back as a scan
        out / REVIEW_SUBDIR,  # a folder
        scans / "review.json",  # inside the inputs
    ]
    (out / REVIEW_SUBDIR).mkdir()
    for target in refused:
        with pytest.raises(ProtectedPathError):
            s.export(target)
    with pytest.raises(ProtectedPathError, match="different"):
        s.export(tmp_path / "x.json", tmp_path / "x.json")
    other = tmp_path / "notes.json"
    other.write_text('{"mine": true}')
    with pytest.raises(ProtectedPathError, match="not an earlier review export"):
        s.export(other)
    assert other.read_text() == '{"mine": true}'
    with pytest.raises(ProtectedPathError):  # a refused CSV means nothing is written, not even the JSON
        s.export(tmp_path / "ok.json", out / "candidates.csv")
    assert not (tmp_path / "ok.json").exists()
    assert tree_hashes(out) == before
    # the reviewed/ sub-folder and a re-export over an earlier export are fine
    s.export(out / REVIEW_SUBDIR / "review.json", out / REVIEW_SUBDIR / "review.csv")
    s.export(out / REVIEW_SUBDIR / "review.json", out / REVIEW_SUBDIR / "review.csv")
    s.export(tmp_path / "review.json")
    s.export(tmp_path / "review.json")
    big = tmp_path / "big.json"  # a large earlier export is recognised from its first bytes
    big.write_text('{\n  "format": "medrpn-review",\n  "pad": "' + "x" * 2_000_000 + '"\n}\n')
    s.export(big)
    assert json.loads(big.read_text())["findings"]
    assert {k: v for k, v in tree_hashes(out).items() if not k.startswith(REVIEW_SUBDIR)} == before
    # a session re-opened on the folder does not see the export as a scan
    assert ReviewSession.open(out, scans).scan_ids == ["scan_a"]


def test_load_decisions_resumes_a_review(tmp_path: Path) -> None:
    out, scans = write_scan_and_batch(tmp_path)
    s = ReviewSession.open(out, scans)
    s.accept("scan_a", 1, comment="yes")
    s.reject("scan_a", 2)
    path, _ = s.export(tmp_path / "r.json")
    resumed = ReviewSession.open(out, scans, decisions=path)
    assert resumed.decisions.keys() == s.decisions.keys()
    assert resumed.decision("scan_a", 1).comment == "yes"
    assert resumed.decision("scan_a", 2).decision == "rejected"
    # a rerun of inference that moved finding 1: its decision is not carried over
    doc = json.loads(path.read_text())
    doc["findings"][0]["box"][0] += 1.0
    (tmp_path / "moved.json").write_text(json.dumps(doc))
    fresh = ReviewSession.open(out, scans)
    assert fresh.load_decisions(tmp_path / "moved.json") == 1
    assert fresh.decision("scan_a", 1).decision == "pending"
    with pytest.raises(ValueError, match="medrpn-review"):
        fresh.load_decisions(out / "scan_a" / PROPOSALS_JSON)


# ----------------------------------------------------------------------------------------------- drawing


def test_draw_view_rectangles_threshold_and_selection(flipped: ReviewSession) -> None:
    sel = flipped.select("scan_a", 1)
    ax = _axes()
    d = draw_view(ax, flipped, "scan_a", "axial", sel.axial, "lung", 0.0)
    assert d.ranks == (1, 2) and len(_rects(ax)) == 2 and d.selected is None
    assert d.window == (-1350.0, 150.0)
    d = draw_view(ax, flipped, "scan_a", "axial", sel.axial, "lung", 0.7)
    assert d.ranks == (1,) and len(_rects(ax)) == 1
    d = draw_view(ax, flipped, "scan_a", "sagittal", None, "bone", 0.0, zoom_on=1)
    assert d.slice_index == sel.sagittal and d.ranks == (1,) and d.selected == 1
    h0, _, h1, _ = sel.zoom["sagittal"]
    assert ax.get_xlim() == (h0, h1)
    # the selected finding is drawn even below the threshold, highlighted
    d = draw_view(ax, flipped, "scan_a", "coronal", None, "lung", 0.5, highlight=3)
    assert d.ranks == (3,)
    (rect,) = _rects(ax)
    assert rect.get_linewidth() > 2.0
    # a slice with no finding, and the index clamped into the volume
    d = draw_view(ax, flipped, "scan_a", "axial", 10_000, "lung", 0.0)
    assert d.slice_index == SHAPE[2] - 1 and d.ranks == () and not _rects(ax)
    texts = {t.get_text() for t in ax.texts}
    assert {"R", "L", "A", "P"} <= texts
    with pytest.raises(ValueError, match="views"):
        draw_view(ax, flipped, "scan_a", "image")


def test_boxes_land_on_the_bright_cube(flipped: ReviewSession) -> None:
    """The rectangle drawn for a finding encloses exactly the bright voxels of the displayed slice."""
    sel = flipped.select("scan_a", 1)
    ax = _axes()
    draw_view(ax, flipped, "scan_a", "axial", sel.axial, "lung", 0.7)
    (rect,) = _rects(ax)
    img = ax.images[0]
    arr = np.asarray(img.get_array())
    left, right, bottom, top = img.get_extent()
    rows, cols = np.nonzero(arr > 0)  # bright cube pixels of finding 1 (finding 2 is outside this x range)
    cols_x = left + cols * (right - left) / arr.shape[1]
    rows_y = top + rows * (bottom - top) / arr.shape[0]  # origin "upper" for axial
    sel_x = cols_x < 20
    assert rect.get_x() == pytest.approx(cols_x[sel_x].min())
    assert rect.get_x() + rect.get_width() == pytest.approx(cols_x[sel_x].max() + 1)
    assert rect.get_y() == pytest.approx(rows_y[sel_x].min())
    assert rect.get_y() + rect.get_height() == pytest.approx(rows_y[sel_x].max() + 1)


def test_render_review_figure(flipped: ReviewSession) -> None:
    fig = render_review_figure(flipped, "scan_a", 1, window="soft tissue", zoom=False)
    axes = fig.axes[:3]
    assert [a.get_title().split()[0] for a in axes] == ["axial", "coronal", "sagittal"]
    assert [len(_rects(a)) for a in axes] == [2, 2, 1]
    table_ax = fig.axes[3]
    assert table_ax.tables and len(table_ax.tables[0].get_celld()) == 4 * 8  # header + 3 findings, 8 columns
    png = figure_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    fig = render_review_figure(flipped, "scan_a", None, min_score=0.95)  # nothing above the threshold
    assert all(not _rects(a) for a in fig.axes[:3])


def test_two_dimensional_scan(tmp_path: Path) -> None:
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])
    img = np.full((30, 20), 100.0, np.float32)
    img[5:10, 4:8] = 900.0
    (tmp_path / "scans").mkdir()
    nib.save(nib.Nifti1Image(img, affine), str(tmp_path / "scans" / "cr.nii.gz"))
    box = voxel_to_world(np.array([[4.5, 3.5], [9.5, 7.5]]), affine[np.ix_([0, 1, 3], [0, 1, 3])]).numpy()
    findings = make_findings(
        np.array([[*box.min(0), *box.max(0)]]),
        np.array([0.8]),
        np.array([0]),
        np.array([[1.0]]),
        np.array([0.8]),
        ["x"],
    )
    result = ScanResult("cr", "cr.nii.gz", "nifti", affine, (30, 20), findings, class_names=("x",))
    write_proposals_json(result, tmp_path / "out" / "cr")
    s = ReviewSession.open(tmp_path / "out", tmp_path / "scans")
    sel = s.select("cr", 1)
    assert dict(sel.slices) == {"image": -1}
    ax = _axes()
    d = draw_view(ax, s, "cr", "image", window=None)
    (rect,) = _rects(ax)
    assert d.ranks == (1,) and (rect.get_x(), rect.get_width()) == pytest.approx((5.0, 5.0))
    fig = render_review_figure(s, "cr", 1)
    assert len(fig.axes) >= 2
    jpath, cpath = s.export(tmp_path / "e.json", tmp_path / "e.csv")
    assert json.loads(jpath.read_text())["box_mode"] == "xyxy"
    assert cpath is not None
    row = next(csv.DictReader(cpath.open(newline="")))
    assert row["centre_z_lps_mm"] == "" and row["z_min_lps_mm"] == ""


# ----------------------------------------------------------------------------------------------- interactive parts


def test_controller(flipped: ReviewSession) -> None:
    c = ReviewController(flipped)
    assert c.current == ("scan_a", 1)
    assert c.indices == {"axial": 14, "coronal": 17, "sagittal": 10}
    assert c.set_slice("axial", -5) == 0
    c.set_window("bone")
    with pytest.raises(ValueError):
        c.set_window("nope")
    c.accept("ok")
    assert c.next() == ("scan_a", 2)
    c.reject()
    c.set_min_score(0.5)
    assert [o[1] for o in c.options()] == [("scan_a", 1), ("scan_a", 2)]
    assert c.next() is None
    assert "1 accepted, 1 rejected, 1 pending" in c.status()
    assert c.png()[:4] == b"\x89PNG"


class _Widget:
    """Minimal stand-in for an ipywidgets widget: attributes, ``observe`` on ``value``, ``on_click``."""

    _observers: list[Callable[[dict[str, Any]], None]]
    _clicks: list[Callable[[Any], None]]

    def __init__(self, *children: Any, **kw: Any) -> None:
        object.__setattr__(self, "_observers", [])
        object.__setattr__(self, "_clicks", [])
        self.children = list(children[0]) if children else []
        self.layout = types.SimpleNamespace(display=None)
        self.value: Any = None
        self.options: Any = ()
        for k, v in kw.items():
            setattr(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        old = getattr(self, name, None)
        object.__setattr__(self, name, value)
        if name == "value" and old != value:
            for handler in self._observers:
                handler({"name": "value", "old": old, "new": value})

    def observe(self, handler: Callable[[dict[str, Any]], None], names: str = "value") -> None:
        self._observers.append(handler)

    def on_click(self, handler: Callable[[Any], None]) -> None:
        self._clicks.append(handler)

    def click(self) -> None:
        for handler in self._clicks:
            handler(self)


def test_review_widget_with_stub_ipywidgets(flipped: ReviewSession, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = types.ModuleType("ipywidgets")
    for name in ("Dropdown", "FloatSlider", "IntSlider", "Text", "Button", "Image", "HTML", "VBox", "HBox"):
        setattr(stub, name, type(name, (_Widget,), {}))
    stub.Layout = lambda **kw: types.SimpleNamespace(display=None, **kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ipywidgets", stub)
    c = ReviewController(flipped)
    box = review_widget(c)
    finding, (threshold, window), sliders, image, comment, buttons, status = (
        box.children[0],
        box.children[1].children,
        box.children[2].children,
        box.children[3],
        box.children[4],
        box.children[5].children,
        box.children[6],
    )
    assert image.value[:4] == b"\x89PNG"
    accept, reject, _save, nxt = buttons
    comment.value = "round, 8 mm"
    accept.click()
    assert flipped.decision("scan_a", 1).decision == "accepted"
    assert flipped.decision("scan_a", 1).comment == "round, 8 mm"
    nxt.click()
    assert c.current == ("scan_a", 2)
    reject.click()
    assert flipped.decision("scan_a", 2).decision == "rejected"
    axial = sliders[0]
    axial.value = 3
    assert c.indices["axial"] == 3
    window.value = "auto"
    assert c.window is None
    threshold.value = 0.5
    assert len(finding.options) == 2
    finding.value = ("scan_a", 1)
    assert c.current == ("scan_a", 1) and c.indices["axial"] == 14
    assert sliders[3].layout.display == "none"  # the 2D slider is hidden for a volume
    assert "accepted" in status.value


def test_demo_batch(tmp_path: Path) -> None:
    demo = write_demo_batch(tmp_path, shape=(64, 64, 32))
    s = ReviewSession.open(demo.output_dir, demo.scan_root)
    assert s.scan_ids == [demo.scan_id]
    assert len(s.table()) == demo.num_lesions + 1
    assert s.image(demo.scan_id).array.shape == (64, 64, 32)
