"""proposals.json, candidates.csv and failures.csv writers (plus the hand-built results the overlay tests share)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from medrpn.geometry import image_to_world_boxes, voxel_to_world
from medrpn.inference.results import ScanResult, findings_from_json, make_findings
from medrpn.overlays.tables import (
    CANDIDATES_HEADER,
    Candidate,
    collect_candidates,
    collect_proposals,
    read_candidates_csv,
    read_failures_csv,
    write_candidates_csv,
    write_failures_csv,
    write_proposals_json,
)

# ---------------------------------------------------------------------------------------------------------------
# hand-built results: world boxes derived from known inclusive voxel ranges

SHAPE_3D = (48, 40, 14)
# LPS affine: anisotropic (0.7, 0.9, 2.5) mm, array axis 1 runs towards anterior (flipped w.r.t. LPS +y)
AFFINE_LPS_3D = np.array(
    [[0.7, 0.0, 0.0, -120.0], [0.0, -0.9, 0.0, 80.0], [0.0, 0.0, 2.5, -40.0], [0.0, 0.0, 0.0, 1.0]]
)
AFFINE_RAS_3D = np.diag([-1.0, -1.0, 1.0, 1.0]) @ AFFINE_LPS_3D
# inclusive (first, last) voxel ranges per axis, scores, labels
RANGES_3D = [((10, 17), (12, 19), (4, 8)), ((15, 24), (16, 25), (6, 9)), ((35, 36), (5, 6), (11, 11))]
SCORES_3D = [0.93, 0.71, 0.40]
LABELS_3D = [0, 1, 2]

SHAPE_2D = (64, 56)
AFFINE_LPS_2D = np.array([[0.6, 0.0, -50.0], [0.0, 0.6, -30.0], [0.0, 0.0, 1.0]])
AFFINE_RAS_2D = np.diag([-1.0, -1.0, 1.0]) @ AFFINE_LPS_2D
RANGES_2D = [((5, 14), (20, 29)), ((40, 50), (3, 8))]
SCORES_2D = [0.55, 0.82]  # deliberately not sorted: rank 1 is the second box
LABELS_2D = [1, 0]


def world_boxes(ranges: list, affine_ras: np.ndarray) -> np.ndarray:
    """World LPS boxes whose voxel-edge extent is exactly the given inclusive voxel ranges."""
    edges = np.array([[r[0] for r in rr] + [r[1] + 1 for r in rr] for rr in ranges], dtype=float)
    return image_to_world_boxes(edges, affine_ras).numpy()


def voxel_centre_world(rr: tuple, affine_ras: np.ndarray) -> np.ndarray:
    """LPS centre of an inclusive voxel range (independent of the box maths)."""
    idx = np.array([[(a + b) / 2 for a, b in rr]])
    return voxel_to_world(idx, affine_ras).numpy()[0]


def _result(scan_id, ranges, scores, labels, affine, shape, objectness_map=None) -> ScanResult:
    n = len(ranges)
    probs = np.full((n, 3), 0.1)
    for i, lab in enumerate(labels):
        probs[i, lab] = scores[i]
    findings = make_findings(
        world_boxes(ranges, affine),
        np.array(scores),
        np.array(labels),
        probs,
        np.linspace(0.9, 0.5, n),
        ("solid", "ground-glass", "part-solid"),
    )
    return ScanResult(
        scan_id=scan_id,
        source=f"inputs/{scan_id}.nii.gz",
        source_format="nifti",
        affine_ras=affine,
        spatial_shape=shape,
        findings=findings,
        objectness_map=objectness_map,
    )


def make_result_3d(scan_id: str = "scan3d", with_heatmap: bool = True) -> ScanResult:
    """3D result: 3 findings on an anisotropic grid with a flipped axis; ranks follow the scores."""
    heat = np.linspace(0, 1, int(np.prod(SHAPE_3D)), dtype=np.float32).reshape(SHAPE_3D) if with_heatmap else None
    return _result(scan_id, RANGES_3D, SCORES_3D, LABELS_3D, AFFINE_RAS_3D, SHAPE_3D, heat)


def make_result_2d(scan_id: str = "image2d") -> ScanResult:
    """2D result: 2 findings, the second box ranked first."""
    return _result(scan_id, RANGES_2D, SCORES_2D, LABELS_2D, AFFINE_RAS_2D, SHAPE_2D)


def ranges_by_rank(ranges: list, scores: list) -> dict[int, tuple]:
    """Voxel ranges keyed by the rank make_findings gives them."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    return {rank: ranges[i] for rank, i in enumerate(order, start=1)}


# ---------------------------------------------------------------------------------------------------------------


def test_proposals_json_round_trips(tmp_path: Path) -> None:
    for res in (make_result_3d(), make_result_2d()):
        path = write_proposals_json(res, tmp_path / res.scan_id)
        assert path == tmp_path / res.scan_id / "proposals.json"
        doc, findings = findings_from_json(path)
        assert findings == res.findings
        assert doc["scan_id"] == res.scan_id
        assert doc["coordinate_system"] == "LPS"
        assert np.allclose(doc["affine_ras"], res.affine_ras)
        assert path.read_text().startswith("{\n  ")  # pretty
        assert [p.name for p in path.parent.iterdir()] == ["proposals.json"]  # no temp files left


def test_candidates_csv_header_and_centres(tmp_path: Path) -> None:
    r3, r2 = make_result_3d(), make_result_2d()
    path = write_candidates_csv([r3, r2], tmp_path / "candidates.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "seriesuid,coordX,coordY,coordZ,probability"
    assert tuple(lines[0].split(",")) == CANDIDATES_HEADER
    rows = read_candidates_csv(path)
    assert len(rows) == 5
    by_rank3 = ranges_by_rank(RANGES_3D, SCORES_3D)
    for row, f in zip(rows[:3], r3.findings):
        assert row.seriesuid == "scan3d"
        expected = voxel_centre_world(by_rank3[f.rank], AFFINE_RAS_3D)
        assert np.allclose([row.coord_x, row.coord_y, row.coord_z], expected)
        assert row.probability == f.score
    assert [r.probability for r in rows[:3]] == sorted(SCORES_3D, reverse=True)
    by_rank2 = ranges_by_rank(RANGES_2D, SCORES_2D)
    for row, f in zip(rows[3:], r2.findings):
        assert row.coord_z is None
        assert np.allclose([row.coord_x, row.coord_y], voxel_centre_world(by_rank2[f.rank], AFFINE_RAS_2D))
    # rows may be mixed with results
    extra = Candidate("x", 1.0, 2.0, 3.0, 0.5)
    rows2 = read_candidates_csv(write_candidates_csv([extra, r2], tmp_path / "c2.csv"))
    assert rows2[0] == extra and len(rows2) == 3


def test_collect_candidates_reads_every_proposals_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "out"
    write_proposals_json(make_result_3d("a"), root / "a")
    write_proposals_json(make_result_2d("b"), root / "nested" / "b")
    (root / "broken").mkdir()
    (root / "broken" / "proposals.json").write_text("{not json")
    (root / "empty").mkdir()
    empty = make_result_3d("e")
    empty.findings = []
    write_proposals_json(empty, root / "empty")
    with caplog.at_level(logging.WARNING):
        rows = collect_candidates(root)
    assert "broken" in caplog.text
    assert [r.seriesuid for r in rows] == ["a"] * 3 + ["b"] * 2
    assert len(collect_proposals(root)) == 3  # a, empty, nested/b
    assert collect_candidates(tmp_path / "missing") == []
    # the candidates file rebuilt from disk equals the one written from the results
    p1 = write_candidates_csv(rows, tmp_path / "from_disk.csv")
    p2 = write_candidates_csv([make_result_3d("a"), make_result_2d("b")], tmp_path / "from_results.csv")
    assert p1.read_text() == p2.read_text()


def test_failures_csv_round_trip(tmp_path: Path) -> None:
    failures = [("in/a b,c.nii.gz", 'corrupt: "bad" header\nsecond line'), ("in/x", "no pixel data")]
    path = write_failures_csv(failures, tmp_path / "failures.csv")
    assert path.read_text().splitlines()[0] == "source,reason"
    assert read_failures_csv(path) == failures
    assert write_failures_csv([], tmp_path / "none.csv").read_text() == "source,reason\n"
    assert read_failures_csv(tmp_path / "missing.csv") == []


def test_interrupted_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = make_result_3d()
    out = tmp_path / "scan"
    real_write_bytes = Path.write_bytes

    def half_then_crash(self: Path, data: bytes) -> int:
        real_write_bytes(self, data[: len(data) // 2])
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(Path, "write_bytes", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        write_proposals_json(res, out)
    with pytest.raises(KeyboardInterrupt):
        write_candidates_csv([res], out / "candidates.csv")
    assert list(out.iterdir()) == []  # neither final files nor temporaries
    monkeypatch.undo()

    # an existing file survives a failed rewrite untouched
    path = write_proposals_json(res, out)
    before = path.read_text()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    res.findings = res.findings[:1]
    with pytest.raises(OSError):
        write_proposals_json(res, out)
    assert path.read_text() == before
    assert [p.name for p in out.iterdir()] == ["proposals.json"]
