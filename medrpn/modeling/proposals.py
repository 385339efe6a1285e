"""Turning per-anchor predictions into proposals: decode, clip, drop tiny boxes, top-k, NMS, top-k.

The steps follow Faster R-CNN with FPN (torchvision's ``RegionProposalNetwork.filter_proposals``):

1. per image and per FPN level keep the ``pre_nms_top_k`` anchors with the highest objectness;
2. decode their deltas against the anchors (MONAI ``BoxCoder``, log-size deltas clamped);
3. clip the boxes to the image and drop boxes smaller than ``min_size`` voxels along any axis
   or with objectness below ``score_threshold``;
4. NMS per level (levels do not suppress each other), then keep the ``post_nms_top_k`` best
   over all levels, sorted by decreasing objectness.

Shapes: see :mod:`medrpn.modeling.structures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.apps.detection.utils.box_coder import BoxCoder
from torch import Tensor

from medrpn.modeling.structures import Proposals, objectness_log_odds
from medrpn.ops.nms import batched_nms


@dataclass(frozen=True)
class ProposalSettings:
    """Proposal-selection settings for one phase (training or testing).

    Attributes:
        pre_nms_top_k: candidates kept per FPN level before NMS.
        post_nms_top_k: proposals kept per image after NMS.
        nms_iou: IoU above which a lower-scored box of the same level is suppressed.
        min_size: minimum box extent in voxels along every axis.
        score_threshold: minimum objectness probability.
    """

    pre_nms_top_k: int = 2000
    post_nms_top_k: int = 2000
    nms_iou: float = 0.7
    min_size: float = 1e-3
    score_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.pre_nms_top_k < 1 or self.post_nms_top_k < 1:
            raise ValueError(f"top-k values must be >= 1, got {self.pre_nms_top_k}, {self.post_nms_top_k}")
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in [0, 1], got {self.nms_iou}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")


def select_proposals(
    anchors: Tensor,
    num_anchors_per_level: Sequence[int],
    objectness_logits: Tensor,
    deltas: Tensor,
    image_shape: Sequence[int],
    coder: BoxCoder,
    settings: ProposalSettings,
) -> list[Proposals]:
    """Select proposals for every image of a batch.

    Args:
        anchors: ``(N, 4)`` in 2D or ``(N, 6)`` in 3D, image coordinates.
        num_anchors_per_level: ``L`` ints summing to ``N``.
        objectness_logits: ``(B, N, K)``, K = 1 (sigmoid) or 2 (softmax).
        deltas: ``(B, N, 2*D)``.
        image_shape: the ``D`` spatial sizes of the network input (boxes are clipped to it).
        coder: box coder used to decode deltas.
        settings: selection settings of the current phase.

    Returns:
        ``B`` :class:`Proposals`, detached, sorted by decreasing objectness.
    """
    spatial_dims = anchors.shape[1] // 2
    log_odds = objectness_log_odds(objectness_logits.detach().float())  # (B, N); float32 under autocast
    deltas = deltas.detach()
    size = torch.tensor([float(s) for s in image_shape], dtype=anchors.dtype, device=anchors.device)
    out: list[Proposals] = []
    for b in range(objectness_logits.shape[0]):
        boxes_l, scores_l, levels_l = [], [], []
        start = 0
        for level, count in enumerate(num_anchors_per_level):
            stop = start + count
            lvl_scores = log_odds[b, start:stop]
            k = min(settings.pre_nms_top_k, count)
            top_scores, top_idx = lvl_scores.topk(k, sorted=True)
            idx = top_idx + start
            boxes = coder.decode_single(deltas[b, idx].to(torch.float32), anchors[idx].to(torch.float32))
            boxes_l.append(boxes)
            scores_l.append(top_scores)
            levels_l.append(torch.full((k,), level, dtype=torch.long, device=anchors.device))
            start = stop
        boxes = torch.cat(boxes_l)
        scores = torch.cat(scores_l)
        levels = torch.cat(levels_l)
        # clip to the image, then drop tiny and low-scoring boxes
        boxes = torch.minimum(torch.maximum(boxes, torch.zeros_like(boxes)), size.repeat(2).to(boxes.dtype))
        extents = boxes[:, spatial_dims:] - boxes[:, :spatial_dims]
        probs = torch.sigmoid(scores)
        keep = (extents >= settings.min_size).all(dim=1) & (probs >= settings.score_threshold)
        keep &= torch.isfinite(boxes).all(dim=1)
        boxes, probs, levels = boxes[keep], probs[keep], levels[keep]
        kept = batched_nms(boxes, probs, levels, settings.nms_iou, settings.post_nms_top_k)
        out.append(Proposals(boxes=boxes[kept], scores=probs[kept], levels=levels[kept]))
    return out
