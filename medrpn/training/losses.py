"""RPN losses: objectness on sampled anchors, box regression on sampled positives.

Target assignment (matching + sampling + encoding) runs under ``torch.no_grad``; only the network's
predictions carry gradients. Loss terms are named and weighted:

- ``loss_rpn_objectness`` — binary cross-entropy (sigmoid objectness) or two-class cross-entropy
  (softmax objectness) averaged over the sampled anchors;
- ``loss_rpn_box`` — smooth L1 on the encoded deltas of the sampled positives (``beta = 1/9`` as in
  torchvision), or ``1 - GIoU`` of the decoded boxes, summed over positives and divided by the
  number of sampled anchors (torchvision's normalisation, so the two terms have comparable scale).

Shapes: ``B`` images, ``N`` anchors, ``K`` logits per anchor, ``D`` spatial dims.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.data.box_utils import box_pair_giou
from torch import Tensor

from medrpn.modeling.structures import MatchResult, RPNOutput, objectness_probability
from medrpn.training.matching import AnchorMatcher, IoUMatcher
from medrpn.training.sampling import BalancedSampler, Sampler

BoxLoss = Literal["smooth_l1", "giou"]
BOX_LOSSES: tuple[str, ...] = get_args(BoxLoss)  # the accepted values, for run-time checks of config input


@dataclass
class AnchorTargets:
    """Training targets of one image.

    Attributes:
        match: the matcher's labels ``(N,)`` and matched box indices.
        sampled_pos: ``(N,)`` bool, positives that enter the loss.
        sampled_neg: ``(N,)`` bool, negatives that enter the loss.
        gt_boxes: ``(N, 2*D)`` matched ground-truth box of every anchor (zeros where unmatched).
    """

    match: MatchResult
    sampled_pos: Tensor
    sampled_neg: Tensor
    gt_boxes: Tensor


@dataclass
class RPNLossTerms:
    """The RPN's named loss terms (already weighted).

    Attributes:
        objectness: scalar objectness loss.
        box: scalar box-regression loss.
    """

    objectness: Tensor
    box: Tensor

    @property
    def total(self) -> Tensor:
        """Sum of the terms."""
        return self.objectness + self.box

    def as_dict(self) -> dict[str, Tensor]:
        """Terms by their logged names."""
        return {"loss_rpn_objectness": self.objectness, "loss_rpn_box": self.box}


@torch.no_grad()
def assign_anchor_targets(
    anchors: Tensor,
    num_anchors_per_level: Sequence[int],
    num_anchors_per_location: int,
    gt_boxes: Sequence[Tensor],
    matcher: AnchorMatcher,
    sampler: Sampler,
    scores: Tensor | None = None,
) -> list[AnchorTargets]:
    """Match and sample anchors for every image (no gradients).

    Args:
        anchors: ``(N, 4)`` in 2D or ``(N, 6)`` in 3D.
        num_anchors_per_level: anchors per level, summing to ``N``.
        num_anchors_per_location: anchors per cell ``A``.
        gt_boxes: per image ``(M_b, 2*D)`` ground-truth boxes in image coordinates (``M_b`` may be 0).
        matcher: anchor matcher.
        sampler: positive/negative sampler.
        scores: ``(B, N)`` current objectness probabilities (for hard-negative sampling).

    Returns:
        One :class:`AnchorTargets` per image.
    """
    out = []
    for b, gt in enumerate(gt_boxes):
        gt = gt.to(anchors)
        match = matcher(gt, anchors, num_anchors_per_level, num_anchors_per_location)
        pos, neg = sampler(match.labels, None if scores is None else scores[b])
        matched = gt[match.matched_gt] if gt.shape[0] else torch.zeros_like(anchors)
        out.append(AnchorTargets(match=match, sampled_pos=pos, sampled_neg=neg, gt_boxes=matched))
    return out


class RPNLoss:
    """Computes the RPN loss terms from an :class:`RPNOutput` and ground-truth boxes.

    Args:
        matcher: anchor matcher (default: IoU 0.7 / 0.3 with low-quality matches).
        sampler: anchor sampler (default: 256 per image, up to 50% positives).
        box_loss: ``"smooth_l1"`` on deltas or ``"giou"`` on decoded boxes.
        smooth_l1_beta: transition point of the smooth L1 loss.
        objectness_weight: weight of ``loss_rpn_objectness``.
        box_weight: weight of ``loss_rpn_box``.
    """

    def __init__(
        self,
        *,
        matcher: AnchorMatcher | None = None,
        sampler: Sampler | None = None,
        box_loss: BoxLoss = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9.0,
        objectness_weight: float = 1.0,
        box_weight: float = 1.0,
    ) -> None:
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        self.matcher: AnchorMatcher = matcher if matcher is not None else IoUMatcher()
        self.sampler: Sampler = sampler if sampler is not None else BalancedSampler()
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.objectness_weight = objectness_weight
        self.box_weight = box_weight

    def __call__(
        self, output: RPNOutput, gt_boxes: Sequence[Tensor], coder: BoxCoder, num_anchors_per_location: int
    ) -> RPNLossTerms:
        """Compute the loss for a batch.

        Args:
            output: the RPN's output for ``B`` images.
            gt_boxes: per image ``(M_b, 4)`` in 2D or ``(M_b, 6)`` in 3D, image coordinates.
            coder: the RPN's box coder.
            num_anchors_per_location: anchors per cell ``A``.

        Returns:
            :class:`RPNLossTerms`.
        """
        logits, deltas, anchors = output.objectness_logits, output.deltas, output.anchors
        with torch.no_grad():
            scores = objectness_probability(logits)
        targets = assign_anchor_targets(
            anchors,
            output.num_anchors_per_level,
            num_anchors_per_location,
            gt_boxes,
            self.matcher,
            self.sampler,
            scores,
        )
        obj_terms, box_terms, n_sampled = [], [], 0
        for b, t in enumerate(targets):
            sampled = t.sampled_pos | t.sampled_neg
            n_sampled += int(sampled.sum())
            lg = logits[b][sampled].float()  # (S, K); float32 under bf16/fp16 autocast
            target = t.sampled_pos[sampled].to(lg.dtype)
            if lg.shape[-1] == 1:
                obj_terms.append(F.binary_cross_entropy_with_logits(lg[:, 0], target, reduction="sum"))
            else:
                obj_terms.append(F.cross_entropy(lg, target.long(), reduction="sum"))
            pos = t.sampled_pos
            if not pos.any():
                box_terms.append(deltas[b].sum() * 0.0)
                continue
            if self.box_loss == "smooth_l1":
                with torch.no_grad():
                    reg_target = coder.encode_single(t.gt_boxes[pos].float(), anchors[pos].float())
                pred = deltas[b][pos].float()
                box_terms.append(F.smooth_l1_loss(pred, reg_target, beta=self.smooth_l1_beta, reduction="sum"))
            else:
                pred = coder.decode_single(deltas[b][pos].float(), anchors[pos].float())
                giou = box_pair_giou(pred, t.gt_boxes[pos].float())
                box_terms.append((1.0 - torch.as_tensor(giou)).sum())
        denom = max(n_sampled, 1)
        objectness = torch.stack(obj_terms).sum() / denom
        box = torch.stack(box_terms).sum() / denom
        return RPNLossTerms(objectness=self.objectness_weight * objectness, box=self.box_weight * box)
