"""Box-level detection metrics: IoU average precision, proposal recall@k and the lesion-class confusion matrix.

Inputs are per-scan sequences of numpy arrays or torch tensors (converted with ``.detach().cpu()``).
Boxes are MONAI ``StandardMode`` — ``[x0, y0, z0, x1, y1, z1]`` (3D) or ``[x0, y0, x1, y1]`` (2D) — in any
consistent unit (world millimetres in medrpn evaluation). Lesion class ids are 0-based *foreground*
classes (e.g. 0 solid, 1 ground-glass, 2 part-solid); background is not a class id, and every
``num_classes`` argument here counts foreground classes only.

**What is reused from MONAI.** Matching for average precision is
:func:`monai.apps.detection.metrics.matching.matching_batch` (nnDetection's port of the COCO greedy
matcher: per scan and per class, detections in decreasing score order each take the still unmatched
ground-truth box of highest IoU, if that IoU is ``>= threshold``). It is called with
``iou_fn=`` :func:`box_iou` of this module (float64; MONAI's ``monai.data.box_utils.box_iou`` computes in
float32 and adds ``eps`` to the union, so an IoU of exactly the threshold can fall just below it),
``iou_thresholds=[t]``, ``gt_ignore=None`` and ``max_detections`` = the largest number of detections in
any scan unless a cap is given. Neither MONAI module imports torchvision.

The AP itself defaults to **all-points interpolation** (VOC 2010+): the area under the monotone
precision envelope of the precision-recall curve, computed here from ``matching_batch``'s
``dtMatches``/``dtScores``/``gtIgnore``. MONAI's :class:`monai.apps.detection.metrics.coco.COCOMetric`
samples the envelope at 101 recall points instead, and its class means include the ``-1`` placeholder of
classes without ground truth; ``interpolation="coco101"`` delegates to ``COCOMetric`` (one call per IoU
threshold, ``iou_list=[t]``, ``iou_range=(t, t, 1)``, only over classes that have ground truth) for
numbers comparable with MONAI's detection tutorials.

Ties in detection score are broken by scan order then by rank within the scan (stable sort), as in
``COCOMetric``. Metrics that are undefined for lack of ground truth raise :class:`ValueError` when
nothing is defined at all, and are ``NaN`` per class in :func:`per_class_ap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch

from medrpn.evaluation.froc import HIT_TOLERANCE, DiameterRule, lesion_diameters_from_boxes

__all__ = [
    "average_precision",
    "box_iou",
    "class_confusion",
    "detection_map",
    "match_detections",
    "per_class_ap",
    "proposal_recall",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Interpolation = Literal["all", "coco101"]
MatchRule = Literal["iou", "centre"]


# ----------------------------------------------------------------------------------------------- inputs


def _to_numpy(x: Any, dtype: Any = np.float64) -> Any:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _boxes(x: Any, name: str) -> FloatArray:
    """``(N, 2*D)`` float64 boxes; empty inputs of any shape become ``(0, 0)`` (compatible with any D)."""
    b = _to_numpy(x)
    if b.size == 0:
        return np.zeros((0, b.shape[-1] if b.ndim == 2 else 0), dtype=np.float64)
    if b.ndim != 2 or b.shape[1] not in (4, 6):
        raise ValueError(f"{name} must have shape (N, 4) or (N, 6) (StandardMode), got {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.asarray(b, dtype=np.float64)


def _vector(x: Any, n: int, name: str, dtype: Any = np.float64) -> Any:
    v = _to_numpy(x, dtype=dtype).reshape(-1)
    if v.shape[0] != n:
        raise ValueError(f"{name} has {v.shape[0]} entries, expected {n}")
    return v


def _scores(x: Any, n: int, name: str) -> FloatArray:
    s = _vector(x, n, name)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.asarray(s, dtype=np.float64)


def _classes(x: Any, n: int, name: str, num_classes: int | None) -> IntArray:
    raw = _to_numpy(x, dtype=np.float64).reshape(-1)
    if raw.shape[0] != n:
        raise ValueError(f"{name} has {raw.shape[0]} entries, expected {n}")
    if np.any(raw != np.round(raw)) or np.any(raw < 0):
        raise ValueError(f"{name} must be non-negative integer class ids (0-based foreground classes)")
    c = raw.astype(np.int64)
    if num_classes is not None and np.any(c >= num_classes):
        raise ValueError(f"{name} has class ids >= num_classes={num_classes}")
    return c


def _check_same_length(**seqs: Sequence[Any] | None) -> int:
    lengths = {k: len(v) for k, v in seqs.items() if v is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-scan sequences differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def _centres(b: FloatArray) -> FloatArray:
    d = b.shape[1] // 2
    return (b[:, :d] + b[:, d:]) / 2.0


# ---------------------------------------------------------------------------------------------- overlap


def box_iou(boxes1: Any, boxes2: Any) -> FloatArray:
    """Pairwise IoU of StandardMode boxes in float64 (no epsilon; IoU of two empty boxes is 0).

    Args:
        boxes1: ``(N, 2*D)`` boxes.
        boxes2: ``(M, 2*D)`` boxes.

    Returns:
        ``(N, M)`` IoU in ``[0, 1]``.
    """
    a = _to_numpy(boxes1)
    b = _to_numpy(boxes2)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((a.shape[0], b.shape[0]), dtype=np.float64)
    d = a.shape[1] // 2
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"boxes of different dimensionality: {a.shape} vs {b.shape}")
    area_a = np.prod(np.clip(a[:, d:] - a[:, :d], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, d:] - b[:, :d], 0, None), axis=1)
    lo = np.maximum(a[:, None, :d], b[None, :, :d])
    hi = np.minimum(a[:, None, d:], b[None, :, d:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return np.asarray(iou, dtype=np.float64)


def _centre_hits(pred: FloatArray, gt: FloatArray, diameters: FloatArray) -> tuple[Any, FloatArray]:
    """``(P, G)`` centre-hit matrix (LUNA16 rule, boundary included) and the centre distances."""
    if pred.shape[0] == 0 or gt.shape[0] == 0:
        z = np.zeros((pred.shape[0], gt.shape[0]))
        return z.astype(bool), z
    if pred.shape[1] != gt.shape[1]:
        raise ValueError(f"boxes of different dimensionality: {pred.shape} vs {gt.shape}")
    dist = np.linalg.norm(_centres(pred)[:, None, :] - _centres(gt)[None, :, :], axis=-1)
    return dist <= diameters[None, :] / 2.0 + HIT_TOLERANCE, dist


def _gt_diameters(gt: FloatArray, diameters: Any | None, rule: DiameterRule, name: str) -> FloatArray:
    if diameters is None:
        return lesion_diameters_from_boxes(gt, rule)
    dm = _vector(diameters, gt.shape[0], name)
    if not np.all(np.isfinite(dm)) or np.any(dm <= 0):
        raise ValueError(f"{name} must be finite and > 0")
    return np.asarray(dm, dtype=np.float64)


# ------------------------------------------------------------------------------------ average precision


def _all_points_ap(tp: Any, num_gt: int) -> float:
    """All-points interpolated AP of a score-sorted TP indicator ``(R,)`` with ``num_gt`` positives."""
    if tp.shape[0] == 0:
        return 0.0
    tp_c = np.cumsum(tp, dtype=np.float64)
    fp_c = np.cumsum(~tp, dtype=np.float64)
    recall = np.concatenate([[0.0], tp_c / num_gt])
    precision = np.concatenate([[0.0], tp_c / (tp_c + fp_c)])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(recall) * envelope[1:]))


def _prepare(
    pred_boxes: Sequence[Any],
    pred_scores: Sequence[Any],
    gt_boxes: Sequence[Any],
    pred_classes: Sequence[Any] | None,
    gt_classes: Sequence[Any] | None,
    num_classes: int | None,
) -> tuple[list[FloatArray], list[FloatArray], list[IntArray], list[FloatArray], list[IntArray], int]:
    if (pred_classes is None) != (gt_classes is None):
        raise ValueError("give both pred_classes and gt_classes, or neither (class-agnostic)")
    _check_same_length(
        pred_boxes=pred_boxes,
        pred_scores=pred_scores,
        gt_boxes=gt_boxes,
        pred_classes=pred_classes,
        gt_classes=gt_classes,
    )
    pb, ps, pc, gb, gc = [], [], [], [], []
    for i in range(len(pred_boxes)):
        b = _boxes(pred_boxes[i], f"pred_boxes[{i}]")
        g = _boxes(gt_boxes[i], f"gt_boxes[{i}]")
        if b.shape[0] and g.shape[0] and b.shape[1] != g.shape[1]:
            raise ValueError(f"scan {i}: predicted and ground-truth boxes differ in dimensionality")
        pb.append(b)
        gb.append(g)
        ps.append(_scores(pred_scores[i], b.shape[0], f"pred_scores[{i}]"))
        if pred_classes is None or gt_classes is None:
            pc.append(np.zeros(b.shape[0], dtype=np.int64))
            gc.append(np.zeros(g.shape[0], dtype=np.int64))
        else:
            pc.append(_classes(pred_classes[i], b.shape[0], f"pred_classes[{i}]", num_classes))
            gc.append(_classes(gt_classes[i], g.shape[0], f"gt_classes[{i}]", num_classes))
    if num_classes is None:
        top = max((int(c.max()) for c in pc + gc if c.size), default=0)
        num_classes = top + 1
    return pb, ps, pc, gb, gc, num_classes


def _per_class_ap_matrix(
    pred_boxes: Sequence[Any],
    pred_scores: Sequence[Any],
    gt_boxes: Sequence[Any],
    iou_thresholds: Sequence[float],
    pred_classes: Sequence[Any] | None,
    gt_classes: Sequence[Any] | None,
    num_classes: int | None,
    interpolation: Interpolation,
    max_detections: int | None,
) -> FloatArray:
    """``(T, C)`` AP per IoU threshold and class; NaN for classes without ground truth."""
    thresholds = [float(t) for t in iou_thresholds]
    if not thresholds or any(not 0.0 < t <= 1.0 for t in thresholds):
        raise ValueError(f"iou thresholds must be in (0, 1], got {thresholds}")
    if interpolation not in ("all", "coco101"):
        raise ValueError(f"interpolation must be 'all' or 'coco101', got {interpolation!r}")
    pb, ps, pc, gb, gc, n_cls = _prepare(pred_boxes, pred_scores, gt_boxes, pred_classes, gt_classes, num_classes)
    out = np.full((len(thresholds), n_cls), np.nan, dtype=np.float64)

    # only classes with ground truth have an AP; compact them to 0..K-1 (COCOMetric indexes classes by position)
    present = np.unique(np.concatenate([np.zeros(0, dtype=np.int64), *gc]))
    if present.size == 0:
        return out
    remap = np.full(n_cls, -1, dtype=np.int64)
    remap[present] = np.arange(present.size)
    keep = [remap[c] >= 0 for c in pc]
    pb_k = [b[k] for b, k in zip(pb, keep)]
    ps_k = [s[k] for s, k in zip(ps, keep)]
    pc_k = [remap[c[k]] for c, k in zip(pc, keep)]
    gc_k = [remap[c] for c in gc]
    max_det = max_detections if max_detections is not None else max([1, *(b.shape[0] for b in pb_k)])
    if max_det < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")

    for ti, t in enumerate(thresholds):
        matches = matching_batch(
            iou_fn=box_iou,
            iou_thresholds=[t],
            pred_boxes=pb_k,
            pred_classes=pc_k,
            pred_scores=ps_k,
            gt_boxes=gb,
            gt_classes=gc_k,
            gt_ignore=None,
            max_detections=max_det,
        )
        if interpolation == "coco101":
            names = [f"c{k}" for k in range(present.size)]
            metric = COCOMetric(
                classes=names, iou_list=[t], iou_range=(t, t, 1.0), max_detection=[max_det], verbose=False
            )
            values, _ = metric(matches)
            for k, cls in enumerate(present):
                key = next(key for key in values if key.startswith(f"{names[k]}_AP_IoU_"))
                out[ti, cls] = values[key]
            continue
        for k, cls in enumerate(present):
            per_scan = [m[k] for m in matches if k in m]
            num_gt = int(sum(np.count_nonzero(r["gtIgnore"] == 0) for r in per_scan))
            scores = np.concatenate([np.zeros(0), *(r["dtScores"] for r in per_scan)])
            tp = np.concatenate([np.zeros(0, dtype=bool), *(r["dtMatches"][0].astype(bool) for r in per_scan)])
            order = np.argsort(-scores, kind="mergesort")
            out[ti, cls] = _all_points_ap(tp[order], num_gt)
    return out


def average_precision(
    pred_boxes: Sequence[Any],
    pred_scores: Sequence[Any],
    gt_boxes: Sequence[Any],
    iou_threshold: float = 0.5,
    *,
    pred_classes: Sequence[Any] | None = None,
    gt_classes: Sequence[Any] | None = None,
    num_classes: int | None = None,
    interpolation: Interpolation = "all",
    max_detections: int | None = None,
) -> float:
    """Average precision at one IoU threshold over a set of scans.

    Class-agnostic when no classes are given (every box is one "lesion" class). With classes, the AP of
    each class (detections of class ``c`` matched only to ground truth of class ``c``) is averaged over
    the classes that have at least one ground-truth box (COCO convention; detections of classes without
    ground truth do not count).

    Args:
        pred_boxes: per scan ``(P_i, 2*D)`` predicted boxes.
        pred_scores: per scan ``(P_i,)`` scores (any finite real; only their order matters).
        gt_boxes: per scan ``(G_i, 2*D)`` ground-truth boxes.
        iou_threshold: a detection matches a ground-truth box when IoU ``>=`` this.
        pred_classes: per scan ``(P_i,)`` 0-based foreground class ids, or None.
        gt_classes: per scan ``(G_i,)`` 0-based foreground class ids, or None.
        num_classes: number of foreground classes (validates ids; inferred if None).
        interpolation: ``"all"`` (all-points, default) or ``"coco101"`` (MONAI ``COCOMetric``).
        max_detections: keep only the top-scoring detections per scan and class (default: all).

    Returns:
        AP in ``[0, 1]``.

    Raises:
        ValueError: no ground-truth box at all (AP undefined), or malformed inputs.
    """
    ap = _per_class_ap_matrix(
        pred_boxes,
        pred_scores,
        gt_boxes,
        [iou_threshold],
        pred_classes,
        gt_classes,
        num_classes,
        interpolation,
        max_detections,
    )[0]
    if np.all(np.isnan(ap)):
        raise ValueError("no ground-truth boxes in any scan: average precision is undefined")
    return float(np.nanmean(ap))


def detection_map(
    pred_boxes: Sequence[Any],
    pred_scores: Sequence[Any],
    gt_boxes: Sequence[Any],
    iou_thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5),
    *,
    pred_classes: Sequence[Any] | None = None,
    gt_classes: Sequence[Any] | None = None,
    num_classes: int | None = None,
    interpolation: Interpolation = "all",
    max_detections: int | None = None,
) -> dict[str, float]:
    """AP at several IoU thresholds and their mean.

    Args:
        pred_boxes: per scan ``(P_i, 2*D)`` predicted boxes.
        pred_scores: per scan ``(P_i,)`` scores.
        gt_boxes: per scan ``(G_i, 2*D)`` ground-truth boxes.
        iou_thresholds: ``(T,)`` IoU thresholds in ``(0, 1]``.
        pred_classes: per scan ``(P_i,)`` class ids, or None (class-agnostic).
        gt_classes: per scan ``(G_i,)`` class ids, or None.
        num_classes: number of foreground classes (inferred if None).
        interpolation: ``"all"`` or ``"coco101"``; see :func:`average_precision`.
        max_detections: per-scan-and-class cap on detections (default: all).

    Returns:
        ``{"AP@0.1": ..., ..., "AP@0.5": ..., "mAP@0.1:0.5": ...}`` — each ``AP@t`` as
        :func:`average_precision`, keys formatted with ``:g``; the last key is the mean over thresholds,
        named by the smallest and largest threshold.

    Raises:
        ValueError: no ground-truth box at all, or malformed inputs.
    """
    ap = _per_class_ap_matrix(
        pred_boxes,
        pred_scores,
        gt_boxes,
        list(iou_thresholds),
        pred_classes,
        gt_classes,
        num_classes,
        interpolation,
        max_detections,
    )
    if np.all(np.isnan(ap)):
        raise ValueError("no ground-truth boxes in any scan: average precision is undefined")
    per_t = np.nanmean(ap, axis=1)
    out = {f"AP@{float(t):g}": float(v) for t, v in zip(iou_thresholds, per_t)}
    out[f"mAP@{min(iou_thresholds):g}:{max(iou_thresholds):g}"] = float(np.mean(per_t))
    return out


def per_class_ap(
    pred_boxes: Sequence[Any],
    pred_classes: Sequence[Any],
    pred_scores: Sequence[Any],
    gt_boxes: Sequence[Any],
    gt_classes: Sequence[Any],
    num_classes: int,
    iou_threshold: float = 0.1,
    *,
    class_names: Sequence[str] | None = None,
    interpolation: Interpolation = "all",
    max_detections: int | None = None,
) -> dict[str, float]:
    """AP of each lesion class (for the lesion classification head).

    Args:
        pred_boxes: per scan ``(P_i, 2*D)`` detected boxes.
        pred_classes: per scan ``(P_i,)`` predicted 0-based foreground class ids.
        pred_scores: per scan ``(P_i,)`` scores of the predicted class.
        gt_boxes: per scan ``(G_i, 2*D)`` ground-truth boxes.
        gt_classes: per scan ``(G_i,)`` true 0-based foreground class ids.
        num_classes: number of foreground classes ``C`` (background excluded).
        iou_threshold: IoU for a match.
        class_names: ``C`` names (default ``"class_0"``, ...).
        interpolation: ``"all"`` or ``"coco101"``; see :func:`average_precision`.
        max_detections: per-scan-and-class cap on detections (default: all).

    Returns:
        ``{name: AP}`` for all ``C`` classes, in class order; ``NaN`` for classes without ground truth.
    """
    if class_names is None:
        class_names = [f"class_{c}" for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
    ap = _per_class_ap_matrix(
        pred_boxes,
        pred_scores,
        gt_boxes,
        [iou_threshold],
        pred_classes,
        gt_classes,
        num_classes,
        interpolation,
        max_detections,
    )[0]
    return {name: float(v) for name, v in zip(class_names, ap)}


# ------------------------------------------------------------------------------------- proposal recall


def proposal_recall(
    proposals_per_scan: Sequence[Any],
    gt_per_scan: Sequence[Any],
    ks: Sequence[int] = (10, 50, 100, 300),
    iou_threshold: float = 0.5,
    *,
    rule: MatchRule = "iou",
    gt_diameters: Sequence[Any] | None = None,
    diameter_rule: DiameterRule = "max_inplane",
    scores_per_scan: Sequence[Any] | None = None,
) -> dict[int, float]:
    """Recall@k of region proposals: the fraction of all ground-truth boxes covered by a top-k proposal.

    A ground-truth box is covered when at least one of the first ``k`` proposals of its scan matches it
    (not one-to-one: one proposal may cover several boxes). ``rule="iou"``: IoU ``>= iou_threshold``.
    ``rule="centre"``: the proposal centre lies within the lesion radius (LUNA16 rule, boundary
    included; ``iou_threshold`` is ignored), diameters from ``gt_diameters`` or derived from the boxes
    with :func:`medrpn.evaluation.froc.lesion_diameters_from_boxes`.

    Args:
        proposals_per_scan: per scan ``(P_i, 2*D)`` proposals sorted by decreasing score (or give
            ``scores_per_scan`` and they are sorted here, stably).
        gt_per_scan: per scan ``(G_i, 2*D)`` ground-truth boxes.
        ks: positive numbers of top proposals.
        iou_threshold: IoU for coverage under ``rule="iou"``.
        rule: ``"iou"`` or ``"centre"``.
        gt_diameters: per scan ``(G_i,)`` lesion diameters for ``rule="centre"``, or None.
        diameter_rule: rule deriving diameters from boxes when ``gt_diameters`` is None.
        scores_per_scan: per scan ``(P_i,)`` proposal scores, or None if already sorted.

    Returns:
        ``{k: recall}`` in ``[0, 1]``.

    Raises:
        ValueError: no ground-truth box at all, non-positive ``k``, unknown rule, or malformed inputs.
    """
    if rule not in ("iou", "centre"):
        raise ValueError(f"rule must be 'iou' or 'centre', got {rule!r}")
    ks_list = [int(k) for k in ks]
    if not ks_list or any(k < 1 for k in ks_list):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    _check_same_length(proposals=proposals_per_scan, gt=gt_per_scan, diameters=gt_diameters, scores=scores_per_scan)
    covered = dict.fromkeys(ks_list, 0)
    total = 0
    for i in range(len(gt_per_scan)):
        props = _boxes(proposals_per_scan[i], f"proposals_per_scan[{i}]")
        gt = _boxes(gt_per_scan[i], f"gt_per_scan[{i}]")
        if scores_per_scan is not None:
            s = _scores(scores_per_scan[i], props.shape[0], f"scores_per_scan[{i}]")
            props = props[np.argsort(-s, kind="mergesort")]
        total += gt.shape[0]
        if gt.shape[0] == 0 or props.shape[0] == 0:
            continue
        if rule == "iou":
            match = box_iou(props, gt) >= iou_threshold
        else:
            dm = _gt_diameters(gt, None if gt_diameters is None else gt_diameters[i], diameter_rule, "gt_diameters")
            match, _ = _centre_hits(props, gt, dm)
        # first rank (0-based) at which each gt is matched; P if never
        hit_any = match.any(axis=0)
        first = np.where(hit_any, match.argmax(axis=0), props.shape[0])
        for k in ks_list:
            covered[k] += int(np.count_nonzero(first < k))
    if total == 0:
        raise ValueError("no ground-truth boxes in any scan: recall is undefined")
    return {k: covered[k] / total for k in ks_list}


# --------------------------------------------------------------------------------- confusion of classes


def match_detections(
    pred_boxes: Any,
    gt_boxes: Any,
    pred_scores: Any | None = None,
    *,
    iou_threshold: float = 0.5,
    rule: MatchRule = "iou",
    gt_diameters: Any | None = None,
    diameter_rule: DiameterRule = "max_inplane",
) -> IntArray:
    """Class-agnostic greedy one-to-one matching of one scan's detections to its ground truth.

    Detections are visited in decreasing score (stable; input order if ``pred_scores`` is None); each
    takes the still unmatched ground-truth box with the highest IoU ``>= iou_threshold``
    (``rule="iou"``) or, under ``rule="centre"``, the still unmatched lesion with the nearest centre
    among those whose radius contains the detection centre (ties: lowest index).

    Args:
        pred_boxes: ``(P, 2*D)`` detected boxes.
        gt_boxes: ``(G, 2*D)`` ground-truth boxes.
        pred_scores: ``(P,)`` scores, or None.
        iou_threshold: IoU for a match under ``rule="iou"``.
        rule: ``"iou"`` or ``"centre"``.
        gt_diameters: ``(G,)`` lesion diameters for ``rule="centre"`` (default: derived from the boxes).
        diameter_rule: rule deriving diameters from boxes when ``gt_diameters`` is None.

    Returns:
        ``(P,)`` int64: index of the matched ground-truth box, or ``-1``.
    """
    if rule not in ("iou", "centre"):
        raise ValueError(f"rule must be 'iou' or 'centre', got {rule!r}")
    pred = _boxes(pred_boxes, "pred_boxes")
    gt = _boxes(gt_boxes, "gt_boxes")
    n_p, n_g = pred.shape[0], gt.shape[0]
    out = np.full(n_p, -1, dtype=np.int64)
    if n_p == 0 or n_g == 0:
        return out
    if rule == "iou":
        quality = box_iou(pred, gt)
        valid = quality >= iou_threshold
    else:
        dm = _gt_diameters(gt, gt_diameters, diameter_rule, "gt_diameters")
        valid, dist = _centre_hits(pred, gt, dm)
        quality = -dist
    order = (
        np.arange(n_p) if pred_scores is None else np.argsort(-_scores(pred_scores, n_p, "pred_scores"), kind="stable")
    )
    free = np.ones(n_g, dtype=bool)
    for p in order:
        cand = valid[p] & free
        if not cand.any():
            continue
        g = int(np.argmax(np.where(cand, quality[p], -np.inf)))
        out[p] = g
        free[g] = False
    return out


def class_confusion(
    pred_boxes: Sequence[Any],
    pred_classes: Sequence[Any],
    gt_boxes: Sequence[Any],
    gt_classes: Sequence[Any],
    num_classes: int,
    *,
    pred_scores: Sequence[Any] | None = None,
    score_threshold: float | None = None,
    iou_threshold: float = 0.5,
    rule: MatchRule = "iou",
    gt_diameters: Sequence[Any] | None = None,
    diameter_rule: DiameterRule = "max_inplane",
) -> IntArray:
    """Confusion matrix of lesion classes on detections matched to ground truth.

    Detections (optionally only those with ``score >= score_threshold``) are matched to ground truth
    per scan with :func:`match_detections` (class-agnostic, one-to-one, IoU or centre-hit rule), then
    counted in a ``(C+1, C+1)`` int64 matrix ``M`` with ``C = num_classes`` foreground classes:

    - ``M[t, p]`` (``t, p < C``): ground-truth lesions of class ``t`` matched by a detection of class ``p``;
    - ``M[t, C]`` (last column, "missed"): lesions of class ``t`` that no detection matched;
    - ``M[C, p]`` (last row, "false positive"): detections of class ``p`` matched to no lesion
      (including a second detection of an already matched lesion);
    - ``M[C, C]`` is always 0.

    Rows therefore sum to the number of lesions of each class (and the last row to the false
    positives); the diagonal over ``0..C-1`` counts correctly classified detected lesions.

    Args:
        pred_boxes: per scan ``(P_i, 2*D)`` detected boxes.
        pred_classes: per scan ``(P_i,)`` predicted 0-based foreground class ids.
        gt_boxes: per scan ``(G_i, 2*D)`` ground-truth boxes.
        gt_classes: per scan ``(G_i,)`` true 0-based foreground class ids.
        num_classes: number of foreground classes ``C`` (background excluded).
        pred_scores: per scan ``(P_i,)`` scores (matching order and ``score_threshold``), or None.
        score_threshold: keep detections with ``score >= score_threshold`` (needs ``pred_scores``).
        iou_threshold: IoU for a match under ``rule="iou"``.
        rule: ``"iou"`` or ``"centre"``.
        gt_diameters: per scan ``(G_i,)`` diameters for ``rule="centre"`` (default: from the boxes).
        diameter_rule: rule deriving diameters from boxes when ``gt_diameters`` is None.

    Returns:
        ``(C+1, C+1)`` int64 matrix, rows = true class (+ false positive), columns = predicted class
        (+ missed).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if score_threshold is not None and pred_scores is None:
        raise ValueError("score_threshold needs pred_scores")
    _check_same_length(
        pred_boxes=pred_boxes,
        pred_classes=pred_classes,
        gt_boxes=gt_boxes,
        gt_classes=gt_classes,
        pred_scores=pred_scores,
        gt_diameters=gt_diameters,
    )
    c = num_classes
    mat = np.zeros((c + 1, c + 1), dtype=np.int64)
    for i in range(len(pred_boxes)):
        pb = _boxes(pred_boxes[i], f"pred_boxes[{i}]")
        gb = _boxes(gt_boxes[i], f"gt_boxes[{i}]")
        pc = _classes(pred_classes[i], pb.shape[0], f"pred_classes[{i}]", c)
        gc = _classes(gt_classes[i], gb.shape[0], f"gt_classes[{i}]", c)
        ps = None if pred_scores is None else _scores(pred_scores[i], pb.shape[0], f"pred_scores[{i}]")
        if ps is not None and score_threshold is not None:
            keep = ps >= score_threshold
            pb, pc, ps = pb[keep], pc[keep], ps[keep]
        dm = None if gt_diameters is None else gt_diameters[i]
        m = match_detections(
            pb, gb, ps, iou_threshold=iou_threshold, rule=rule, gt_diameters=dm, diameter_rule=diameter_rule
        )
        matched = m >= 0
        np.add.at(mat, (gc[m[matched]], pc[matched]), 1)
        np.add.at(mat, (np.full(int((~matched).sum()), c), pc[~matched]), 1)
        missed = np.ones(gb.shape[0], dtype=bool)
        missed[m[matched]] = False
        np.add.at(mat, (gc[missed], np.full(int(missed.sum()), c)), 1)
    return mat
