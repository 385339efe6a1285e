"""Fuse the detections of several views of one image (test-time augmentation) into one set.

Each view (the image as is, flipped along x, flipped along y, ...) has its own detections, already mapped
back to the original image's coordinates. :func:`fuse_views` clusters them and averages each cluster over
**all** views, in the manner of weighted boxes fusion (Solovyev et al., "Weighted boxes fusion", Image and
Vision Computing 2021) as nnDetection uses it for its test-time augmentation:

- clusters are seeded in decreasing score order; a seed collects, from every *other* view, that view's most
  probable unclustered detection whose IoU with the seed is at least ``iou_threshold`` (at most one per view);
- the fused box is the score-weighted mean of the cluster's boxes, the fused class probabilities their
  score-weighted mean;
- the fused **score** (and objectness) is the cluster's sum divided by the number of views, so a view that
  saw nothing there counts as 0; fused findings below ``min_score`` are dropped. A finding every view agrees
  on keeps its probability; a look-alike that only one flip produced (noise, a vessel at one orientation)
  drops to a fraction of it. That re-ranking is what the averaging buys over keeping the best view's box
  (NMS), which can only add false positives.

Why not a library: ``ensemble-boxes`` (the reference WBF) works on boxes normalised to [0, 1] in NumPy and
fuses labels separately; here the boxes are voxel coordinates, the detections carry class probabilities and
objectness, the fusion is class-agnostic (the lesion probability is ``1 - p(background)``), and everything
stays a torch tensor on the model's device. MONAI has no box fusion.

Shapes: boxes ``(M, 4)`` in 2D and ``(M, 6)`` in 3D, corner mode (``xyxy`` / ``xyzxyz``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data.box_utils import box_iou
from torch import Tensor

from medrpn.modeling.structures import Detections


def fuse_views(views: Sequence[Detections], iou_threshold: float, min_score: float = 0.0) -> Detections:
    """Weighted fusion of the detections of ``len(views)`` views of the same image.

    Args:
        views: one :class:`Detections` per view, all in the same (unflipped) image coordinates. Boxes
            ``(M_v, 4)`` (2D) or ``(M_v, 6)`` (3D).
        iou_threshold: minimum IoU between a cluster's seed and a detection of another view that joins it.
        min_score: fused findings scoring below it are dropped (whole-scan inference passes the lesion head's
            ``score_threshold``, so averaging does not let in what one view alone would have dropped).

    Returns:
        Fused detections sorted by decreasing score; every fused score is at most the best member score.

    Raises:
        ValueError: no views, or an IoU threshold outside (0, 1].
    """
    if not views:
        raise ValueError("fuse_views needs at least one view")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    n_views = len(views)
    boxes = torch.cat([v.boxes for v in views])
    scores = torch.cat([v.scores for v in views])
    if boxes.shape[0] == 0:
        return Detections(
            boxes,
            scores,
            torch.cat([v.labels for v in views]),
            torch.cat([v.class_probs for v in views]),
            torch.cat([v.objectness for v in views]),
        )
    probs = torch.cat([v.class_probs for v in views]).float()
    objectness = torch.cat([v.objectness for v in views]).float()
    view_of = torch.cat([torch.full((len(v),), i, dtype=torch.long, device=boxes.device) for i, v in enumerate(views)])
    iou = box_iou(boxes.float(), boxes.float())
    order = torch.argsort(scores, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    free = torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    clusters: list[Tensor] = []
    for seed in order.tolist():
        if not free[seed]:
            continue
        members = [seed]
        free[seed] = False
        cand = free & (iou[seed] >= iou_threshold) & (view_of != view_of[seed])
        for v in range(n_views):
            in_view = torch.nonzero(cand & (view_of == v)).flatten()
            if in_view.numel():
                best = in_view[torch.argmin(rank[in_view])]
                members.append(int(best))
                free[best] = False
        clusters.append(torch.tensor(members, device=boxes.device))
    fused_boxes, fused_scores, fused_probs, fused_obj = [], [], [], []
    for m in clusters:
        w = scores[m].float().clamp_min(1e-12)
        fused_boxes.append((boxes[m].float() * w[:, None]).sum(0) / w.sum())
        fused_probs.append((probs[m] * w[:, None]).sum(0) / w.sum())
        fused_scores.append(scores[m].float().sum() / n_views)
        fused_obj.append(objectness[m].sum() / n_views)
    out_scores = torch.stack(fused_scores)
    out_probs = torch.stack(fused_probs)
    keep = torch.argsort(out_scores, descending=True)
    keep = keep[out_scores[keep] >= min_score]
    return Detections(
        torch.stack(fused_boxes)[keep].to(boxes.dtype),
        out_scores[keep].to(scores.dtype),
        out_probs[keep].argmax(dim=1),
        out_probs[keep].to(views[0].class_probs.dtype),
        torch.stack(fused_obj)[keep].to(views[0].objectness.dtype),
    )
