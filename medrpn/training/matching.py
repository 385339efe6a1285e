"""Anchor-to-ground-truth matching: which anchors are objects, which are background, which are ignored.

Labels follow torchvision/detectron2: ``1`` positive, ``0`` negative, ``-1`` ignored (neither trained
as object nor as background — the band between the two thresholds, where an anchor overlaps a lesion
too much to be background and too little to be a good object example).

Two matchers share one call signature ``matcher(gt_boxes, anchors, num_anchors_per_level,
num_anchors_per_location) -> MatchResult``:

- :class:`IoUMatcher` — Faster R-CNN's rule: IoU >= ``positive_threshold`` positive, IoU <
  ``negative_threshold`` negative, in between ignored, and (``allow_low_quality_matches``) every
  ground-truth box also gets its best anchor(s), so a lesion whose shape no anchor fits still
  produces a positive; ``min_positives_per_box`` extends that to each box's ``k`` best anchors. The IoU
  matrix is computed in chunks of anchors, so memory stays bounded for the hundreds of thousands of anchors
  of a 3D volume.
- :class:`ATSSMatcher` — MONAI's adaptive training sample selection (per-box threshold from the
  mean + std of the IoUs of the closest anchors). It builds the dense M x N IoU matrix, which is
  fine for the few lesions per scan.

All matching runs without gradients. Shapes: ``M`` ground-truth boxes ``(M, 2*D)``, ``N`` anchors
``(N, 2*D)``, both StandardMode in image coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher as MonaiATSSMatcher
from torch import Tensor

from medrpn.modeling.structures import MatchResult
from medrpn.ops.box_iou import pairwise_iou


class AnchorMatcher(Protocol):
    """Anything that labels anchors against ground-truth boxes."""

    def __call__(
        self, gt_boxes: Tensor, anchors: Tensor, num_anchors_per_level: Sequence[int], num_anchors_per_location: int
    ) -> MatchResult:
        """Label ``(N, 2*D)`` anchors against ``(M, 2*D)`` boxes."""
        ...


def _tensor_box_iou(a: Tensor, b: Tensor) -> Tensor:
    return pairwise_iou(a, b)


def _all_negative(anchors: Tensor) -> MatchResult:
    n = anchors.shape[0]
    zeros = torch.zeros(n, dtype=torch.long, device=anchors.device)
    return MatchResult(labels=zeros.clone(), matched_gt=zeros, max_iou=torch.zeros(n, device=anchors.device))


class IoUMatcher:
    """IoU thresholds with an ignore band and low-quality matches.

    Args:
        positive_threshold: IoU at or above which an anchor is positive (Faster R-CNN 2D: 0.7).
        negative_threshold: IoU below which an anchor is negative (Faster R-CNN 2D: 0.3).
        allow_low_quality_matches: also make every box's highest-IoU anchor(s) positive (ties included).
        min_positives_per_box: also make every box's ``k`` highest-IoU anchors (IoU > 0) positive, unless such
            an anchor is already positive for another box. Thresholds alone give small lesions few positives:
            on the 3D demo's planned anchors (3 mm cells, IoU 0.2) a 3 mm lesion gets 1 positive anchor (the
            low-quality match), a 4 mm one about 4 and a 10 mm one about 28, so the objectness loss hardly
            sees the smallest lesions. 0 (default) keeps Faster R-CNN's rule.
        chunk_size: anchors per IoU chunk (memory is ``M * chunk_size`` floats).
    """

    def __init__(
        self,
        *,
        positive_threshold: float = 0.7,
        negative_threshold: float = 0.3,
        allow_low_quality_matches: bool = True,
        min_positives_per_box: int = 0,
        chunk_size: int = 262_144,
    ) -> None:
        if not 0.0 <= negative_threshold <= positive_threshold <= 1.0:
            raise ValueError(
                "need 0 <= negative_threshold <= positive_threshold <= 1, got "
                f"{negative_threshold} and {positive_threshold}"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if min_positives_per_box < 0:
            raise ValueError(f"min_positives_per_box must be >= 0, got {min_positives_per_box}")
        self.min_positives_per_box = min_positives_per_box
        self.positive_threshold = positive_threshold
        self.negative_threshold = negative_threshold
        self.allow_low_quality_matches = allow_low_quality_matches
        self.chunk_size = chunk_size

    @torch.no_grad()
    def __call__(
        self,
        gt_boxes: Tensor,
        anchors: Tensor,
        num_anchors_per_level: Sequence[int] = (),
        num_anchors_per_location: int = 1,
    ) -> MatchResult:
        """Label anchors.

        Args:
            gt_boxes: ``(M, 4)`` in 2D or ``(M, 6)`` in 3D.
            anchors: ``(N, 4)`` in 2D or ``(N, 6)`` in 3D.
            num_anchors_per_level: unused (interface of :class:`AnchorMatcher`).
            num_anchors_per_location: unused.

        Returns:
            :class:`MatchResult` with labels in {-1, 0, 1}.
        """
        if gt_boxes.shape[0] == 0:
            return _all_negative(anchors)
        n = anchors.shape[0]
        device = anchors.device
        max_iou = torch.empty(n, device=device)
        matched = torch.empty(n, dtype=torch.long, device=device)
        gt_best = torch.zeros(gt_boxes.shape[0], device=device)
        k = min(self.min_positives_per_box, n)
        top_iou = torch.empty(gt_boxes.shape[0], 0, device=device)  # running top-k per box
        top_idx = torch.empty(gt_boxes.shape[0], 0, dtype=torch.long, device=device)
        chunks = [(s, min(s + self.chunk_size, n)) for s in range(0, n, self.chunk_size)]
        for s, e in chunks:
            iou = pairwise_iou(gt_boxes, anchors[s:e])  # (M, n_chunk)
            max_iou[s:e], matched[s:e] = iou.max(dim=0)
            gt_best = torch.maximum(gt_best, iou.max(dim=1).values)
            if k:
                v, i = iou.topk(min(k, e - s), dim=1)
                top_iou, pick = torch.cat([top_iou, v], dim=1).topk(min(k, top_iou.shape[1] + v.shape[1]), dim=1)
                top_idx = torch.cat([top_idx, i + s], dim=1).gather(1, pick)

        labels = torch.full((n,), MatchResult.IGNORE, dtype=torch.long, device=device)
        labels[max_iou < self.negative_threshold] = MatchResult.NEGATIVE
        labels[max_iou >= self.positive_threshold] = MatchResult.POSITIVE

        if self.allow_low_quality_matches:
            for s, e in chunks:
                iou = pairwise_iou(gt_boxes, anchors[s:e])
                is_best = (iou == gt_best[:, None]) & (gt_best[:, None] > 0)  # (M, n_chunk)
                hit = is_best.any(dim=0)
                if hit.any():
                    # match each such anchor to the box it is best for (highest IoU among those)
                    masked = torch.where(is_best, iou, torch.full_like(iou, -1.0))
                    idx = torch.nonzero(hit).squeeze(1)
                    matched[s + idx] = masked[:, idx].argmax(dim=0)
                    labels[s + idx] = MatchResult.POSITIVE
        if k:
            # each box's k best overlapping anchors; an anchor already positive (for any box) keeps its match
            gt_of = torch.arange(gt_boxes.shape[0], device=device)[:, None].expand_as(top_idx)
            ok = top_iou > 0
            idx, gt_of, val = top_idx[ok], gt_of[ok], top_iou[ok]
            # where two boxes claim one anchor, the higher IoU wins: best claims first, then each anchor's first claim
            order = torch.argsort(val, descending=True, stable=True)
            idx, gt_of = idx[order], gt_of[order]
            by_anchor = torch.argsort(idx, stable=True)
            first = torch.ones_like(by_anchor, dtype=torch.bool)
            first[1:] = idx[by_anchor][1:] != idx[by_anchor][:-1]
            idx, gt_of = idx[by_anchor[first]], gt_of[by_anchor[first]]
            free = labels[idx] != MatchResult.POSITIVE
            matched[idx[free]] = gt_of[free]
            labels[idx[free]] = MatchResult.POSITIVE
        matched = torch.where(labels == MatchResult.POSITIVE, matched, torch.zeros_like(matched))
        return MatchResult(labels=labels, matched_gt=matched, max_iou=max_iou)


class ATSSMatcher:
    """MONAI's ATSS matcher behind medrpn's matcher interface.

    Args:
        num_candidates: closest anchors per level and per anchor shape considered for each box.
        center_in_gt: also require the anchor centre to lie inside the box (strict; off for small lesions).
    """

    def __init__(self, *, num_candidates: int = 4, center_in_gt: bool = False) -> None:
        self.num_candidates = num_candidates
        self.center_in_gt = center_in_gt
        self._impl = MonaiATSSMatcher(
            num_candidates=num_candidates, similarity_fn=_tensor_box_iou, center_in_gt=center_in_gt
        )

    @torch.no_grad()
    def __call__(
        self,
        gt_boxes: Tensor,
        anchors: Tensor,
        num_anchors_per_level: Sequence[int] = (),
        num_anchors_per_location: int = 1,
    ) -> MatchResult:
        """Label anchors (ATSS has no ignore band: every anchor is positive or negative).

        Args:
            gt_boxes: ``(M, 4)`` in 2D or ``(M, 6)`` in 3D.
            anchors: ``(N, 4)`` in 2D or ``(N, 6)`` in 3D.
            num_anchors_per_level: anchors per FPN level, summing to N.
            num_anchors_per_location: anchors per cell ``A``.

        Returns:
            :class:`MatchResult`.
        """
        if gt_boxes.shape[0] == 0:
            return _all_negative(anchors)
        # MONAI counts per-level *locations*: anchors per level divided by anchors per location
        locations = [c // num_anchors_per_location for c in num_anchors_per_level] or [anchors.shape[0]]
        quality, matches = self._impl.compute_matches(gt_boxes, anchors, locations, num_anchors_per_location)
        quality = torch.as_tensor(quality)
        labels = (matches >= 0).long()
        matched = matches.clamp(min=0)
        return MatchResult(labels=labels, matched_gt=matched, max_iou=quality.max(dim=0).values)
