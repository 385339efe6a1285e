"""Scoring results against LUNA16 annotations (``medrpn froc``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrpn.cli import main as medrpn_main
from medrpn.evaluation.froc import ScanCandidates, ScanLesions, compute_froc, drop_excluded
from medrpn.evaluation.luna16 import (
    EXCLUDED_DEFAULT_DIAMETER_MM,
    candidates_from_csv,
    candidates_from_results,
    evaluate_results,
    froc_main,
    read_annotations,
    read_scan_list,
)
from medrpn.inference.results import ScanResult, make_findings
from medrpn.overlays.tables import write_proposals_json

ANNOTATIONS = """seriesuid,coordX,coordY,coordZ,diameter_mm
s1,0.0,0.0,0.0,10.0
s1,50.0,0.0,0.0,4.0
s2,-20.0,30.0,-100.0,6.0
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _result(scan_id: str, centres: list[list[float]], scores: list[float]) -> ScanResult:
    c = np.asarray(centres, dtype=float).reshape(-1, 3)
    boxes = np.concatenate([c - 1.5, c + 1.5], axis=1)
    n = len(scores)
    findings = make_findings(
        boxes, np.asarray(scores), np.zeros(n, dtype=int), np.full((n, 3), 1 / 3), np.asarray(scores), ["a", "b", "c"]
    )
    return ScanResult(scan_id, f"/in/{scan_id}.nii.gz", "nifti", np.eye(4), (10, 10, 10), findings)


def test_read_annotations_groups_rows_by_scan(tmp_path: Path) -> None:
    ann = read_annotations(_write(tmp_path / "a.csv", ANNOTATIONS))
    assert sorted(ann) == ["s1", "s2"]
    np.testing.assert_allclose(ann["s1"].centres, [[0, 0, 0], [50, 0, 0]])
    np.testing.assert_allclose(ann["s1"].diameters, [10.0, 4.0])
    np.testing.assert_allclose(ann["s2"].centres, [[-20, 30, -100]])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seriesuid,coordX,coordY,diameter_mm\ns1,0,0,3\n", "missing column(s) ['coordZ']"),
        ("seriesuid,coordX,coordY,coordZ,diameter_mm\ns1,0,zero,0,3\n", "line 2: not a number"),
        ("seriesuid,coordX,coordY,coordZ,diameter_mm\ns1,0,0,0,3\ns1,0,0,nan,3\n", "line 3: non-finite"),
        ("seriesuid,coordX,coordY,coordZ,diameter_mm\ns1,0,0,0,0\n", "line 2: diameter_mm must be > 0"),
        ("seriesuid,coordX,coordY,coordZ,diameter_mm\n,0,0,0,3\n", "line 2: empty seriesuid"),
    ],
)
def test_read_annotations_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match=r"bad\.csv") as info:
        read_annotations(path)
    assert message in str(info.value)


def test_excluded_negative_diameter_is_ten_mm(tmp_path: Path) -> None:
    path = _write(tmp_path / "ex.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\ns1,1,2,3,-1\ns1,4,5,6,2.5\n")
    ex = read_annotations(path, excluded=True)
    np.testing.assert_allclose(ex["s1"].diameters, [EXCLUDED_DEFAULT_DIAMETER_MM, 2.5])
    with pytest.raises(ValueError, match="diameter_mm must be > 0"):
        read_annotations(path)


def test_read_scan_list(tmp_path: Path) -> None:
    assert read_scan_list(_write(tmp_path / "a.csv", "seriesuid\ns1\ns2\n\n")) == ["s1", "s2"]
    assert read_scan_list(_write(tmp_path / "b.csv", "s3\ns1\n")) == ["s3", "s1"]
    with pytest.raises(ValueError, match="listed twice"):
        read_scan_list(_write(tmp_path / "c.csv", "s1\ns1\n"))
    with pytest.raises(ValueError, match="no scan ids"):
        read_scan_list(_write(tmp_path / "d.csv", "seriesuid\n"))


def test_candidates_csv_round_trip_and_errors(tmp_path: Path) -> None:
    good = "seriesuid,coordX,coordY,coordZ,probability\ns1,0,0,0,0.9\ns1,5,5,5,0.2\ns2,1,1,1,0.5\n"
    cands = candidates_from_csv(_write(tmp_path / "c.csv", good))
    assert len(cands["s1"]) == 2 and len(cands["s2"]) == 1
    bad = "seriesuid,coordX,coordY,coordZ,probability\ns1,0,0,0,-0.1\n"
    with pytest.raises(ValueError, match="line 2: negative probability"):
        candidates_from_csv(_write(tmp_path / "bad.csv", bad))
    two_d = "seriesuid,coordX,coordY,coordZ,probability\ns1,0,0,,0.3\n"
    with pytest.raises(ValueError, match="line 2: not a number"):
        candidates_from_csv(_write(tmp_path / "2d.csv", two_d))


def test_hand_built_scores(tmp_path: Path) -> None:
    """s1: the 10 mm lesion hit at 0.9 (a second hit ignored), the 4 mm one missed by 2.5 mm; one FP at 0.8.

    s2: its lesion hit at 0.6. s3 (listed, no results, no lesions) only adds to the scan count.
    """
    ann = read_annotations(_write(tmp_path / "a.csv", ANNOTATIONS))
    cands = {
        "s1": ScanCandidates(
            "s1", np.array([[1.0, 1, 1], [2.0, 0, 0], [52.5, 0, 0], [0, 90, 0]]), np.array([0.9, 0.7, 0.5, 0.8])
        ),
        "s2": ScanCandidates("s2", np.array([[-20.0, 32, -100]]), np.array([0.6])),
    }
    rep = evaluate_results(cands, ann, ["s1", "s2", "s3"], resamples=50)
    f = rep.froc
    assert (f.num_scans, f.num_lesions, f.num_candidates) == (3, 3, 5)
    # thresholds: 0.9 -> 1/3 lesions, 0 FP; 0.8 -> 1/3, 1 FP (1/3 per scan); 0.6 -> 2/3, 1 FP; 0.5 -> 2/3, 2 FP.
    assert f.sensitivity_at(0.125) == pytest.approx(1 / 3)
    assert f.sensitivity_at(1.0) == pytest.approx(2 / 3)
    assert f.max_sensitivity == pytest.approx(2 / 3)
    assert rep.scans_without_results == ("s3",)
    bands = {b.label: b for b in rep.bands}
    assert bands["< 5"].num_lesions == 1 and bands["< 5"].froc is not None and bands["< 5"].froc.cpm == 0.0
    assert bands["5-10"].num_lesions == 1 and bands[">= 10"].num_lesions == 1
    assert "| **CPM** |" in rep.markdown() and json.loads(json.dumps(rep.as_dict()))["num_scans"] == 3


def test_listed_scans_change_the_false_positive_rate(tmp_path: Path) -> None:
    ann = read_annotations(_write(tmp_path / "a.csv", ANNOTATIONS))
    cands = {"s1": ScanCandidates("s1", np.array([[0, 90.0, 0], [0.0, 0, 0]]), np.array([0.9, 0.5]))}
    two = evaluate_results(cands, ann, ["s1", "s2"], resamples=20).froc
    four = evaluate_results(cands, ann, ["s1", "s2", "x", "y"], resamples=20).froc
    # one FP above the hit: 1/2 FP per scan over 2 scans, 1/4 over 4 scans
    assert two.sensitivity_at(0.25) < four.sensitivity_at(0.25)


def test_id_mismatch_is_an_error_not_a_zero(tmp_path: Path) -> None:
    ann = read_annotations(_write(tmp_path / "a.csv", ANNOTATIONS))
    cands = {"case_000": ScanCandidates("case_000", np.zeros((1, 3)), np.array([0.5]))}
    with pytest.raises(ValueError, match=r"none for the 1 scored scans.*file stem"):
        evaluate_results(cands, ann, ["s1"])
    with pytest.raises(ValueError, match="no annotated lesion in the 1 scored scans"):
        evaluate_results(cands, ann, ["case_000"])


def test_annotations_and_results_of_unscored_scans_are_ignored(tmp_path: Path) -> None:
    ann = read_annotations(_write(tmp_path / "a.csv", ANNOTATIONS))
    rep = evaluate_results({}, ann, ["s2"], resamples=20)
    assert rep.froc.num_lesions == 1 and rep.ignored_annotation_scans == ("s1",)
    # an output folder holding the same scans as DICOM (scored) and as NIfTI (file stems, not in the list)
    cands = {
        "s2": ScanCandidates("s2", np.array([[-20.0, 30, -100]]), np.array([0.7])),
        "case_001": ScanCandidates("case_001", np.array([[-20.0, 30, -100]]), np.array([0.7])),
    }
    rep = evaluate_results(cands, ann, ["s2"], resamples=20)
    assert rep.ignored_result_scans == ("case_001",) and rep.froc.num_candidates == 1 and rep.froc.cpm == 1.0


def test_excluded_findings_are_neither_hits_nor_false_positives() -> None:
    les = {"s1": ScanLesions("s1", np.array([[0.0, 0, 0]]), np.array([4.0]))}
    ex = {"s1": ScanLesions("s1", np.array([[30.0, 0, 0]]), np.array([10.0]))}
    cands = {"s1": ScanCandidates("s1", np.array([[31.0, 0, 0], [0.5, 0, 0]]), np.array([0.9, 0.4]))}
    with_ex = evaluate_results(cands, les, ["s1"], excluded=ex, resamples=20)
    without = evaluate_results(cands, les, ["s1"], resamples=20)
    assert with_ex.froc.sensitivity_at(0.125) == 1.0  # the 0.9 candidate is ignored, not an FP
    assert without.froc.sensitivity_at(0.125) < 1.0
    assert with_ex.interval.cpm == with_ex.froc.cpm


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-20, 20), st.floats(-20, 20), st.floats(0, 1)), min_size=0, max_size=12),
    st.lists(st.tuples(st.floats(-20, 20), st.floats(1, 12)), min_size=1, max_size=3),
    st.lists(st.tuples(st.floats(-20, 20), st.floats(1, 12)), min_size=0, max_size=3),
)
def test_drop_excluded_matches_the_excluded_rule(
    cands: list[tuple[float, float, float]],
    lesions: list[tuple[float, float]],
    excluded: list[tuple[float, float]],
) -> None:
    """Dropping candidates that hit only excluded findings scores exactly as ``compute_froc(excluded=...)``."""
    c = ScanCandidates(
        "s", np.array([[x, y, 0.0] for x, y, _ in cands]).reshape(-1, 3), np.array([s for *_, s in cands])
    )
    les = ScanLesions("s", np.array([[x, 0.0, 0.0] for x, _ in lesions]), np.array([d for _, d in lesions]))
    ex = ScanLesions(
        "s", np.array([[x, 1.0, 0.0] for x, _ in excluded]).reshape(-1, 3), np.array([d for _, d in excluded])
    )
    a = compute_froc([c], [les], excluded=[ex])
    b = compute_froc([drop_excluded(c, les, ex)], [les])
    assert a.cpm == pytest.approx(b.cpm)
    np.testing.assert_allclose(a.sensitivities, b.sensitivities)


def _results_folder(root: Path) -> Path:
    out = root / "review"
    write_proposals_json(_result("s1", [[1, 1, 1], [0, 90, 0]], [0.9, 0.8]), out / "s1")
    write_proposals_json(_result("s2", [], []), out / "s2")  # finished, no findings
    return out


def test_candidates_from_results_keeps_scans_without_findings(tmp_path: Path) -> None:
    ids, cands = candidates_from_results(_results_folder(tmp_path))
    assert ids == ["s1", "s2"] and len(cands["s1"]) == 2 and len(cands["s2"]) == 0
    np.testing.assert_allclose(cands["s1"].centres[0], [1, 1, 1])
    with pytest.raises(ValueError, match=r"no proposals\.json"):
        candidates_from_results(tmp_path / "empty")


def test_medrpn_froc_command_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann = _write(tmp_path / "annotations.csv", ANNOTATIONS)
    out = tmp_path / "froc"
    assert medrpn_main(["froc", str(_results_folder(tmp_path)), "--annotations", str(ann), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 scans, 3 lesions, 2 candidates" in printed  # s2 finished without findings: its lesion is missed
    doc = json.loads((out / "froc.json").read_text())
    assert doc["num_scans"] == 2 and doc["scan_ids"] == ["s1", "s2"]
    assert doc["sensitivity"]["0.125"] == pytest.approx(1 / 3)  # the 10 mm lesion, before the 0.8 FP
    assert (out / "froc.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "froc.md").read_text().startswith("# FROC")


def test_medrpn_froc_command_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann = _write(tmp_path / "annotations.csv", "seriesuid,coordX\n")
    assert froc_main([str(tmp_path / "missing"), "--annotations", str(ann)]) == 2
    err = capsys.readouterr().err
    assert "annotations.csv" in err and "missing column(s)" in err
    good = _write(tmp_path / "good.csv", ANNOTATIONS)
    assert froc_main([str(tmp_path / "missing"), "--annotations", str(good)]) == 2
    assert "no such folder or file" in capsys.readouterr().err
