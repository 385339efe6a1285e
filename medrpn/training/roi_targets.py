"""Training targets and loss of the lesion head (second stage).

RoIs for the head are sampled per image from the (detached) RPN proposals **plus the ground-truth
boxes** (so the head sees perfect positives from the first step on): IoU >= ``positive_iou`` with a
lesion -> that lesion's class; IoU < ``negative_iou`` -> background; in between ignored. A balanced
sampler keeps ``rois_per_image`` RoIs with up to ``positive_fraction`` positives (Faster R-CNN 2D:
512 RoIs, 25% positives at IoU >= 0.5; small 3D lesions need looser thresholds, set in the 3D config).

``centre_rule`` (an addition to Faster R-CNN's IoU rule, for small lesions): IoU is a harsh judge of a box
around a 3 mm lesion (a RoI twice its size per axis, centred on it, has IoU 1/8 in 3D), so the IoU rule calls
RoIs background that have the lesion right in their middle, and the head learns that a small blob in the centre
of a loosely fitting box is background — while the detection is scored by where its centre lies (the LUNA16
hit rule, :mod:`medrpn.evaluation.froc`). With ``"ignore"`` a RoI whose centre lies inside a lesion's inscribed
ellipsoid is never background; with ``"positive"`` it is a positive of that lesion (its class, and a box
target to regress to). ``"iou"`` is the plain IoU rule.

Loss terms (named): ``loss_head_class`` — cross-entropy over ``C + 1`` classes (0 = background) on the
sampled RoIs; ``loss_head_box`` — smooth L1 between the deltas predicted for the true class and the
encoded ground truth, on positives, divided by the number of sampled RoIs (torchvision's
``fastrcnn_loss``), or with ``box_loss="giou"`` the sum of ``1 - GIoU`` between the decoded true-class box and
the lesion box over the positives, with the same divisor (detectron2's ``box_reg_loss_type: giou``). Assignment runs
without gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.data.box_utils import box_pair_giou
from torch import Tensor

from medrpn.modeling.structures import MatchResult, Proposals
from medrpn.training.losses import BOX_LOSSES, BoxLoss
from medrpn.training.matching import IoUMatcher
from medrpn.training.sampling import BalancedSampler

CentreRule = Literal["iou", "ignore", "positive"]
CENTRE_RULES: tuple[str, ...] = ("iou", "ignore", "positive")


@dataclass
class RoITargets:
    """Sampled RoIs of one image and their targets.

    Attributes:
        rois: ``(S, 2*D)`` sampled boxes (image coordinates).
        classes: ``(S,)`` int64 target in ``0..C`` with 0 = background, ``c + 1`` = lesion class ``c``.
        gt_boxes: ``(S, 2*D)`` matched ground-truth boxes (meaningful where ``classes > 0``).
    """

    rois: Tensor
    classes: Tensor
    gt_boxes: Tensor


@dataclass
class HeadLossTerms:
    """The lesion head's named loss terms (weighted)."""

    classification: Tensor
    box: Tensor

    @property
    def total(self) -> Tensor:
        """Sum of the terms."""
        return self.classification + self.box

    def as_dict(self) -> dict[str, Tensor]:
        """Terms by their logged names."""
        return {"loss_head_class": self.classification, "loss_head_box": self.box}


class RoISampler:
    """Matches proposals (+ ground truth) to lesions and samples a balanced set of RoIs.

    Args:
        positive_iou: IoU at or above which a RoI is a lesion example (2D default 0.5).
        negative_iou: IoU below which a RoI is background (default = ``positive_iou``: no ignore band).
        rois_per_image: RoIs sampled per image.
        positive_fraction: maximum fraction of positives.
        add_gt_as_proposals: append the ground-truth boxes to the proposals.
        centre_rule: what becomes of a RoI below ``positive_iou`` whose centre lies inside a lesion's inscribed
            ellipsoid: ``"iou"`` (the IoU rule decides), ``"ignore"`` (never background) or ``"positive"`` (a
            positive of the lesion whose ellipsoid centre is nearest, in units of its semi-axes).
    """

    def __init__(
        self,
        *,
        positive_iou: float = 0.5,
        negative_iou: float | None = None,
        rois_per_image: int = 512,
        positive_fraction: float = 0.25,
        add_gt_as_proposals: bool = True,
        centre_rule: CentreRule = "iou",
    ) -> None:
        if centre_rule not in CENTRE_RULES:
            raise ValueError(f"centre_rule must be one of {CENTRE_RULES}, got {centre_rule!r}")
        self.centre_rule = centre_rule
        neg = positive_iou if negative_iou is None else negative_iou
        self.matcher = IoUMatcher(
            positive_threshold=positive_iou, negative_threshold=neg, allow_low_quality_matches=False
        )
        self.sampler = BalancedSampler(batch_size_per_image=rois_per_image, positive_fraction=positive_fraction)
        self.add_gt_as_proposals = add_gt_as_proposals

    @torch.no_grad()
    def __call__(
        self, proposals: Sequence[Proposals], gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor]
    ) -> list[RoITargets]:
        """Sample RoIs for every image.

        Args:
            proposals: ``B`` per-image proposals (detached).
            gt_boxes: per image ``(M_b, 2*D)`` boxes.
            gt_labels: per image ``(M_b,)`` 0-based lesion class ids.

        Returns:
            ``B`` :class:`RoITargets`.
        """
        out = []
        for p, gt, lab in zip(proposals, gt_boxes, gt_labels):
            gt = gt.to(p.boxes)
            rois = torch.cat([p.boxes, gt]) if self.add_gt_as_proposals else p.boxes
            match = self.matcher(gt, rois)
            if self.centre_rule != "iou" and gt.shape[0]:
                match = _apply_centre_rule(match, gt, rois, self.centre_rule)
            pos, neg = self.sampler(match.labels)
            keep = pos | neg
            classes = torch.zeros(rois.shape[0], dtype=torch.long, device=rois.device)
            if gt.shape[0]:
                classes = torch.where(
                    match.labels == MatchResult.POSITIVE, lab.to(rois.device).long()[match.matched_gt] + 1, classes
                )
                matched = gt[match.matched_gt]
            else:
                matched = torch.zeros_like(rois)
            out.append(RoITargets(rois=rois[keep], classes=classes[keep], gt_boxes=matched[keep]))
        return out


def centre_distance(gt: Tensor, boxes: Tensor) -> Tensor:
    """Distance of box centres from lesion centres in units of each lesion's semi-axes.

    Args:
        gt: ``(M, 4)`` in 2D or ``(M, 6)`` in 3D, ``xyxy`` / ``xyzxyz`` lesion boxes.
        boxes: ``(R, 2*D)`` boxes in the same coordinates.

    Returns:
        ``(M, R)``: ``sqrt(sum_i ((c_i - g_i) / h_i)^2)`` with ``g`` the lesion centre and ``h`` its half extent
        (at least a tiny epsilon); values ``<= 1`` put the box centre inside the ellipsoid inscribed in the lesion box.
    """
    d = gt.shape[1] // 2
    g_centre = (gt[:, :d] + gt[:, d:]) / 2
    half = ((gt[:, d:] - gt[:, :d]) / 2).clamp_min(1e-6)
    centre = (boxes[:, :d] + boxes[:, d:]) / 2
    z = (centre[None, :, :] - g_centre[:, None, :]) / half[:, None, :]
    return z.pow(2).sum(-1).sqrt()


def _apply_centre_rule(match: MatchResult, gt: Tensor, rois: Tensor, rule: CentreRule) -> MatchResult:
    """Relabel the non-positive RoIs centred inside a lesion (see :class:`RoISampler`)."""
    dist = centre_distance(gt.float(), rois.float())  # (M, R)
    nearest, which = dist.min(dim=0)
    centred = (nearest <= 1.0) & (match.labels != MatchResult.POSITIVE)
    labels, matched = match.labels.clone(), match.matched_gt.clone()
    if rule == "ignore":
        labels[centred] = MatchResult.IGNORE
    else:
        labels[centred] = MatchResult.POSITIVE
        matched[centred] = which[centred]
    return MatchResult(labels=labels, matched_gt=matched, max_iou=match.max_iou)


def lesion_head_loss(
    logits: Tensor,
    deltas: Tensor,
    targets: Sequence[RoITargets],
    coder: BoxCoder,
    *,
    box_loss: BoxLoss = "smooth_l1",
    smooth_l1_beta: float = 1.0 / 9.0,
    class_weight: float = 1.0,
    box_weight: float = 1.0,
) -> HeadLossTerms:
    """Loss of the lesion head on sampled RoIs.

    Args:
        logits: ``(S, C + 1)`` for the concatenated sampled RoIs of all images.
        deltas: ``(S, C, 2*D)``.
        targets: the per-image targets the RoIs came from.
        coder: the head's box coder.
        box_loss: ``"smooth_l1"`` on the encoded deltas or ``"giou"`` on the decoded boxes (module docstring).
        smooth_l1_beta: smooth L1 transition point.
        class_weight: weight of ``loss_head_class``.
        box_weight: weight of ``loss_head_box``.

    Returns:
        :class:`HeadLossTerms`.

    Raises:
        ValueError: an unknown ``box_loss``.
    """
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
    classes = torch.cat([t.classes for t in targets])
    if classes.numel() == 0:
        zero = logits.sum() * 0.0
        return HeadLossTerms(zero, deltas.sum() * 0.0)
    cls_loss = F.cross_entropy(logits.float(), classes)  # float32 under bf16/fp16 autocast
    pos = torch.nonzero(classes > 0).squeeze(1)
    if pos.numel() == 0:
        return HeadLossTerms(class_weight * cls_loss, deltas.sum() * 0.0)
    rois = torch.cat([t.rois for t in targets])[pos].float()
    gts = torch.cat([t.gt_boxes for t in targets])[pos].float()
    pred = deltas[pos, classes[pos] - 1].float()
    if box_loss == "smooth_l1":
        with torch.no_grad():
            reg_target = coder.encode_single(gts, rois)
        box = F.smooth_l1_loss(pred, reg_target, beta=smooth_l1_beta, reduction="sum")
    else:
        giou = torch.as_tensor(box_pair_giou(coder.decode_single(pred, rois), gts))
        box = (1.0 - giou).sum()
    return HeadLossTerms(class_weight * cls_loss, box_weight * box / classes.numel())
