"""FROC / CPM under the LUNA16 hit rule, and the FROC plot."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from medrpn.evaluation.froc import (
    LUNA16_FP_RATES,
    FROCResult,
    ScanCandidates,
    ScanLesions,
    bootstrap_cpm,
    compute_froc,
    froc_by_diameter,
    lesion_diameters_from_boxes,
)
from medrpn.evaluation.plots import plot_froc

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _c(scan_id: str, centres: list[list[float]], scores: list[float]) -> ScanCandidates:
    return ScanCandidates(scan_id, np.asarray(centres, dtype=float).reshape(-1, 3), np.asarray(scores, dtype=float))


def _l(scan_id: str, centres: list[list[float]], diameters: list[float]) -> ScanLesions:
    return ScanLesions(scan_id, np.asarray(centres, dtype=float).reshape(-1, 3), np.asarray(diameters, dtype=float))


def _hand_case() -> tuple[list[ScanCandidates], list[ScanLesions]]:
    """3 scans, 3 lesions.

    Scan A: L1 at the origin (d=10, r=5), L2 at x=50 (d=6, r=3).
      0.9 at (3, 4, 0): distance 5 == r of L1 -> hit (boundary);
      0.6 at (1, 0, 0): second hit on L1 -> ignored, not an FP;
      0.7 at (53.01, 0, 0): 3.01 > 3 from L2 -> FP (just outside);
      0.3 far away -> FP.
    Scan B: L3 at the origin (d=8); 0.7 at (0, 0, 2) -> hit.
    Scan C: no lesion; 0.5 -> FP.

    Lesion scores: L1 0.9, L2 missed, L3 0.7. FP scores: 0.7, 0.5, 0.3 over 3 scans.
    Curve (t: fps, sens): inf (0, 0); 0.9 (0, 1/3); 0.7 (1/3, 2/3); 0.6 (1/3, 2/3); 0.5 (2/3, 2/3); 0.3 (1, 2/3).
    At 1/8: 1/3 + (1/8)/(1/3) * 1/3 = 11/24; at 1/4: 7/12; from 1/2 on: 2/3 (curve ends at 1 FP/scan).
    CPM = (11/24 + 14/24 + 5 * 16/24) / 7 = 0.625.
    """
    cands = [
        _c("A", [[3, 4, 0], [1, 0, 0], [53.01, 0, 0], [20, 20, 20]], [0.9, 0.6, 0.7, 0.3]),
        _c("B", [[0, 0, 2]], [0.7]),
        _c("C", [[0, 0, 0]], [0.5]),
    ]
    lesions = [_l("A", [[0, 0, 0], [50, 0, 0]], [10, 6]), _l("B", [[0, 0, 0]], [8]), _l("C", [], [])]
    return cands, lesions


def test_hand_case_exact_sensitivities_and_cpm() -> None:
    cands, lesions = _hand_case()
    res = compute_froc(cands, lesions)
    assert isinstance(res, FROCResult)
    np.testing.assert_allclose(res.fp_rates, LUNA16_FP_RATES)
    np.testing.assert_allclose(res.sensitivities, [11 / 24, 7 / 12, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert res.cpm == pytest.approx(0.625)
    np.testing.assert_allclose(res.thresholds, [np.inf, 0.9, 0.7, 0.6, 0.5, 0.3])
    np.testing.assert_allclose(res.fps_per_scan, [0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(res.sensitivity, [0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert (res.num_scans, res.num_lesions, res.num_candidates) == (3, 3, 6)
    assert res.max_sensitivity == pytest.approx(2 / 3)
    assert res.sensitivity_at(1 / 6) == pytest.approx(1 / 3 + 0.5 / 3)
    # scans are paired by id, not by position
    res2 = compute_froc(cands[::-1], lesions[1:] + lesions[:1])
    np.testing.assert_allclose(res2.sensitivities, res.sensitivities)


def test_boundary_is_hit_and_just_outside_is_fp() -> None:
    lesions = [_l("s", [[10, 10, 10]], [8])]
    on = compute_froc([_c("s", [[14, 10, 10]], [0.5])], lesions)  # distance == radius 4
    assert on.sensitivities.tolist() == [1.0] * 7
    assert on.fps_per_scan[-1] == 0.0
    out = compute_froc([_c("s", [[14.001, 10, 10]], [0.5])], lesions)
    assert out.sensitivities.tolist() == [0.0] * 7
    assert out.fps_per_scan[-1] == 1.0
    assert out.cpm == 0.0


def test_duplicate_hits_are_not_false_positives() -> None:
    res = compute_froc([_c("s", [[0, 0, 0], [1, 0, 0], [0, 2, 0]], [0.2, 0.9, 0.5])], [_l("s", [[0, 0, 0]], [6])])
    assert np.all(res.fps_per_scan == 0)
    assert res.cpm == 1.0
    # detected at the highest hitting score: accepted from threshold 0.9 on
    assert res.sensitivity[res.thresholds == 0.9][0] == 1.0


def test_one_candidate_hitting_two_lesions_credits_both() -> None:
    res = compute_froc([_c("s", [[0, 0, 0]], [0.8])], [_l("s", [[-2, 0, 0], [2, 0, 0]], [5, 5])])
    assert res.sensitivities.tolist() == [1.0] * 7
    assert res.fps_per_scan[-1] == 0.0


def test_scans_without_candidates_and_without_lesions_count() -> None:
    # one FP in scan "a"; scan "b" has a lesion and no candidate; scan "c" has nothing
    cands = [_c("a", [[0, 0, 0], [100, 0, 0]], [0.9, 0.4]), _c("b", [], []), _c("c", [], [])]
    lesions = [_l("a", [[0, 0, 0]], [4]), _l("b", [[0, 0, 0]], [4]), _l("c", [], [])]
    res = compute_froc(cands, lesions)
    assert res.num_scans == 3
    assert res.num_lesions == 2
    np.testing.assert_allclose(res.fps_per_scan, [0, 0, 1 / 3])
    np.testing.assert_allclose(res.sensitivity, [0, 0.5, 0.5])
    assert res.cpm == pytest.approx(0.5)


def test_custom_fp_rates_and_table() -> None:
    cands, lesions = _hand_case()
    res = compute_froc(cands, lesions, fp_rates=(0.125, 1.0))
    np.testing.assert_allclose(res.sensitivities, [11 / 24, 2 / 3])
    assert res.cpm == pytest.approx((11 / 24 + 2 / 3) / 2)
    table = res.table()
    assert table.splitlines()[0] == "| FP/scan | Sensitivity |"
    assert "| 0.125 | 0.458 |" in table
    assert "| 1 | 0.667 |" in table
    assert table.splitlines()[-1] == "| **CPM** | **0.562** |"
    assert res.as_dict()["sensitivity@0.125"] == pytest.approx(11 / 24)


def test_from_boxes_centres_diameter_rule_and_torch() -> None:
    boxes = np.array([[0, 0, 0, 10, 6, 20], [10, 10, 10, 14, 18, 11]], dtype=float)
    les = ScanLesions.from_boxes("s", torch.as_tensor(boxes))
    np.testing.assert_allclose(les.centres, [[5.0, 3.0, 10.0], [12.0, 14.0, 10.5]])
    np.testing.assert_allclose(les.diameters, [10, 8])  # largest extent over x and y, z ignored
    np.testing.assert_allclose(lesion_diameters_from_boxes(boxes, "max"), [20, 8])
    np.testing.assert_allclose(lesion_diameters_from_boxes(boxes, "mean"), [12.0, 13 / 3])
    cand = ScanCandidates.from_boxes("s", torch.tensor([[4.0, 2, 9, 6, 4, 11]]), torch.tensor([0.7]))
    np.testing.assert_allclose(cand.centres, [[5, 3, 10]])
    assert len(cand) == 1 and len(les) == 2
    assert compute_froc([cand], [les]).max_sensitivity == 0.5


def test_two_dimensional() -> None:
    cand = ScanCandidates.from_boxes("s", np.array([[0, 0, 4, 4], [50, 50, 52, 52]]), np.array([0.9, 0.8]))
    les = ScanLesions.from_boxes("s", np.array([[0, 0, 6, 6]]))
    res = compute_froc([cand], [les])
    np.testing.assert_allclose(res.sensitivity, [0, 1, 1])
    np.testing.assert_allclose(res.fps_per_scan, [0, 0, 1])


def test_frozen_and_read_only() -> None:
    cand = _c("s", [[0, 0, 0]], [0.5])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cand.scan_id = "t"  # type: ignore[misc]
    with pytest.raises(ValueError):
        cand.scores[0] = 1.0


@pytest.mark.parametrize(
    ("cands", "lesions", "match"),
    [
        ([_c("a", [], [])], [_l("b", [[0, 0, 0]], [5])], "scan ids differ"),
        ([_c("a", [], []), _c("a", [], [])], [_l("a", [[0, 0, 0]], [5])], "duplicate scan id"),
        ([_c("a", [], [])], [_l("a", [[0, 0, 0]], [5]), _l("a", [], [])], "duplicate scan id"),
        ([_c("a", [[0, 0, 0]], [0.5])], [_l("a", [], [])], "no lesions"),
        ([], [], "no scans"),
    ],
)
def test_validation_of_sets(cands: list[ScanCandidates], lesions: list[ScanLesions], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_froc(cands, lesions)


def test_validation_of_values() -> None:
    with pytest.raises(ValueError, match="NaN"):
        _c("a", [[0, 0, 0]], [float("nan")])
    with pytest.raises(ValueError, match="negative"):
        _c("a", [[0, 0, 0]], [-0.1])
    with pytest.raises(ValueError, match="NaN"):
        _c("a", [[0, np.inf, 0]], [0.1])
    with pytest.raises(ValueError, match="scores"):
        _c("a", [[0, 0, 0]], [0.1, 0.2])
    with pytest.raises(ValueError, match="diameters"):
        _l("a", [[0, 0, 0]], [0.0])
    with pytest.raises(ValueError, match="StandardMode"):
        ScanLesions.from_boxes("a", np.array([[5, 0, 0, 0, 1, 1]]))
    cands, lesions = _hand_case()
    with pytest.raises(ValueError, match="fp_rates"):
        compute_froc(cands, lesions, fp_rates=(0.0, 1.0))
    with pytest.raises(ValueError, match="2D"):
        compute_froc([ScanCandidates("a", np.zeros((1, 2)), np.ones(1))], [_l("a", [[0, 0, 0]], [5])])


def test_plot_froc_writes_png(tmp_path: Path) -> None:
    res = compute_froc(*_hand_case())
    target = tmp_path / "sub" / "froc.png"
    out = plot_froc(res, target, title="hand case")
    assert out == target
    data = target.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000
    # overwrite in place, no temporary file left behind
    plot_froc(res, target)
    assert [p.name for p in target.parent.iterdir()] == ["froc.png"]


# ----------------------------------------------------------------------------------------------- properties


def _brute_force(cands: list[ScanCandidates], lesions: list[ScanLesions], rates: tuple[float, ...]) -> np.ndarray:
    """Independent re-implementation: threshold loop + LUNA16's ``np.interp`` on the FROC curve."""
    les_by_id = {x.scan_id: x for x in lesions}
    n_les = sum(len(x) for x in lesions)
    scores = np.unique(np.concatenate([c.scores for c in cands]))[::-1]
    fps, sens = [0.0], [0.0]
    for t in scores:
        n_det = n_fp = 0
        for c in cands:
            les = les_by_id[c.scan_id]
            acc = c.centres[c.scores >= t]
            d = np.linalg.norm(acc[:, None, :] - les.centres[None, :, :], axis=-1).reshape(len(acc), len(les))
            hit = d <= les.diameters / 2 + 1e-6
            n_det += int(hit.any(axis=0).sum())
            n_fp += int((~hit.any(axis=1)).sum())
        fps.append(n_fp / len(cands))
        sens.append(n_det / n_les)
    return np.interp(rates, fps, sens)


_coord = st.integers(0, 12).map(float)
_point = st.lists(_coord, min_size=3, max_size=3)
_score = st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.8, 0.9])


@st.composite
def _scans(draw: st.DrawFn) -> tuple[list[ScanCandidates], list[ScanLesions]]:
    n = draw(st.integers(1, 4))
    cands, lesions = [], []
    for i in range(n):
        les_pts = draw(st.lists(_point, max_size=3))
        diam = draw(st.lists(st.sampled_from([2.0, 4.0, 6.0]), min_size=len(les_pts), max_size=len(les_pts)))
        c_pts = draw(st.lists(_point, max_size=5))
        sc = draw(st.lists(_score, min_size=len(c_pts), max_size=len(c_pts)))
        cands.append(_c(f"s{i}", c_pts, sc))
        lesions.append(_l(f"s{i}", les_pts, diam))
    assume(sum(len(x) for x in lesions) > 0)
    assume(sum(len(x) for x in cands) > 0)
    return cands, lesions


_settings = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@_settings
@given(_scans())
def test_property_cpm_in_unit_interval_and_matches_luna16_interp(
    scans: tuple[list[ScanCandidates], list[ScanLesions]],
) -> None:
    cands, lesions = scans
    res = compute_froc(cands, lesions)
    assert 0.0 <= res.cpm <= 1.0
    assert np.all(np.diff(res.fps_per_scan) >= 0) and np.all(np.diff(res.sensitivity) >= 0)
    np.testing.assert_allclose(res.sensitivities, _brute_force(cands, lesions, LUNA16_FP_RATES), atol=1e-12)


@_settings
@given(_scans(), st.data())
def test_property_adding_top_scoring_true_positive_never_lowers_sensitivity(
    scans: tuple[list[ScanCandidates], list[ScanLesions]], data: st.DataObject
) -> None:
    cands, lesions = scans
    before = compute_froc(cands, lesions)
    with_lesion = [i for i, x in enumerate(lesions) if len(x)]
    i = data.draw(st.sampled_from(with_lesion))
    m = data.draw(st.integers(0, len(lesions[i]) - 1))
    top = max(float(c.scores.max()) for c in cands if len(c)) + data.draw(st.sampled_from([0.0, 0.05]))
    c = cands[i]
    new = ScanCandidates(
        c.scan_id,
        np.concatenate([c.centres.reshape(-1, 3), lesions[i].centres[m : m + 1]]),
        np.concatenate([c.scores, [top]]),
    )
    after = compute_froc([*cands[:i], new, *cands[i + 1 :]], lesions)
    assert np.all(after.sensitivities >= before.sensitivities - 1e-12)
    assert after.cpm >= before.cpm - 1e-12


# ----------------------------------------------------------------------------------------------------------------
# Excluded lesions, diameter bands, bootstrap interval
# ----------------------------------------------------------------------------------------------------------------
def test_excluded_lesion_hit_is_neither_true_nor_false_positive() -> None:
    """Scan A: counted lesion at 0 (d=10), excluded lesion at x=50 (d=6).

    0.9 hits the counted lesion; 0.8 hits only the excluded one (ignored); 0.4 hits nothing (FP).
    Without the exclusion 0.8 would be an FP ranked above nothing else.
    """
    cands = [_c("A", [[1, 0, 0], [50, 1, 0], [20, 20, 20]], [0.9, 0.8, 0.4])]
    lesions = [_l("A", [[0, 0, 0]], [10])]
    excluded = [_l("A", [[50, 0, 0]], [6])]
    with_exc = compute_froc(cands, lesions, excluded=excluded)
    without = compute_froc(cands, lesions)
    assert with_exc.fps_per_scan[-1] == 1.0  # only the 0.4 candidate
    assert without.fps_per_scan[-1] == 2.0
    assert with_exc.num_lesions == 1 and with_exc.max_sensitivity == 1.0


def test_candidate_hitting_counted_and_excluded_lesion_is_a_hit() -> None:
    cands = [_c("A", [[3, 0, 0]], [0.7])]
    froc = compute_froc(cands, [_l("A", [[0, 0, 0]], [8])], excluded=[_l("A", [[6, 0, 0]], [8])])
    assert froc.max_sensitivity == 1.0 and froc.fps_per_scan[-1] == 0.0


def test_excluded_lesions_of_an_unknown_scan_are_rejected() -> None:
    cands, lesions = _hand_case()
    with pytest.raises(ValueError, match="unknown scans"):
        compute_froc(cands, lesions, excluded=[_l("Z", [[0, 0, 0]], [5])])


def test_froc_by_diameter_hand_case() -> None:
    """Scan A: a 4 mm lesion at 0 and a 12 mm lesion at x=40; scan B: nothing.

    Candidates: 0.95 on the 12 mm lesion, 0.6 on the 4 mm lesion, 0.8 FP in B.
    Band < 5: the 0.95 hit is ignored (not an FP), the small lesion comes after the 0.8 FP:
    sensitivity 0 up to 1/2 FP/scan, 1 from then on -> at 1/8, 1/4: 0; at 1/2: 1 (vertical step, upper end).
    Band >= 10: the 12 mm lesion is found at 0.95 before any FP -> sensitivity 1 everywhere.
    Band 5-10: empty.
    """
    cands = [_c("A", [[40, 0, 0], [0.5, 0, 0]], [0.95, 0.6]), _c("B", [[0, 0, 0]], [0.8])]
    lesions = [_l("A", [[0, 0, 0], [40, 0, 0]], [4, 12]), _l("B", [], [])]
    small, mid, large = froc_by_diameter(cands, lesions, edges=(0, 5, 10, math.inf))
    assert (small.label, mid.label, large.label) == ("< 5", "5-10", ">= 10")
    assert (small.num_lesions, mid.num_lesions, large.num_lesions) == (1, 0, 1)
    assert mid.froc is None
    assert small.froc is not None and large.froc is not None
    np.testing.assert_allclose(small.froc.sensitivities, [0, 0, 1, 1, 1, 1, 1])
    assert small.froc.fps_per_scan[-1] == 0.5  # the 0.95 hit on the large lesion is not an FP
    np.testing.assert_allclose(large.froc.sensitivities, np.ones(7))


def test_froc_by_diameter_accepts_a_scan_given_as_flat_empty_arrays() -> None:
    cands = [_c("A", [[0, 0, 0]], [0.9]), _c("B", [[9, 9, 9]], [0.5])]
    lesions = [_l("A", [[0, 0, 0]], [4]), ScanLesions("B", np.zeros(0), np.zeros(0))]
    small, *_ = froc_by_diameter(cands, lesions)
    assert small.num_lesions == 1 and small.froc is not None and small.froc.cpm == 1.0


def test_froc_by_diameter_rejects_bad_edges() -> None:
    cands, lesions = _hand_case()
    for edges in [(5.0,), (0.0, 5.0, 5.0), (10.0, 5.0)]:
        with pytest.raises(ValueError, match="strictly increasing"):
            froc_by_diameter(cands, lesions, edges=edges)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1))
def test_one_open_band_equals_the_plain_froc(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cands, lesions = [], []
    for s in range(int(rng.integers(1, 5))):
        m = int(rng.integers(0, 4))
        k = int(rng.integers(0, 8))
        lesions.append(_l(f"s{s}", rng.uniform(0, 40, (m, 3)).tolist(), rng.uniform(2, 20, m).tolist()))
        cands.append(_c(f"s{s}", rng.uniform(0, 40, (k, 3)).tolist(), rng.uniform(0, 1, k).round(2).tolist()))
    assume(sum(len(x) for x in lesions) > 0)
    (band,) = froc_by_diameter(cands, lesions, edges=(0.0, math.inf))
    plain = compute_froc(cands, lesions)
    assert band.froc is not None
    np.testing.assert_array_equal(band.froc.sensitivities, plain.sensitivities)
    np.testing.assert_array_equal(band.froc.fps_per_scan, plain.fps_per_scan)


def test_bootstrap_cpm_is_deterministic_and_brackets_the_spread() -> None:
    cands, lesions = _hand_case()
    a = bootstrap_cpm(cands, lesions, resamples=200, seed=3)
    b = bootstrap_cpm(cands, lesions, resamples=200, seed=3)
    assert a == b
    assert a.cpm == pytest.approx(0.625)
    assert 0.0 <= a.low <= a.high <= 1.0
    assert a.low < a.cpm < a.high  # three scans, one missed lesion: the interval is not degenerate
    assert "95% CI" in str(a)


def test_bootstrap_cpm_of_a_perfect_detector_is_a_point() -> None:
    cands = [_c(f"s{i}", [[0, 0, 0]], [0.9]) for i in range(5)]
    lesions = [_l(f"s{i}", [[0, 0, 0]], [6]) for i in range(5)]
    iv = bootstrap_cpm(cands, lesions, resamples=50)
    assert (iv.cpm, iv.low, iv.high) == (1.0, 1.0, 1.0)


def test_bootstrap_cpm_validates_arguments() -> None:
    cands, lesions = _hand_case()
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_cpm(cands, lesions, resamples=5)
    with pytest.raises(ValueError, match="level"):
        bootstrap_cpm(cands, lesions, level=1.0)
