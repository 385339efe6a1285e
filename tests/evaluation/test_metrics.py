"""IoU average precision, proposal recall@k, lesion-class confusion, and the confusion plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data.box_utils import box_iou as monai_box_iou

from medrpn.evaluation.metrics import (
    Interpolation,
    average_precision,
    box_iou,
    class_confusion,
    detection_map,
    match_detections,
    per_class_ap,
    proposal_recall,
)
from medrpn.evaluation.plots import plot_confusion

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _b(*rows: list[float]) -> np.ndarray:
    return np.asarray(rows, dtype=float).reshape(-1, 6)


def _cube(x: float, s: float = 10.0) -> list[float]:
    return [x, 0, 0, x + s, s, s]


# ------------------------------------------------------------------------------------------------------ AP


@pytest.mark.parametrize("interpolation", ["all", "coco101"])
def test_perfect_detector_ap_is_one(interpolation: Interpolation) -> None:
    gt = [_b(_cube(0), _cube(20)), _b(_cube(0))]
    scores = [np.array([0.9, 0.8]), np.array([0.7])]
    assert average_precision(gt, scores, gt, 0.5, interpolation=interpolation) == pytest.approx(1.0)


@pytest.mark.parametrize("interpolation", ["all", "coco101"])
def test_false_positive_ranked_above_true_positive(interpolation: Interpolation) -> None:
    # 1 GT: ranks FP, TP -> precision 1/2 at recall 1 -> AP 0.5
    gt = [_b(_cube(0))]
    pred = [_b(_cube(100), _cube(0))]
    ap = average_precision(pred, [np.array([0.9, 0.8])], gt, 0.5, interpolation=interpolation)
    assert ap == pytest.approx(0.5)


def test_all_points_versus_coco101_interpolation() -> None:
    # 2 GT: ranks TP, FP, TP -> envelope 1 on recall (0, .5], 2/3 on (.5, 1]
    gt = [_b(_cube(0), _cube(20))]
    pred = [_b(_cube(0), _cube(100), _cube(20))]
    scores = [np.array([0.9, 0.8, 0.7])]
    assert average_precision(pred, scores, gt, 0.5) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # MONAI COCOMetric: 51 recall points <= 0.5 at precision 1, 50 points above at 2/3
    coco = average_precision(pred, scores, gt, 0.5, interpolation="coco101")
    assert coco == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_no_detections_ap_is_zero_and_no_gt_raises() -> None:
    gt = [_b(_cube(0)), _b()]
    assert average_precision([_b(), _b()], [np.zeros(0), np.zeros(0)], gt, 0.5) == 0.0
    with pytest.raises(ValueError, match="undefined"):
        average_precision([_b(_cube(0))], [np.array([0.5])], [_b()], 0.5)


def test_iou_equal_to_threshold_matches() -> None:
    gt = [_b([0, 0, 0, 2, 2, 2])]
    pred = [_b([0, 0, 0, 2, 2, 1])]  # IoU exactly 0.5
    assert box_iou(pred[0], gt[0])[0, 0] == 0.5
    assert average_precision(pred, [np.array([1.0])], gt, 0.5) == 1.0
    assert average_precision(pred, [np.array([1.0])], gt, 0.51) == 0.0


def test_detection_map_keys_and_values() -> None:
    gt = [np.array([[0.0, 0, 10, 10]])]
    pred = [np.array([[0.0, 0, 10, 3.5]])]  # 2D, IoU 0.35
    out = detection_map(pred, [np.array([0.9])], gt)
    assert list(out) == ["AP@0.1", "AP@0.2", "AP@0.3", "AP@0.4", "AP@0.5", "mAP@0.1:0.5"]
    assert [out[k] for k in list(out)[:5]] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert out["mAP@0.1:0.5"] == pytest.approx(0.6)
    coco = detection_map(pred, [np.array([0.9])], gt, interpolation="coco101")
    assert coco == pytest.approx(out)


def test_per_class_ap_and_class_mean() -> None:
    # scan 0: GT class 0 found with class 0. scan 1: GT class 0 found as class 2 (wrong), GT class 1 found
    # as class 1 after a class-1 FP ranked above it.
    gt = [_b(_cube(0)), _b(_cube(0), _cube(20))]
    gt_cls = [np.array([0]), np.array([0, 1])]
    pred = [_b(_cube(0)), _b(_cube(0), _cube(100), _cube(20))]
    pred_cls = [np.array([0]), np.array([2, 1, 1])]
    scores = [np.array([0.9]), np.array([0.95, 0.8, 0.7])]
    ap = per_class_ap(pred, pred_cls, scores, gt, gt_cls, 3, 0.5, class_names=["solid", "ggo", "part-solid"])
    assert list(ap) == ["solid", "ggo", "part-solid"]
    assert ap["solid"] == pytest.approx(0.5)  # 1 of 2 solid lesions, found at precision 1
    assert ap["ggo"] == pytest.approx(0.5)  # FP then TP
    assert math.isnan(ap["part-solid"])  # no ground truth of class 2
    mean = average_precision(pred, scores, gt, 0.5, pred_classes=pred_cls, gt_classes=gt_cls, num_classes=3)
    assert mean == pytest.approx(0.5)
    # class-agnostic: ranks TP(0.95) TP(0.9) FP(0.8) TP(0.7) over 3 GT
    assert average_precision(pred, scores, gt, 0.5) == pytest.approx(2 / 3 + 1 / 3 * 3 / 4)
    with pytest.raises(ValueError, match="num_classes"):
        per_class_ap(pred, pred_cls, scores, gt, gt_cls, 2, 0.5)


def test_accepts_torch_tensors_and_max_detections() -> None:
    gt = [torch.tensor([_cube(0)])]
    pred = [torch.tensor([_cube(100), _cube(0)])]
    scores = [torch.tensor([0.9, 0.8])]
    assert average_precision(pred, scores, gt, 0.5) == pytest.approx(0.5)
    assert average_precision(pred, scores, gt, 0.5, max_detections=1) == 0.0


def test_box_iou_agrees_with_monai() -> None:
    rng = np.random.default_rng(0)
    lo = rng.uniform(0, 20, size=(7, 3))
    a = np.concatenate([lo, lo + rng.uniform(1, 10, size=(7, 3))], axis=1)
    lo = rng.uniform(0, 20, size=(5, 3))
    b = np.concatenate([lo, lo + rng.uniform(1, 10, size=(5, 3))], axis=1)
    np.testing.assert_allclose(box_iou(a, b), monai_box_iou(a, b), atol=1e-5)


# ------------------------------------------------------------------------------------------ proposal recall


def test_proposal_recall_iou() -> None:
    gt = [_b(_cube(0), _cube(20)), _b(_cube(0))]
    props = [_b(_cube(0), _cube(100), _cube(20)), _b(_cube(50), _cube(0))]
    rec = proposal_recall(props, gt, ks=(1, 2, 3, 300))
    assert rec == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0, 300: 1.0})
    # the same proposals, unsorted, sorted here by their scores
    shuffled = [p[::-1] for p in props]
    scores = [np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.8])]
    assert proposal_recall(shuffled, gt, ks=(1, 2, 3), scores_per_scan=scores) == pytest.approx(
        {1: 1 / 3, 2: 2 / 3, 3: 1.0}
    )
    # a stricter IoU: a shifted proposal (IoU 7/13) no longer covers
    shifted = [_b([3, 0, 0, 13, 10, 10])]
    assert proposal_recall(shifted, [_b(_cube(0))], ks=(1,), iou_threshold=0.5)[1] == 1.0
    assert proposal_recall(shifted, [_b(_cube(0))], ks=(1,), iou_threshold=0.6)[1] == 0.0


def test_proposal_recall_centre_rule() -> None:
    gt = [_b(_cube(0))]  # centre (5, 5, 5), diameter 10 (largest in-plane extent)
    props = [_b([8, 5, 1, 12, 5, 9], [9, 5, 5, 11, 5, 5])]  # centres (10, 5, 5) dist 5; (10, 5, 5)
    assert proposal_recall(props, gt, ks=(1,), rule="centre")[1] == 1.0
    assert proposal_recall(props, gt, ks=(1,), rule="centre", gt_diameters=[np.array([9.0])])[1] == 0.0


def test_proposal_recall_validation() -> None:
    with pytest.raises(ValueError, match="undefined"):
        proposal_recall([_b(_cube(0))], [_b()])
    with pytest.raises(ValueError, match="ks"):
        proposal_recall([_b(_cube(0))], [_b(_cube(0))], ks=(0,))
    with pytest.raises(ValueError, match="length"):
        proposal_recall([_b(_cube(0))], [_b(_cube(0)), _b()])


# ------------------------------------------------------------------------------------------------ confusion


def test_match_detections_greedy_by_score() -> None:
    gt = _b(_cube(0), _cube(20))
    pred = _b([0, 0, 0, 10, 10, 9], [1, 0, 0, 11, 10, 10], _cube(200))
    # both first two overlap GT 0; the higher-scoring one (index 1) takes it, index 0 finds nothing else
    np.testing.assert_array_equal(match_detections(pred, gt, np.array([0.5, 0.9, 0.1])), [-1, 0, -1])
    np.testing.assert_array_equal(match_detections(pred, gt), [0, -1, -1])


def test_class_confusion_hand_case(tmp_path: Path) -> None:
    # 3 classes. Scan 0: solid GT detected as solid; ggo GT detected as part-solid; part-solid GT missed;
    # one FP predicted ggo. Scan 1: a solid GT missed, an FP predicted solid below the score threshold.
    gt = [_b(_cube(0), _cube(20), _cube(40)), _b(_cube(0))]
    gt_cls = [np.array([0, 1, 2]), np.array([0])]
    pred = [_b(_cube(0), _cube(20), _cube(100)), _b(_cube(300))]
    pred_cls = [np.array([0, 2, 1]), np.array([0])]
    scores = [np.array([0.9, 0.8, 0.7]), np.array([0.05])]
    mat = class_confusion(pred, pred_cls, gt, gt_cls, 3, pred_scores=scores, score_threshold=0.1)
    expected = np.array(
        [
            [1, 0, 0, 1],  # solid: 1 correct, 1 missed
            [0, 0, 1, 0],  # ggo: called part-solid
            [0, 0, 0, 1],  # part-solid: missed
            [0, 1, 0, 0],  # false positives by predicted class
        ]
    )
    np.testing.assert_array_equal(mat, expected)
    assert mat.dtype == np.int64
    np.testing.assert_array_equal(mat[:3].sum(axis=1), [2, 1, 1])  # rows sum to lesions per class
    without_threshold = class_confusion(pred, pred_cls, gt, gt_cls, 3, pred_scores=scores)
    assert without_threshold[3, 0] == 1

    # centre rule with torch input: a small box centred on the lesion matches although its IoU is tiny
    small = [torch.tensor([[4.0, 4, 4, 6, 6, 6]])]
    mat_c = class_confusion(small, [torch.tensor([1])], [_b(_cube(0))], [np.array([1])], 2, rule="centre")
    np.testing.assert_array_equal(mat_c, [[0, 0, 0], [0, 1, 0], [0, 0, 0]])
    mat_i = class_confusion(small, [torch.tensor([1])], [_b(_cube(0))], [np.array([1])], 2, rule="iou")
    np.testing.assert_array_equal(mat_i, [[0, 0, 0], [0, 0, 1], [0, 1, 0]])

    out = plot_confusion(mat, ["solid", "ggo", "part-solid"], tmp_path / "confusion.png")
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000
    with pytest.raises(ValueError, match="shape"):
        plot_confusion(mat, ["solid", "ggo"], tmp_path / "bad.png")


def test_class_confusion_validation() -> None:
    with pytest.raises(ValueError, match="class ids"):
        class_confusion([_b(_cube(0))], [np.array([3])], [_b(_cube(0))], [np.array([0])], 3)
    with pytest.raises(ValueError, match="pred_scores"):
        class_confusion([_b(_cube(0))], [np.array([0])], [_b(_cube(0))], [np.array([0])], 3, score_threshold=0.5)
